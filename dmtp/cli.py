"""The `dmtp` command. Each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`.

    dmtp collect  --base_model_path ... --input_data_path prompts.jsonl --output_dir data/
    dmtp validate --data_dir data/
    dmtp train    --train_data_dir data/ --output_dir heads/   (or: torchrun -m dmtp.train ...)
    dmtp evaluate --base_model_path ... --head_path heads/final --input_data_path eval.jsonl
    dmtp export   --head_path heads/final --format dflash --output_dir exports/head-dflash

Flags come from the stage's config dataclass (dmtp.config), in both `--snake_case` and
`--kebab-case`, as the original scripts' users type either. `--config run.json` reads a whole
config (`dmtp.config.save_config` writes one; the Prefect tasks hand their child processes theirs
so), and flags given beside it override its values. Modules are imported only when their
subcommand runs, so `dmtp --help` does not pay for torch.

Why not transformers.HfArgumentParser: it does not flatten nested configs (TrainConfig.data,
CollectConfig.layout), it enforces choices itself (argparse's usage error instead of the config's
one-line message), and importing it costs transformers on every `dmtp validate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmtp.config import field_choices
from dmtp.errors import DmtpError

COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("dmtp.collect", "run the base model over prompts; store hidden states and tokens"),
    "validate": ("dmtp.validate", "check a store's shapes, counts, checksums and values"),
    "import-pt": ("dmtp.import_pt", "convert the original scripts' .pt files into a store"),
    "train": ("dmtp.train", "train a diffusion MTP head on a store (MLflow-tracked)"),
    "evaluate": ("dmtp.evaluate", "speculative decoding with a head: tau, speedup, losslessness"),
    "export": ("dmtp.export", "write a head in z-lab's DFlash layout, for SGLang and vLLM"),
}


def _flag_names(name: str, aliases: Sequence[str] = ()) -> list[str]:
    names = []
    for base in (name, *aliases):
        for spelling in (base, base.replace("_", "-"), base.replace("-", "_")):
            flag = f"--{spelling}"
            if flag not in names:
                names.append(flag)
    return names


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int (annotations already resolved by `typing.get_type_hints`)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


CONFIG_CLASS_DEST = "_config_class"


def add_config_arguments(
    parser: argparse.ArgumentParser, config_class: type, skip: Sequence[str] = ()
) -> None:
    """Add `--config FILE` and one flag per field of `config_class` (nested dataclasses are
    flattened)."""
    parser.add_argument(
        "--config",
        help="JSON of this command's settings (e.g. written by a flow's task); flags override it",
    )
    parser.set_defaults(**{CONFIG_CLASS_DEST: config_class})
    _add_field_arguments(parser, config_class, skip)


def _add_field_arguments(parser: argparse.ArgumentParser, config_class: type, skip: Sequence[str]):
    hints = typing.get_type_hints(config_class)
    choices_by_field = field_choices(config_class)
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            _add_field_arguments(parser, kind, skip)
            continue
        kind = _base_type(kind)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        names = _flag_names(f.name, f.metadata.get("aliases", ()))
        help_text = f.metadata.get("help", "")
        if kind is bool:
            # --name and --no-name alike, so a flag can override a --config file either way.
            parser.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        if kind is list or typing.get_origin(kind) is list:
            parser.add_argument(*names, dest=f.name, nargs="*", default=default, help=help_text)
            continue
        # Choices are shown here, not enforced: the config checks them when it is built, so a bad
        # value gets the same one-line error from the CLI as from Python and from the flows.
        choices = choices_by_field.get(f.name)
        parser.add_argument(
            *names,
            dest=f.name,
            type=type(choices[0]) if choices else kind if kind in (int, float, str) else str,
            default=default,
            metavar="{" + ",".join(map(str, choices)) + "}" if choices else None,
            help=f"{help_text} (default: {default})",
        )


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """Build `config_class` from parsed flags (nested dataclasses from their flattened fields)."""
    hints = typing.get_type_hints(config_class)
    values = {}
    for f in dataclasses.fields(config_class):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = config_from_args(hints[f.name], args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return config_class(**values)


def read_config_file(path: str, config_class: type) -> dict[str, Any]:
    """A `--config` JSON as flag defaults: nested configs flattened, as the flags are.

    Raises DmtpError naming the file and the key that is not a field of `config_class`.
    """
    try:
        values = json.loads(Path(path).read_text())
    except OSError as error:
        raise DmtpError(f"--config {path}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise DmtpError(f"--config {path}: not JSON ({error})") from error
    if not isinstance(values, dict):
        raise DmtpError(f"--config {path}: expected a JSON object of settings")
    return _flatten(values, config_class, path)


def _flatten(values: dict[str, Any], config_class: type, path: str) -> dict[str, Any]:
    hints = typing.get_type_hints(config_class)
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise DmtpError(
                f"--config {path}: {key!r} is not a setting of {config_class.__name__} "
                "(the command's --help lists them)"
            )
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            flat.update(_flatten(value, hints[key], path))
        else:
            flat[key] = value
    return flat


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; with `--config FILE`, the file's values replace the defaults and any flag
    given beside it wins."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        parser.set_defaults(**read_config_file(args.config, getattr(args, CONFIG_CLASS_DEST)))
        args = parser.parse_args(argv)
    return args


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dmtp {command}", description=help_text)
    module.add_arguments(parser)
    return parser


def run_command(command: str, argv: Sequence[str]) -> int:
    """Parse `argv` for `command` and run it; user errors become one line on stderr."""
    try:
        parser = build_parser(command)
        args = parse_args(parser, argv)
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.run(args) or 0)
    except DmtpError as error:
        print(f"dmtp {command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"dmtp {command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [
            "usage: dmtp <command> [flags]   (dmtp <command> --help for its flags)",
            "",
            "commands:",
        ]
        lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"dmtp: error: unknown command {argv[0]!r}\n" + "\n".join(lines), file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
