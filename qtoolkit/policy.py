"""Per-layer precision policies: module-name patterns -> quantizer specs.

A policy is an ordered mapping, as in a recipe:

    policy:
      _default: ternary                       # every nn.Linear not matched below (lm_head included)
      "blocks[0, -1]": int8                   # block selector: first and last block, any depth
      "re:blocks\\.[0-3]\\.mlp\\..*": fp16     # regex, full match on the module name
      lm_head: {name: int8}                   # exact module name
      embed: int8                             # nn.Embedding is only quantized when named

Block selectors make a policy portable across depths: `blocks[SEL]` or `blocks[SEL].REST`, where SEL
is a comma list of Python indices and slices over the blocks (`0`, `-1`, `2:-2`, `:3`) and REST is
a glob on the rest of the name (`mlp.*`, `attn.q_proj`); without REST every module of the selected
blocks matches. They rank with regexes. `blocks` stands for the model's block list wherever it lives:
`find_blocks` looks for the common layouts (`blocks` as in `DecoderLM`, `model.layers` as in Llama-style
Hugging Face models, `transformer.h` as in GPT-2, ...), and `apply_policy(model, policy, blocks="enc.layer")`
names it for any other model. So `blocks[0].mlp.*` matches `model.layers.0.mlp.up_proj` on a Llama.

Precedence: exact name > `re:` regex or block selector (first in file order) > `_default`. Modules no rule claims stay
unquantized, stored in fp32 (the coverage report calls them `fp32`, the name of the quantizer that
stores them). Every exact name and every regex must end up assigning at least one module: a typo or
a rule fully shadowed by higher-priority rules is an error, never a silent no-op. A rule that is
valid but assigns nothing *on this model* is a warning (`Coverage.warnings`): a block selector that
selects no block at this depth (`blocks[1:-1]` of a 2-block model), or a `_default` left with no
module (`ternary_middle` on a 2-block model: its first and last block are every block). With tied embeddings, `embed` and `lm_head` share one weight and therefore one
quantizer; giving them different specs is an error, and naming only one assigns both.

The policy works on any `nn.Module`: its `nn.Linear` and `nn.Embedding` submodules are the targets,
named as `named_modules()` names them.

A policy file (e.g. search output) holds the same mapping, optionally under a top-level `policy:` key.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qtoolkit import quantizers
from qtoolkit.errors import PolicyError, QToolkitError, short_repr
from qtoolkit.layers import (
    FROZEN_MODULES,
    QUANT_MODULES,
    FrozenQuantEmbedding,
    QuantEmbedding,
    QuantLinear,
)
from qtoolkit.schema import SchemaError
from qtoolkit.yamlsafe import read_yaml_file

DEFAULT = "_default"
UNQUANTIZED = "fp32"  # what coverage calls a module no rule assigns: it is stored by the fp32 quantizer
REGEX_PREFIX = "re:"
SELECTOR = re.compile(r"blocks\[([^\]]*)\](?:\.(.+))?")


def _is_pattern(key: str) -> bool:
    return key.startswith(REGEX_PREFIX) or SELECTOR.fullmatch(key) is not None


def _selected_blocks(sel: str, n_layers: int) -> list[int]:
    """Python-style indices/slices over range(n_layers): "0, -1", "2:-2", ":3"."""
    blocks = list(range(n_layers))
    chosen: list[int] = []
    for part in (p.strip() for p in sel.split(",")):
        try:
            bounds = [int(b) if b.strip() else None for b in part.split(":")]
        except ValueError:
            bounds = []
        if not part or not 1 <= len(bounds) <= 3:
            raise PolicyError(f"bad block selector item {short_repr(part)} in [{sel}]")
        if len(bounds) > 1:
            chosen += blocks[slice(*bounds)]
        elif bounds[0] is None or not -n_layers <= bounds[0] < n_layers:
            raise PolicyError(f"block {short_repr(part)} out of range for a model with {n_layers} blocks")
        else:
            chosen.append(blocks[bounds[0]])
    return sorted(set(chosen))


def _glob(text: str) -> str:
    """Glob -> regex: `*` any run of characters, `?` one character, everything else literal."""
    return re.escape(text).replace(r"\*", ".*").replace(r"\?", ".")


# Where common model families keep their list of transformer blocks, most specific first.
BLOCK_LISTS = ("blocks", "model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
               "transformer.blocks", "encoder.layer", "layers", "h")


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList] | None:
    """(name, block list) of a model: the submodule named `blocks`, or the first of `BLOCK_LISTS`
    that is an nn.ModuleList / nn.Sequential; None when the model has none (and none was named)."""
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise PolicyError(f"blocks={blocks!r}: the model has no submodule of that name") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise PolicyError(f"blocks={blocks!r} is a {type(found).__name__}, not a list of blocks "
                              "(nn.ModuleList or nn.Sequential)")
        return blocks, found
    for name in BLOCK_LISTS:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) > 0:
            return name, found
    return None


def compile_pattern(key: str, n_layers: int | None = None, prefix: str = "blocks") -> re.Pattern:
    """The regex a `re:` or `blocks[...]` policy key stands for (`prefix`: the block list's name)."""
    if key.startswith(REGEX_PREFIX):
        return re.compile(key[len(REGEX_PREFIX):])
    m = SELECTOR.fullmatch(key)
    if m is None:
        raise PolicyError(f"{key!r} is not a pattern")
    if n_layers is None:  # syntax check only
        _selected_blocks(m.group(1), 10**6)
        n_layers = 0
    indices = _selected_blocks(m.group(1), n_layers) if n_layers else []
    rest = rf"\.(?:{_glob(m.group(2))})" if m.group(2) else r"(?:\..*)?"  # no REST: the block and all inside it
    return re.compile(rf"{re.escape(prefix)}\.({'|'.join(map(str, indices)) or '(?!)'}){rest}")


@dataclass
class LayerAssignment:
    name: str
    module_type: str  # "linear" | "embedding"
    shape: tuple[int, int]  # weight shape (rows, cols)
    spec: dict[str, Any] | None  # canonical quantizer spec; None = no rule: stays unquantized (fp32)
    rule: str | None  # the policy key that assigned it
    tied_to: str | None = None  # shares its weight with this (earlier) module

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def quantizer(self) -> str:
        return self.spec["name"] if self.spec else UNQUANTIZED


@dataclass
class Coverage:
    """What a policy did (or would do) to each quantizable module, in model order."""

    layers: list[LayerAssignment]
    tied: bool = False
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (policy key, why it assigns nothing)

    def params_by_quantizer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.layers:
            if a.tied_to is None:  # a shared weight counts once
                out[a.quantizer] = out.get(a.quantizer, 0) + a.numel
        return out

    def unquantized(self) -> list[str]:
        return [a.name for a in self.layers if a.spec is None]

    def to_dict(self) -> dict[str, Any]:
        return {"tied": self.tied, "layers": [a.__dict__ | {"shape": list(a.shape)} for a in self.layers],
                "warnings": [list(w) for w in self.warnings]}


@dataclass
class Policy:
    rules: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, source: Policy | dict[str, Any] | str | Path) -> Policy:
        """From a Policy, a mapping, or the path of a YAML policy file."""
        if isinstance(source, Policy):
            return source
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise PolicyError(f"policy file not found: {path}")
            data = read_yaml_file(path, "policy file", PolicyError)
            if isinstance(data, dict) and set(data) == {"policy"}:
                data = data["policy"]
            source = data
        if not isinstance(source, dict) or not source:
            raise PolicyError(f"a policy is a non-empty mapping of pattern -> quantizer spec, got {short_repr(source)}")
        policy = cls(dict(source))
        errors = policy.check()
        if errors:
            raise SchemaError(errors, "policy")
        return policy

    def check(self, path: str = "policy") -> list[tuple[str, str]]:
        """Validate patterns and specs without a model; (key path, message) pairs."""
        errors = []
        for pattern, spec in self.rules.items():
            key = f"{path}.{pattern}"
            if not isinstance(pattern, str) or not pattern:
                errors.append((key, "pattern must be a non-empty string"))
                continue
            if _is_pattern(pattern):
                try:
                    compile_pattern(pattern)
                except re.error as e:
                    errors.append((key, f"invalid regex: {e}"))
                except PolicyError as e:
                    errors.append((key, str(e)))
            try:
                quantizers.build(spec, path=key)
            except SchemaError as e:
                errors.extend(e.errors)
            except QToolkitError as e:
                errors.append((key, str(e)))
        return errors

    def to_dict(self) -> dict[str, Any]:
        return dict(self.rules)

    def resolve(self, model: nn.Module, blocks: str | None = None) -> Coverage:
        """Assign a canonical spec to every quantizable module, without changing the model.
        `blocks` names the block list that `blocks[...]` selectors index (default: `find_blocks`)."""
        targets = _targets(model)
        exact = {p: s for p, s in self.rules.items() if p != DEFAULT and not _is_pattern(p)}
        selectors = [p for p in self.rules if SELECTOR.fullmatch(p)]
        found = find_blocks(model, blocks) if selectors or blocks is not None else None
        prefix, n_layers = (found[0], len(found[1])) if found else ("blocks", 0)
        problems: list[tuple[str, str]] = []  # (policy key, what is wrong)
        if selectors and found is None:
            problems += [(p, f"a block selector needs the model's block list, and this {type(model).__name__} has "
                          f"none of {', '.join(BLOCK_LISTS)}; name it: apply_policy(model, policy, blocks=NAME)")
                         for p in selectors]
        warnings: list[tuple[str, str]] = []  # (policy key, why it assigns nothing here)
        regexes = []
        for pattern, spec in self.rules.items():
            if _is_pattern(pattern) and not (SELECTOR.fullmatch(pattern) and found is None):
                try:
                    rx = compile_pattern(pattern, n_layers, prefix)
                except PolicyError as e:
                    problems.append((pattern, str(e)))
                    continue
                m = SELECTOR.fullmatch(pattern)
                if m is not None and (not n_layers or not _selected_blocks(m.group(1), n_layers)):
                    warnings.append((pattern, f"selects no block of this {n_layers}-block model, so it assigns nothing"))
                    continue
                regexes.append((pattern, rx, spec))
        for name in exact:
            if name not in targets:
                close = difflib.get_close_matches(name, list(targets), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                problems.append((name, f"matches no quantizable module{hint}"))
        claims: dict[str, int] = {p: 0 for p, _, _ in regexes}
        assigned: dict[str, tuple[Any, str | None]] = {}
        for name, module in targets.items():
            if name in exact:
                assigned[name] = (exact[name], name)
                continue
            for pattern, rx, spec in regexes:
                if rx.fullmatch(name):
                    assigned[name] = (spec, pattern)
                    claims[pattern] += 1
                    break
            else:
                if DEFAULT in self.rules and isinstance(module, nn.Linear):
                    assigned[name] = (self.rules[DEFAULT], DEFAULT)
                else:
                    assigned[name] = (None, None)
        for pattern, rx, _ in regexes:
            if claims[pattern] == 0:
                if any(rx.fullmatch(n) for n in targets):
                    problems.append((pattern, "only matches modules already claimed by higher-priority rules"))
                else:
                    problems.append((pattern, "matches no quantizable module"))
        if problems:
            raise PolicyFitError(problems)

        # one weight, one quantizer: an explicit rule for any module sharing it decides for all of them
        tied_to: dict[str, str] = {}
        for names in _shared_weights(targets):
            explicit = [n for n in names if assigned[n][1] not in (None, DEFAULT)]
            specs = {json.dumps(quantizers.canonical(assigned[n][0]), sort_keys=True) for n in explicit}
            if len(specs) > 1:
                detail = ", ".join(f"{n}={quantizers.canonical(assigned[n][0])}" for n in explicit)
                raise PolicyFitError([(
                    explicit[0],
                    f"{' and '.join(names)} share one weight (tied) but the policy gives them different "
                    f"quantizers: {detail}",
                )])
            linears = [n for n in names if isinstance(targets[n], nn.Linear)]
            decider = explicit[0] if explicit else (linears or names)[0]
            for n in names:
                assigned[n] = assigned[decider]
            tied_to.update({n: names[0] for n in names[1:]})

        if DEFAULT in self.rules and not any(rule == DEFAULT for _, rule in assigned.values()):
            warnings.append((DEFAULT, "assigns no module: higher-priority rules claim every module of this model"))
        layers, misfits = [], []
        for name, module in targets.items():
            spec, rule = assigned[name]
            built = quantizers.build(spec) if spec is not None else None
            if built is not None and built.linear_only and isinstance(module, nn.Embedding):
                misfits.append((rule or name, f"{name} is an embedding; {_describe(built)} applies to linear "
                                "layers only (a lookup has no input to multiply)"))
            layers.append(LayerAssignment(
                name=name,
                module_type="embedding" if isinstance(module, nn.Embedding) else "linear",
                shape=tuple(module.weight.shape),
                spec=built.spec() if built is not None else None,
                rule=rule,
                tied_to=tied_to.get(name),
            ))
        if misfits:
            raise PolicyFitError(misfits)
        return Coverage(layers, tied=bool(tied_to), warnings=warnings)


def _describe(q: quantizers.Quantizer) -> str:
    return "a low-rank correction" if isinstance(q, quantizers.Corrected) else f"quantizer {q.name!r}"


class PolicyFitError(PolicyError):
    """A policy that validates but does not fit a model; `problems` holds (policy key, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("policy does not fit the model:\n" + "\n".join(f"  {k}: {m}" for k, m in problems))


def _targets(model: nn.Module, frozen: bool = False) -> dict[str, nn.Module]:
    """Quantizable modules by name (with `frozen`, also the deployed forms of quantized ones)."""
    kinds = (nn.Linear, nn.Embedding, *FROZEN_MODULES) if frozen else (nn.Linear, nn.Embedding)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def _shared_weights(targets: dict[str, nn.Module]) -> list[list[str]]:
    """Groups (in model order) of target modules that hold the same weight tensor."""
    groups: dict[int, list[str]] = {}
    for name, module in targets.items():
        groups.setdefault(id(module.weight), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def live_coverage(model: nn.Module) -> Coverage:
    """The coverage a model carries: what each of its quantizable modules is now (quantized modules
    report their quantizer's spec and the rule that chose it; plain ones stay float32)."""
    targets = _targets(model, frozen=True)
    tied_to = {n: names[0] for names in _shared_weights(targets) for n in names[1:]}
    layers = []
    for name, module in targets.items():
        q = getattr(module, "quantizer", None)
        layers.append(LayerAssignment(
            name=name,
            module_type="embedding" if isinstance(module, (nn.Embedding, FrozenQuantEmbedding)) else "linear",
            shape=tuple(module.weight.shape),
            spec=q.spec() if q is not None else None,
            rule=getattr(module, "rule", None) or ("(model)" if q is not None else None),
            tied_to=tied_to.get(name),
        ))
    return Coverage(layers, tied=bool(tied_to))


def set_by_name(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    """Replace the submodule or parameter at dotted `name` ("blocks.0.attn.q_proj", "norm.weight")."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, value)


def build_model(model_config, policy: Policy | dict[str, Any] | str | Path):
    """A DecoderLM of `model_config` with `policy` applied: (model, coverage)."""
    from qtoolkit.model import DecoderLM

    model = DecoderLM(model_config)
    return model, apply_policy(model, policy)


def apply_policy(model: nn.Module, policy: Policy | dict[str, Any] | str | Path, blocks: str | None = None
                 ) -> Coverage:
    """Swap every module the policy assigns for its quantized version, in place, on any nn.Module.
    `blocks` names the block list for `blocks[...]` selectors when `find_blocks` does not find it."""
    if any(isinstance(m, (*QUANT_MODULES, *FROZEN_MODULES)) for m in model.modules()):
        raise PolicyError("model is already quantized; apply a policy to a float model")
    coverage = Policy.load(policy).resolve(model, blocks)
    shared: dict[int, quantizers.Quantizer] = {}  # id(weight) -> quantizer (tied weights)
    for a in coverage.layers:
        if a.spec is None:
            continue
        module = model.get_submodule(a.name)
        key = id(module.weight)
        if key not in shared:
            shared[key] = quantizers.build(a.spec)
        cls = QuantEmbedding if isinstance(module, nn.Embedding) else QuantLinear
        quantized = cls.from_float(module, shared[key])
        quantized.rule = a.rule
        set_by_name(model, a.name, quantized)
    return coverage
