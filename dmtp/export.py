"""Export a trained head to z-lab's DFlash checkpoint layout, which SGLang and vLLM serve: `dmtp export`.

    dmtp export --head_path heads/run1/final --format dflash --output_dir exports/run1-dflash \
        --evaluation heads/run1/evaluation/results.json --train_data_dir data/

A dmtp head is DFlash's drafter tensor for tensor (dmtp/head.py), so an export renames nothing and
retrains nothing. It writes three files:

    config.json        a Qwen3 config of the draft layers, `architectures: ["DFlashDraftModel"]`,
                       `dflash_config: {block_size, mask_token_id, target_layer_ids}`,
                       `num_target_layers` (and `block_size` at the top level too, where SGLang and
                       the first z-lab checkpoints read it); `dmtp_export` records the provenance
    model.safetensors  the head's tensors under their own names (fc, hidden_norm, layers.i.…, norm)
    README.md          a model card: base model and fingerprint, training data, τ and speedup,
                       the SGLang and vLLM serve commands

Layer numbering. dmtp's `feature_layers` index `output_hidden_states` (0 = embeddings, i = output
of decoder layer i - 1, N = the final state after the final norm); DFlash's `target_layer_ids`
index decoder layers and read `hidden_states[k + 1]`. So `target_layer_id = feature_layer - 1`,
and `dflash.model.DFlashDraftModel.from_pretrained(folder)` computes what `dmtp evaluate` computes
(tests/test_export.py checks tokens and acceptance lengths round by round).

Refused, because DFlash's layout cannot say it (`dflash_problems`): a draft vocabulary (DFlash
drafts the argmax over the target's whole LM head), a context window (DFlash attends to every
earlier position), a head with its own embedding and LM head (DFlash borrows the target's), a
block of one position, an unknown base depth. Exported with a caveat in the card
(`serving_caveats`): feature layers the reference code reads exactly but serving engines capture
differently (the final state after the final norm; the embeddings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmtp.cli import add_config_arguments, config_from_args, run_command
from dmtp.config import ExportConfig, resolve_store_path
from dmtp.errors import DmtpError, ModelLoadError

EXPORT_SCHEMA = "dmtp.export/1"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"


class ExportRefused(DmtpError):
    """The head cannot be expressed in the requested layout (a property of the head, not a typo)."""

    exit_code = 3


# ----------------------------------------------------------------------------------------------
# what DFlash's layout can say


def dflash_problems(config: Any) -> list[str]:
    """Why a head (`MTPHeadConfig`) has no faithful DFlash export; [] when it has one."""
    problems = []
    if config.owns_vocabulary:
        problems.append(
            "the head owns its embedding and LM head (trained without a base model); a DFlash "
            "draft borrows the target's: retrain with --base_model_path"
        )
    if config.draft_vocab is not None:
        problems.append(
            f"the head drafts from a draft vocabulary of {len(config.draft_vocab):,} tokens "
            "(--draft_vocab_size); DFlash drafts the argmax over the target's whole LM head, where "
            "this head's untrained rows would win: retrain with --draft_vocab_size 0"
        )
    if config.context_window is not None:
        problems.append(
            f"the head sees only the last {config.context_window} context position(s) "
            "(--context_window); DFlash attends to every earlier position: retrain without "
            "--context_window"
        )
    if int(config.block_length) < 2:
        problems.append(f"block_length {config.block_length} drafts nothing (DFlash needs >= 2)")
    depth = config.num_target_layers
    if depth is None or int(depth) < 1 or any(i < 0 for i in config.feature_layers):
        problems.append(
            "the base model's depth is unknown (a store from before feature layers), so its "
            "layers have no DFlash target_layer_ids: collect and train again"
        )
    return problems


def check_dflash_expressible(config: Any, where: str) -> None:
    """Raise ExportRefused, one line naming every reason, unless the head exports faithfully."""
    problems = dflash_problems(config)
    if problems:
        raise ExportRefused(f"{where}: no DFlash export: " + "; ".join(problems))


def serving_caveats(config: Any) -> list[str]:
    """Feature layers the reference `dflash` code reads exactly as dmtp does, serving engines not."""
    caveats = []
    depth = int(config.num_target_layers)
    if depth in config.feature_layers:
        caveats.append(
            f"target_layer_id {depth - 1} is the base model's final state after its final norm "
            f"(dmtp feature layer {depth}, `hidden_states[-1]`). The reference `dflash` code feeds "
            "exactly that; SGLang and vLLM capture a target layer's output before the final norm "
            "(stock versions do not capture the last layer at all), so served drafts can differ "
            "and τ can drop. For a head that serves identically everywhere, train with "
            f"--feature_layers below {depth}"
        )
    if 0 in config.feature_layers:
        caveats.append(
            "target_layer_id -1 is the token embeddings (dmtp feature layer 0). The reference "
            "`dflash` code reads `hidden_states[0]`; SGLang refuses negative target_layer_ids"
        )
    return caveats


def dflash_draft_config(config: Any) -> Any:
    """The Qwen3Config of the `DFlashDraftModel` that holds a head of `config` (`MTPHeadConfig`)."""
    from dmtp.head import layer_config

    draft = layer_config(config)
    draft.architectures = ["DFlashDraftModel"]
    draft.dflash_config = {
        "block_size": int(config.block_length),
        "mask_token_id": int(config.mask_token_id),
        "target_layer_ids": [int(i) - 1 for i in config.feature_layers],
    }
    draft.block_size = int(config.block_length)
    draft.num_target_layers = int(config.num_target_layers)
    # The draft has no embedding of its own to tie: a tied config makes from_pretrained look for one.
    draft.tie_word_embeddings = False
    return draft


# ----------------------------------------------------------------------------------------------
# the export


@dataclass
class ExportResult:
    output_dir: Path
    target_layer_ids: list[int]
    block_size: int
    dtype: str
    parameters: int
    weights_bytes: int
    caveats: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "output_dir": str(self.output_dir)}


def read_head_folder(path: Path) -> dict[str, Any]:
    """The head's config.json, after checks that name what is wrong with the folder."""
    if not path.is_dir():
        raise ModelLoadError(
            f"head not found: {path} (pass the folder `dmtp train` saved, e.g. <output_dir>/final)"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: not a head folder (no config.json)")
    try:
        values = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_file}: not valid JSON ({error})") from error
    if "DFlashDraftModel" in (values.get("architectures") or []):
        raise ModelLoadError(f"{path} is already a DFlash export; pass the dmtp head it came from")
    if not (path / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{path}: the head's weights are missing (no {WEIGHTS_FILE})")
    return values


def read_head_tensors(path: Path, head_config: Any) -> dict[str, Any]:
    """The head's tensors as saved (dtype kept), checked name for name and shape for shape against
    the model its config describes (built on the meta device: no memory, no initialisation)."""
    import torch
    from safetensors.torch import load_file

    from dmtp.head import MTPHeadModel

    tensors = load_file(str(path / WEIGHTS_FILE))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MTPHeadModel(head_config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ModelLoadError(
            f"{path}/{WEIGHTS_FILE} does not hold the head its config.json describes (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, other shape {reshaped[:3]})"
        )
    return tensors


def _prepare_output(output: Path, overwrite: bool) -> None:
    """Fail on an existing folder unless it is an earlier export and `overwrite` says replace it."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    earlier = output / "config.json"
    is_export = False
    if earlier.is_file():
        try:
            is_export = "dmtp_export" in json.loads(earlier.read_text())
        except json.JSONDecodeError:
            pass
    if not is_export:
        raise DmtpError(f"{output} exists and is not an earlier export; pick an empty folder")
    if not overwrite:
        raise DmtpError(f"{output} holds an earlier export; pass --overwrite to replace it")


def export_dflash(config: ExportConfig) -> ExportResult:
    """Write the head of `config.head_path` to `config.output_dir` in the DFlash layout."""
    import torch
    from safetensors.torch import save_file

    import dmtp
    from dmtp.head import MTPHeadConfig

    path = Path(config.head_path)
    read_head_folder(path)
    try:
        head_config = MTPHeadConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{path}/config.json: cannot read the head's config: {error}"
        ) from error
    check_dflash_expressible(head_config, str(path))
    evaluation = load_evaluation(config.evaluation, head_config) if config.evaluation else None
    store = describe_store(config.train_data_dir) if config.train_data_dir else None
    output = Path(config.output_dir)
    _prepare_output(output, config.overwrite)

    tensors = read_head_tensors(path, head_config)
    saved = next(iter(tensors.values())).dtype
    dtype = saved if config.dtype == "auto" else getattr(torch, config.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}

    draft = dflash_draft_config(head_config)
    draft.dtype = dtype
    caveats = serving_caveats(head_config)
    draft.dmtp_export = {
        "schema": EXPORT_SCHEMA,
        "dmtp_version": dmtp.__version__,
        "head": str(path.resolve()),
        "base_model": head_config.base_model,
        "feature_layers": list(head_config.feature_layers),
        "serving_caveats": caveats,
    }
    parameters = sum(t.numel() for t in tensors.values())
    summary = _train_summary(path)

    # Written beside the target and renamed into place: a crash never leaves half an export.
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    draft.save_pretrained(staging)
    save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    card = model_card(
        head_config,
        output=output,
        dtype=dtype_name,
        parameters=parameters,
        caveats=caveats,
        evaluation=evaluation,
        store=store,
        train_summary=summary,
    )
    (staging / CARD_FILE).write_text(card)
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return ExportResult(
        output_dir=output,
        target_layer_ids=draft.dflash_config["target_layer_ids"],
        block_size=int(head_config.block_length),
        dtype=dtype_name,
        parameters=parameters,
        weights_bytes=(output / WEIGHTS_FILE).stat().st_size,
        caveats=caveats,
    )


# ----------------------------------------------------------------------------------------------
# what the card tells: training data, results


def load_evaluation(path_text: str, head_config: Any) -> dict[str, Any]:
    """A `dmtp evaluate` result of this head (same base model, layers and block)."""
    path = Path(path_text)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise DmtpError(f"evaluation not found: {path} (a `dmtp evaluate --output` file)") from None
    except json.JSONDecodeError as error:
        raise DmtpError(f"{path}: not valid JSON ({error})") from error
    if not str(result.get("schema", "")).startswith("dmtp.evaluation/") or "drafters" not in result:
        raise DmtpError(f"{path}: not a `dmtp evaluate --output` result")
    evaluated = result.get("head") or {}
    ours = (head_config.base_model or {}).get("fingerprint")
    theirs = (evaluated.get("base_model") or {}).get("fingerprint")
    same_shape = evaluated.get("feature_layers") == list(head_config.feature_layers) and int(
        evaluated.get("block_length", -1)
    ) == int(head_config.block_length)
    if "head" not in result["drafters"] or not same_shape or (ours and theirs and ours != theirs):
        raise DmtpError(
            f"{path}: evaluates another head ({evaluated.get('path', 'none')}); pass this head's "
            "evaluation or none"
        )
    return result


def describe_store(data_dir: str) -> dict[str, Any]:
    """What the card says about the training data: the store's identity and size, no data read."""
    from dmtp.store import open_store

    store = open_store(resolve_store_path(data_dir))
    attrs = dict(store.attrs)
    return {
        "path": str(store.path),
        "rows": int(store.n_rows),
        "sequences": int(store.n_sequences),
        "prompts_sha256": attrs.get("prompts_sha256"),
        "prompts_count": attrs.get("prompts_count"),
        "collection": attrs.get("collection") or {},
        "hidden_dtype": attrs.get("hidden_dtype"),
    }


def _train_summary(head_path: Path) -> dict[str, Any]:
    """`dmtp train`'s summary beside the final head (steps, validation metrics, MLflow run)."""
    try:
        return json.loads((head_path.parent / "train_summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _base_for_serving(identity: dict[str, Any]) -> tuple[str, str]:
    """(the base model to name in serve commands, a note on it)."""
    from dmtp.models import DEFAULT_MODEL, cache_dir

    name = identity.get("name_or_path") or "<base model>"
    if name == DEFAULT_MODEL.name:
        folder = cache_dir() / "models" / DEFAULT_MODEL.name
        return str(folder), (
            f"The base model is dmtp's embedded default: {DEFAULT_MODEL.name} dequantized from the "
            f"Q4_1 GGUF in `{DEFAULT_MODEL.requirement}` and cached at `{folder}`. Serve that "
            "folder: the hub's original weights are another model (another fingerprint)."
        )
    return name, ""


def _number(value: Any, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _results_section(evaluation: dict[str, Any] | None) -> list[str]:
    if evaluation is None:
        return [
            "No evaluation was attached to this export (`dmtp export --evaluation results.json`, "
            "the output of `dmtp evaluate --output`).",
        ]
    drafters = evaluation["drafters"]
    settings = evaluation.get("settings", {})
    machine = evaluation.get("machine", {})
    head = drafters["head"]["overall"]
    width = len(head["acceptance_by_position"])
    rows = [
        f"| method | τ | acceptance by position (1…{width}) | tokens/s | speedup |",
        "|---|---|---|---|---|",
    ]
    names = {"head": "this head", "prompt_lookup": "prompt lookup (no training)"}
    for name, figures in drafters.items():
        overall = figures["overall"]
        acceptance = " / ".join(_number(a) for a in overall["acceptance_by_position"])
        rows.append(
            f"| {names.get(name, name)} | {_number(overall['tau'], 3)} | {acceptance} | "
            f"{_number(overall['tokens_per_second'], 1)} | {_number(overall['speedup'], 2, '×')} |"
        )
    rows.append(
        f"| greedy decoding | 1.000 | – | {_number(head['greedy_tokens_per_second'], 1)} | 1.00× |"
    )
    device = machine.get("gpu") or f"{machine.get('processor', '?')} ({machine.get('device', '?')})"
    return [
        f"`dmtp evaluate` (transformers, batch 1, greedy, K = {settings.get('denoising_steps', 1)} "
        f"denoising step) on {head['prompts']} prompts of `{settings.get('input_data_path', '?')}`, "
        f"{head['generated_tokens']:,} generated tokens, on {device}; every output equal to "
        "greedy decoding's. τ counts the bonus token (1 = no gain); speedup is tokens/s against "
        "plain greedy decoding measured side by side in the same run.",
        "",
        *rows,
    ]


def _data_section(store: dict[str, Any] | None, summary: dict[str, Any]) -> list[str]:
    lines = []
    if store is None:
        lines.append(
            "Not recorded in this export (`dmtp export --train_data_dir <store>` describes it)."
        )
    else:
        collection = store["collection"]
        mode = collection.get("mode", "generate")
        source = (
            "the base model's own greedy answers"
            if mode == "generate" and not collection.get("temperature")
            else f"the base model's outputs ({mode})"
        )
        lines.append(
            f"{source.capitalize()} to {store['prompts_count'] or '?'} prompts (sha256 "
            f"`{store['prompts_sha256']}`), up to {collection.get('max_new_tokens', '?')} new tokens "
            f"each: {store['rows']:,} positions in {store['sequences']:,} sequences, states stored "
            f"as {store['hidden_dtype']} (`{store['path']}`)."
        )
    if summary:
        metrics = summary.get("metrics") or {}
        proxy = metrics.get("val/tau")
        lines.append(
            f"Trained {summary.get('step', '?')} steps"
            + (f"; validation τ proxy {proxy:.3f}" if proxy is not None else "")
            + (f"; MLflow run `{summary['mlflow_run_id']}`" if summary.get("mlflow_run_id") else "")
            + "."
        )
    return lines


def model_card(
    head_config: Any,
    *,
    output: Path,
    dtype: str,
    parameters: int,
    caveats: list[str],
    evaluation: dict[str, Any] | None,
    store: dict[str, Any] | None,
    train_summary: dict[str, Any],
) -> str:
    """README.md of an export: what the draft is for, how it was made and measured, how to serve it."""
    identity = head_config.base_model or {}
    base_name = identity.get("name_or_path", "an unrecorded base model")
    base, base_note = _base_for_serving(identity)
    block = int(head_config.block_length)
    feature_layers = list(head_config.feature_layers)
    target_ids = [i - 1 for i in feature_layers]
    folder = str(output.resolve())
    vllm_config = json.dumps(
        {"method": "dflash", "model": folder, "num_speculative_tokens": block - 1}
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [dflash, speculative-decoding, draft-model, dmtp]",
        "---",
        "",
        f"# DFlash draft head for {base_name}",
        "",
        f"A block-diffusion draft model for speculative decoding of **{base_name}**, "
        "trained with dmtp and exported to z-lab's DFlash checkpoint layout. Each round it fills a "
        f"block of {block} positions (the token the base model just produced, then {block - 1} "
        "drafts) in one forward, from the base model's states at its target layers for every "
        "earlier position; the base model verifies the block in one forward.",
        "",
        "It borrows the base model's token embedding and LM head (they are not in this folder): "
        "serve it only with the base model below.",
        "",
        "## Base model",
        "",
        "| | |",
        "|---|---|",
        f"| name | {base_name} |",
        f"| architecture | {identity.get('architecture', '?')} |",
        f"| fingerprint | `{identity.get('fingerprint', '?')}` (dmtp.models.model_fingerprint: "
        "config, weight names and sizes, first MiB of weights) |",
        f"| decoder layers | {head_config.num_target_layers} |",
        "",
        *([base_note, ""] if base_note else []),
        "## Draft",
        "",
        "| | |",
        "|---|---|",
        f"| block size | {block} |",
        f"| draft layers | {head_config.num_hidden_layers} |",
        f"| target_layer_ids | {target_ids} (dmtp feature layers {feature_layers}: "
        "`output_hidden_states` indices) |",
        f"| mask token id | {head_config.mask_token_id} |",
        f"| parameters | {parameters / 1e6:.2f} M ({dtype}) |",
        "",
        "## Training data",
        "",
        *_data_section(store, train_summary),
        "",
        "## Results",
        "",
        *_results_section(evaluation),
        "",
        "## Serving",
        "",
        "SGLang (block size, mask token and target layers are read from `config.json`):",
        "",
        "```bash",
        f"python -m sglang.launch_server --model-path {base} \\",
        "    --speculative-algorithm DFLASH \\",
        f"    --speculative-draft-model-path {folder}",
        "```",
        "",
        "vLLM:",
        "",
        "```bash",
        f"vllm serve {base} --speculative-config '{vllm_config}'",
        "```",
        "",
        "```python",
        "from vllm import LLM",
        f'llm = LLM(model="{base}", speculative_config={vllm_config})',
        "```",
        "",
        "The reference code (`pip install dflash`, MIT), against which dmtp's tests check this "
        "layout token for token:",
        "",
        "```python",
        "from dflash.model import DFlashDraftModel, dflash_generate",
        f'draft = DFlashDraftModel.from_pretrained("{folder}")',
        "output = dflash_generate(draft, target, input_ids, max_new_tokens=256, "
        "stop_token_ids=[eos], temperature=0.0)",
        "```",
        "",
    ]
    if caveats:
        lines += ["### Caveats", "", *[f"- {caveat}." for caveat in caveats], ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the stage


def export(config: ExportConfig) -> ExportResult:
    """Run the export `config` asks for (today: DFlash)."""
    return export_dflash(config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(ExportConfig, args)
    result = export(config)
    print(
        f"dmtp export: {result.output_dir} (DFlash layout: config.json, {WEIGHTS_FILE} "
        f"{result.weights_bytes / 1e6:.1f} MB {result.dtype}, {CARD_FILE}); block_size "
        f"{result.block_size}, target_layer_ids {result.target_layer_ids}"
    )
    for caveat in result.caveats:
        print(f"dmtp export: note: {caveat}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("export", sys.argv[1:]))
