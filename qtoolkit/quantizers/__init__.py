"""Quantizer registry: string names at the YAML/checkpoint boundary, classes inside.

    register(name)   class decorator; refuses a name that is already taken
    get(name)        the registered class; an unknown name lists the available ones
    available()      sorted registered names
    build(spec)      a quantizer instance from a spec: "ternary" or {"name": "ternary", "alpha": ...}
    canonical(spec)  the spec with every option filled in (what checkpoints store)
    register_alias(alias, spec)  a short name for a spec ("int4" = intn, bits 4, group 128);
                     an alias is accepted wherever a name is (policies, `--formats`) and its
                     options can be overridden ({"name": "int4", "symmetric": true}); aliases()
                     lists them; canonical specs (and so checkpoints) hold the real name

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
_ALIASES: dict[str, dict[str, Any]] = {}


def register(name: str):
    def decorator(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY:
            raise ValueError(f"quantizer {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def register_alias(alias: str, spec: dict[str, Any]) -> None:
    if alias in _REGISTRY or alias in _ALIASES:
        raise ValueError(f"quantizer name {alias!r} is already taken")
    _ALIASES[alias] = dict(spec)


def available() -> list[str]:
    return sorted(_REGISTRY)


def aliases() -> dict[str, dict[str, Any]]:
    """{alias: the spec it stands for}, sorted by alias."""
    return {k: dict(_ALIASES[k]) for k in sorted(_ALIASES)}


def alias_of(spec: dict[str, Any]) -> str | None:
    """The alias whose canonical spec equals `spec` (a canonical spec), if any."""
    for alias in sorted(_ALIASES):
        if canonical(alias) == spec:
            return alias
    return None


def get(name: str) -> type[Quantizer]:
    """The class of a registered name or of an alias's quantizer."""
    try:
        return _REGISTRY[_ALIASES[name]["name"] if isinstance(name, str) and name in _ALIASES else name]
    except (KeyError, TypeError):
        names = ", ".join(available() + sorted(_ALIASES))
        raise UnknownNameError(f"unknown quantizer {short_repr(name)}; available: {names}") from None


def split_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """"name" | {"name": name, **options} -> (name, options); an alias becomes its spec."""
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        name, options = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        name = None
    if name in _ALIASES:
        base = _ALIASES[name]
        return base["name"], {**{k: v for k, v in base.items() if k != "name"}, **options}
    if name is not None:
        return name, options
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


def catalog(shape: tuple[int, int] = (768, 768)) -> list[dict[str, Any]]:
    """What `qtool quantizers` lists: every registered quantizer with its default options, then every
    alias with the spec it stands for ("alias_of"), each with its exact bits per weight on `shape`."""
    rows = []
    for name in [*available(), *sorted(_ALIASES)]:
        q = build(name)
        rows.append({"name": name, "alias_of": _ALIASES[name]["name"] if name in _ALIASES else None,
                     "spec": q.spec(), "bits_per_weight_768x768" if shape == (768, 768) else "bits_per_weight":
                     float(q.bits_per_weight(shape)), "calibration": bool(q.calibration)})
    return rows


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
from qtoolkit.quantizers import binary, floats, int8, intn, ptqtp, sherry, tequila, ternary  # noqa: E402,F401
from qtoolkit.quantizers.correction import Corrected, CorrectionConfig  # noqa: E402

__all__ = ["Corrected", "CorrectionConfig", "QTensor", "Quantizer", "alias_of", "aliases", "available", "build", "canonical",
           "catalog", "get", "register", "register_alias", "split_spec"]
