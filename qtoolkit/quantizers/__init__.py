"""Quantizer registry: string names at the YAML/checkpoint boundary, classes inside.

    register(name)   class decorator; refuses a name that is already taken
    get(name)        the registered class; an unknown name lists the available ones
    available()      sorted registered names
    build(spec)      a quantizer instance from a spec: "ternary" or {"name": "ternary", "alpha": ...}
    canonical(spec)  the spec with every option filled in (what checkpoints store)

A spec may carry `correction: {rank: ...}` on top of any quantizer's options: `build` then wraps the
quantizer in the low-rank gated correction (`correction.py`); its canonical spec keeps the key.

Adding a quantizer: one module in this package that defines a `Quantizer` subclass decorated with
`@register("name")`, imported at the bottom of this file, plus its tests (docs/adding_a_quantizer.md).
"""

from __future__ import annotations

from typing import Any

from qtoolkit import schema
from qtoolkit.errors import ConfigError, UnknownNameError, short_repr
from qtoolkit.quantizers.base import QTensor, Quantizer

_REGISTRY: dict[str, type[Quantizer]] = {}


def register(name: str):
    def decorator(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY:
            raise ValueError(f"quantizer {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Quantizer]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown quantizer {short_repr(name)}; available: {', '.join(available())}") from None


def split_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """"name" | {"name": name, **options} -> (name, options)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return spec["name"], {k: v for k, v in spec.items() if k != "name"}
    raise ConfigError(f"a quantizer spec is a name or a mapping with a 'name' key, got {short_repr(spec)}")


def build(spec: Any, path: str = "") -> Quantizer:
    name, options = split_spec(spec)
    correction = options.pop("correction", None)
    quantizer = get(name).from_options(options, path=path)
    if correction is None:
        return quantizer
    where = f"{path}.correction" if path else "correction"
    config = schema.from_dict(CorrectionConfig, correction, what="correction options", path=where)
    return Corrected(quantizer, config)


_CANONICAL: dict[Any, dict[str, Any]] = {}


def canonical(spec: Any) -> dict[str, Any]:
    """The full spec ({"name", every option}) of a spec; memoized, since policies on models of
    thousands of layers ask for the same few specs thousands of times."""
    try:
        key = spec if isinstance(spec, str) else (type(spec), tuple(sorted(spec.items())))
        hash(key)
    except (AttributeError, TypeError):  # not a name or a flat mapping: validate without the memo
        return build(spec).spec()
    if key not in _CANONICAL:
        _CANONICAL[key] = build(spec).spec()
    return dict(_CANONICAL[key])


# Built-in quantizers register themselves on import.
from qtoolkit.quantizers import binary, floats, int8, sherry, tequila, ternary  # noqa: E402,F401
from qtoolkit.quantizers.correction import Corrected, CorrectionConfig  # noqa: E402

__all__ = ["Corrected", "CorrectionConfig", "QTensor", "Quantizer", "available", "build", "canonical", "get", "register", "split_spec"]
