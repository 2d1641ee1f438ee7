"""One source of truth per setting: a dataclass field carries its default, range, choices and help.

A settings dataclass declares each node widget once, peft-style::

    steps: int = setting(1000, "Optimizer updates.", min=1, max=1_000_000)

derives from :class:`NodeSettings` (its ``TITLE`` starts every error; ``from_values`` is the one way
from a node's widget values to the settings) and calls :func:`validate` in ``__post_init__``. From the same fields the node builds its
V3 schema inputs (nodes/widgets.py) and the README's node reference is generated
(scripts/update_generated_files.py writes it, tests/unit/test_generated_files.py checks it is
current), so a default, a range or a tooltip is written in exactly one place. ComfyUI-agnostic:
the specs are plain data.

Errors are :class:`SettingError` (a ValueError), whose message names the node, the input, the
value and the fix; code that needs to tell our own errors from a library's catches the class
instead of matching message prefixes.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Sequence


class SettingError(ValueError):
    """A setting is wrong; the message names the node, the input, the value and the fix."""


@dataclass(frozen=True)
class Spec:
    """What a node widget needs besides the default (kept in the dataclass field's metadata)."""

    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: Sequence[str] | None = None
    round: bool | None = None        # FLOAT widgets: False = no rounding to `step` in the editor
    multiline: bool = False          # STRING widgets
    hint: str = ""                   # appended to a range error, e.g. "(alpha = rank gives scale 1)"
    # An extra rule, checked first: value -> None, or the message's tail naming the fix (or it raises).
    check: Callable[[Any], str | None] | None = None


class NodeSettings:
    """Base of the settings dataclasses: builds one from a node's widget values."""

    TITLE = ""   # the node's title: the first words of every error (a plain attribute, not a field)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], others: Iterable[str] = ()):
        """The settings from widget values (a node's, an HTTP body's, a script's), checked as on construction.

        A value that is missing or None (a widget whose link gave nothing) takes the field's default; a
        number given as text, or an int for a FLOAT widget, is converted to the widget's type. A name that
        is none of the settings is refused (a misspelt input would otherwise train at the default), unless
        it is in `others`: inputs read by another consumer of the same values."""
        declared = specs(cls)
        known = set(declared) | set(others)
        unknown = [name for name in values if name not in known]
        if unknown:
            raise SettingError(f"{cls.TITLE}: {unknown[0]} = {values[unknown[0]]!r} is not an input of this node. "
                               f"Use one of: {', '.join(declared)}.")
        return cls(**{name: _widget_value(cls.TITLE, name, values[name], default)
                      for name, (default, _) in declared.items() if values.get(name) is not None})


def _widget_value(title: str, name: str, value: Any, default: Any) -> Any:
    """`value` in the type of the widget's default where it is a number in another spelling; anything
    else unchanged (validate() then names what is wrong with it)."""
    if isinstance(default, bool) or not isinstance(default, (int, float)) or isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise SettingError(f"{title}: {name} = {value!r} must be a number (default {default}).") from None
    if not isinstance(number, (int, float)):
        return value
    if isinstance(default, int):
        return int(number) if float(number).is_integer() else number
    return float(number)


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field that is a node widget (see :class:`Spec` for the keywords)."""
    return field(default=default, metadata={"setting": Spec(help=help, **spec)})


def setting_like(cls, name: str) -> Any:
    """The same widget as `cls`'s field `name` (default, range, choices, help): for a node that offers
    one of another node's settings, so both stay one source."""
    item = cls.__dataclass_fields__[name]
    return field(default=item.default, metadata=dict(item.metadata))


def specs(cls) -> dict[str, tuple[Any, Spec]]:
    """{field name: (default, spec)} of a settings dataclass, in declaration order."""
    out = {}
    for item in fields(cls):
        spec = item.metadata.get("setting")
        if spec is not None:
            out[item.name] = (item.default if item.default is not MISSING else None, spec)
    return out


def validate(instance, title: str) -> None:
    """Check every setting field of `instance` against its spec; raise SettingError on the first bad one."""
    for name, (default, spec) in specs(type(instance)).items():
        value = getattr(instance, name)
        problem = _problem(value, default, spec)
        if problem:
            raise SettingError(f"{title}: {name} = {value!r} {problem}")


def _problem(value: Any, default: Any, spec: Spec) -> str | None:
    if spec.check is not None:   # first: its message is the more specific one
        problem = spec.check(value)
        if problem:
            return problem
    if spec.choices is not None:
        if value not in spec.choices:
            return f"is unknown. Use one of: {', '.join(spec.choices)}."
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            return "must be true or false."
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number (default {default})."
        if isinstance(default, int) and not isinstance(default, bool) and not float(value).is_integer():
            return "must be a whole number."
        if not math.isfinite(value):
            return "must be a finite number."
        hint = f" {spec.hint}" if spec.hint else ""
        if spec.min is not None and value < spec.min:
            return f"must be at least {spec.min:g}{hint}."
        if spec.max is not None and value > spec.max:
            return f"must be at most {spec.max:g}{hint}."
    elif isinstance(default, str) and not isinstance(value, str):
        return "must be text."
    return None
