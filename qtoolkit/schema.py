"""Build dataclasses from plain dicts (parsed YAML), collecting *every* error with its key path.

Used for recipes and quantizer options. Type hints drive the checks: int, float, str, bool,
`Literal[...]`, `X | None`, `list[X]`, `dict[str, X]`, `Any` and nested dataclasses. A dataclass may
define `check(self) -> list[tuple[str, str]]` returning (field, message) pairs for cross-field
rules; those are reported with the same key paths. check() runs even when some fields are wrong
(they take their defaults, a failed nested section is None, and check() errors about them are
dropped), so one pass reports as much as possible.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union

from qtoolkit.errors import QToolkitError, short_repr

T = TypeVar("T")
MAX_LISTED = 20  # errors listed in one message


class SchemaError(QToolkitError, ValueError):
    """One or more validation errors, each with the key path it concerns."""

    def __init__(self, errors: list[tuple[str, str]], what: str = "config"):
        self.errors = errors
        self.what = what
        if len(errors) == 1:  # one problem, one line
            path, msg = errors[0]
            super().__init__(f"{what}: {path or '<root>'}: {msg}")
        else:
            lines = [f"  {path or '<root>'}: {msg}" for path, msg in errors[:MAX_LISTED]]
            if len(errors) > MAX_LISTED:
                lines.append(f"  ... and {len(errors) - MAX_LISTED} more")
            super().__init__(f"{len(errors)} errors in {what}:\n" + "\n".join(lines))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    key = key if len(key) <= 60 else key[:57] + "..."
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    """Check `value` against type `tp`; append errors; return the converted value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for candidate in non_none:
            trial: list[tuple[str, str]] = []
            out = convert(candidate, value, path, trial)
            if not trial:
                return out
        if len(non_none) == 1:  # Optional[X]: report X's own error
            return convert(non_none[0], value, path, errors)
        errors.append((path, f"expected {' or '.join(_type_name(a) for a in args)}, got {short_repr(value)}"))
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            errors.append((path, f"must be one of {', '.join(repr(a) for a in allowed)}; got {short_repr(value)}"))
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            errors.append((path, f"expected a list, got {short_repr(value)}"))
            return value
        return [convert(item_tp, v, _join(path, i), errors) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            errors.append((path, f"expected a mapping, got {short_repr(value)}"))
            return value
        return {k: convert(val_tp, v, _join(path, str(k)), errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append((path, f"expected true or false, got {short_repr(value)}"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            errors.append((path, f"expected an integer, got {short_repr(value)}"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
                try:
                    value = float(value)
                except ValueError:
                    errors.append((path, f"expected a number, got {short_repr(value)}"))
                    return value
            else:
                errors.append((path, f"expected a number, got {short_repr(value)}"))
                return value
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):  # .nan, .inf: never a meaningful setting
            errors.append((path, f"must be a finite number, got {value}"))
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append((path, f"expected a string, got {short_repr(value)}"))
        return value
    raise TypeError(f"schema: unsupported type {tp!r} at {path}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # slow (evaluates string annotations): once per class


def _build(cls: type[T], data: Any, path: str, errors: list[tuple[str, str]]) -> T:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append((path, f"expected a mapping, got {short_repr(data)}"))
        return None  # type: ignore[return-value]
    hints = _hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in flds:
            errors.append((_join(path, str(key)), f"unknown key (allowed: {', '.join(flds)})"))
    kwargs = {}
    failed: set[str] = set()  # fields of this class that are wrong (nested sections become None)
    for name, f in flds.items():
        if name in data:
            n_before = len(errors)
            kwargs[name] = convert(hints[name], data[name], _join(path, name), errors)
            if len(errors) > n_before:
                failed.add(name)
                if dataclasses.is_dataclass(hints[name]):
                    kwargs[name] = None
                elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    return None  # type: ignore[return-value]  # a required field is wrong: nothing to check
                else:
                    del kwargs[name]  # check() below sees the default instead
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append((_join(path, name), "required key is missing"))
            return None  # type: ignore[return-value]
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:  # cross-field rules; check() must tolerate None nested sections
        errors.extend((_join(path, k) if k else path, m) for k, m in check() if k.split(".")[0] not in failed)
    return None if failed else obj  # type: ignore[return-value]


def from_dict(cls: type[T], data: Any, what: str = "config", path: str = "") -> T:
    """Build `cls` from `data`, raising `SchemaError` that lists every problem found."""
    errors: list[tuple[str, str]] = []
    obj = _build(cls, data, path, errors)
    if errors:
        raise SchemaError(errors, what)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain dicts (recursively), for YAML/checkpoint storage."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------ single arguments

MAX_SEED = 2**32 - 1  # every RNG the toolkit seeds (torch, numpy, Optuna's samplers) takes this range


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum], or ConfigError naming the option."""
    from qtoolkit.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {short_repr(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f">= {minimum:,}" if maximum is None else f"<= {maximum:,}" if minimum is None
                  else f"in [{minimum:,}, {maximum:,}]")
        raise ConfigError(f"{name} must be {bounds}, got {short_repr(value)}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    return check_int(value, name, 0, MAX_SEED)


def check_number(value: Any, name: str, minimum: float | None = None, positive: bool = False) -> float:
    """`value` as a finite float (> 0 if `positive`, >= `minimum` if given), or ConfigError."""
    from qtoolkit.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {short_repr(value)}")
    if positive and not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return float(value)
