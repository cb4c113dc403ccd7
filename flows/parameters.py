"""Flow parameters generated from the dmtp config classes, so each setting is declared once.

A flow names the config fields it exposes (`settings(CollectConfig, "max_new_tokens", ...)`) and
`@with_settings(table)` gives its function one keyword parameter per field, with the field's type,
default and help. Prefect builds the run form and the deployment's parameter schema from that
signature: a `Literal[...]` field becomes a dropdown (an `enum`), a bound a `minimum` or `maximum`
the form checks, and every default shown is the config class's own. The function receives the
values in its `**values` and hands each stage its share (`stage_settings`); the stage's config
checks them.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import annotated_types

STAGES = ("collect", "train", "evaluate")
# option()'s bounds as the schema's minimum/maximum, so the run form checks them as it is filled in
BOUNDS = {
    "ge": annotated_types.Ge,
    "gt": annotated_types.Gt,
    "le": annotated_types.Le,
    "lt": annotated_types.Lt,
}


@dataclass(frozen=True)
class Setting:
    """Flow parameter `name` sets field `field` of `config_class` in each of `stages`.

    stages: () for a parameter the flow consumes itself (the base model, the shard count).
    """

    name: str
    config_class: type
    field: str
    stages: tuple[str, ...]

    @property
    def _field(self) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(self.config_class) if f.name == self.field)

    @property
    def default(self) -> Any:
        item = self._field
        return item.default if item.default is not dataclasses.MISSING else item.default_factory()

    @property
    def annotation(self) -> Any:
        """The field's type (choices: `Literal[...]`), its bounds attached (`int | None` keeps them
        on the int)."""
        hint = typing.get_type_hints(self.config_class)[self.field]
        bounds = [
            rule(self._field.metadata[key])
            for key, rule in BOUNDS.items()
            if key in self._field.metadata
        ]
        if not bounds:
            return hint
        if type(None) in typing.get_args(hint):
            (kind,) = [kind for kind in typing.get_args(hint) if kind is not type(None)]
            return typing.Annotated[(kind, *bounds)] | None
        return typing.Annotated[(hint, *bounds)]

    @property
    def help(self) -> str:
        return self._field.metadata.get("help", "")


def settings(
    config_class: type,
    *fields: str,
    stages: Iterable[str] = (),
    **renamed: str,
) -> list[Setting]:
    """Settings for `fields` of `config_class` (a parameter named as its field), and for each
    `parameter=field` in `renamed` (e.g. `train_seed="seed"`), all feeding `stages`."""
    stages = tuple(stages)
    assert set(stages) <= set(STAGES), stages
    pairs = [(name, name) for name in fields] + list(renamed.items())
    return [Setting(name, config_class, field, stages) for name, field in pairs]


def stage_settings(table: Iterable[Setting], values: dict[str, Any], stage: str) -> dict[str, Any]:
    """The config fields `stage` gets from a flow's setting values, by field name."""
    return {s.field: values[s.name] for s in table if stage in s.stages}


def with_settings(table: list[Setting]) -> Callable[[Callable], Callable]:
    """Give the decorated flow function a keyword parameter per setting of `table`, ahead of its
    own parameters; it receives them in its `**values`.

    Every parameter becomes keyword-only (Prefect binds a flow's parameters by name). The
    docstring's `Args:` section gains each setting's help, which Prefect shows beside the field.
    """
    names = [s.name for s in table]
    assert len(set(names)) == len(names), "a flow parameter is listed twice"

    def decorate(fn: Callable) -> Callable:
        own = inspect.signature(fn, eval_str=True).parameters.values()
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own), fn
        generated = [
            inspect.Parameter(
                s.name, inspect.Parameter.KEYWORD_ONLY, default=s.default, annotation=s.annotation
            )
            for s in table
        ]
        kept = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in own
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        fn.__signature__ = inspect.Signature([*generated, *kept])
        fn.__annotations__ = {
            **{s.name: s.annotation for s in table},
            **typing.get_type_hints(fn),
        }
        for p in own:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                fn.__annotations__.pop(p.name, None)
        # Indented as the entries of the function's own docstring's last section, `Args:`.
        lines = [f"        {s.name}: {s.help}" for s in table]
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"
        return fn

    return decorate
