"""What a loaded checkpoint must satisfy before anything is built from it.

`qtoolkit.checkpoint.load_checkpoint` calls these after reading a file (and after checking its
bytes: CRC32s or digest). A file's model config is a promise about its tensors; nothing is
allocated from the config until the promise is checked against the tensors actually stored, which
are bounded by the file's size. So a 2 MB file that claims a 10^9-token vocabulary, or 10^6 layers,
is refused in milliseconds instead of asking for terabytes (or, worse, for 16 GiB, which succeeds).

Training checkpoints (`check_train`):
    1. the config is a valid ModelConfig;
    2. arithmetic first: the config's parameter count (`ModelConfig.num_params`, no model built)
       equals the number of float weights stored;
    3. then exactly: every stored latent weight has the name and shape of the config's model (built
       on the `meta` device: shapes only, no memory), none is missing; quantizer state (learned
       scales) belongs to a module the policy quantizes and is no larger than its weight;
    4. every floating-point tensor of the model is finite (a diverged run's weights are refused).

Packed checkpoints (`check_packed`):
    1. the config is valid; the layer list is a list of records, the policy a mapping;
    2. each record's stored tensors are exactly its quantizer's layout for the record's shape (so
       the shapes, too, are bounded by the bytes stored), and no tensor is left over;
    3. the records' parameter count equals the config's, then names, kinds and shapes equal the
       config's model (on `meta`) entry for entry; ties only where the config ties embeddings;
    4. every floating-point tensor (scales, fp16/fp32 values) is finite.

Every failure is a `CheckpointError` naming the file and the first few problems.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit import quantizers
from qtoolkit.config import ModelConfig
from qtoolkit.errors import CheckpointError, QToolkitError, short_repr
from qtoolkit.model import meta_model
from qtoolkit.policy import Policy

_SHOW = 3  # problems listed in a message


def _fail(path: Path | str, what: str, problems: list[str]) -> CheckpointError:
    more = f" (and {len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
    return CheckpointError(f"{path}: {what}: {'; '.join(problems[:_SHOW])}{more}")


def model_config(path: Path | str, raw: Any) -> ModelConfig:
    """The checkpoint's ModelConfig, or a CheckpointError saying why it is not one."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: model_config is not a mapping ({short_repr(raw)})")
    try:
        return ModelConfig.from_dict(raw)
    except QToolkitError as e:
        raise CheckpointError(f"{path}: invalid model_config: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model_config: {short_repr(str(e), 160)}") from None


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def check_finite(path: Path | str, tensors: dict[str, Any], what: str = "tensor") -> None:
    """Refuse NaN or inf in any floating-point tensor (one pass, one host sync per tensor)."""
    bad = [name for name, t in tensors.items()
           if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise _fail(path, "holds NaN or inf values, so it was written by a diverged run and cannot be used "
                          f"(use an earlier checkpoint); non-finite {what}", bad)


# ------------------------------------------------------------------------------ training checkpoints


def check_train(path: Path | str, obj: dict[str, Any]) -> ModelConfig:
    """Structure of a training checkpoint (module docstring); returns its ModelConfig."""
    cfg = model_config(path, obj["model_config"])
    state, policy = obj["model"], obj["policy"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: the model entry is not a state dict of named tensors")
    if not isinstance(policy, dict) or not policy:
        raise CheckpointError(f"{path}: the policy entry is not a non-empty mapping ({short_repr(policy)})")
    latent = {k: v for k, v in state.items() if ".quantizer." not in k}
    stored = sum(v.numel() for k, v in latent.items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    expected_n = cfg.num_params()
    if stored != expected_n:
        raise CheckpointError(
            f"{path}: model_config describes {expected_n:,} parameters but the file stores {stored:,} "
            "weights: the config does not belong to these tensors (damaged or edited checkpoint)"
        )
    model = meta_model(cfg)
    expected = {k: _shape(v) for k, v in model.state_dict().items()}
    problems = [f"{k}: missing" for k in expected if k not in latent]
    problems += [f"{k}: not in the model" for k in latent if k not in expected]
    problems += [f"{k}: shape {list(_shape(v))}, the config gives {list(expected[k])}"
                 for k, v in latent.items() if k in expected and _shape(v) != expected[k]]
    if problems:
        raise _fail(path, "weights do not match model_config", problems)
    _check_quantizer_state(path, cfg, policy, model, state)
    check_finite(path, state, "weight")
    return cfg


def _check_quantizer_state(path, cfg: ModelConfig, policy: dict[str, Any], model: nn.Module,
                           state: dict[str, Tensor]) -> None:
    try:
        coverage = Policy(dict(policy)).resolve(model)
    except QToolkitError as e:
        raise CheckpointError(f"{path}: its policy does not fit its model: {short_repr(str(e), 200)}") from None
    except Exception as e:  # a hostile policy (wrong types) must not escape as a traceback
        raise CheckpointError(f"{path}: invalid policy ({type(e).__name__}: {short_repr(str(e), 120)})") from None
    quantized = {a.name: a.numel for a in coverage.layers if a.spec is not None}
    problems = []
    for key, t in state.items():
        if ".quantizer." not in key:
            continue
        owner = key.split(".quantizer.")[0]
        if owner not in quantized:
            problems.append(f"{key}: quantizer state of a module the policy does not quantize")
        elif t.numel() > quantized[owner]:
            problems.append(f"{key}: {t.numel():,} values for a weight of {quantized[owner]:,}")
    if problems:
        raise _fail(path, "quantizer state does not match the policy", problems)


# ------------------------------------------------------------------------------ packed checkpoints


def expected_entries(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{entry name: (kind, shape)} of the config's model, in the packed format's terms: each
    nn.Linear / nn.Embedding ("linear" / "embedding") and every other parameter ("param")."""
    model = meta_model(cfg)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    owned: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            out[name] = ("embedding" if isinstance(m, nn.Embedding) else "linear", _shape(m.weight))
            owned.update(f"{name}.{n}" for n, _ in m.named_parameters())
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in owned:
            out[name] = ("param", _shape(p))
    return out


def _record_problems(layer: Any, tensors: dict[str, Tensor]) -> tuple[list[str], int]:
    """Problems of one layer record against its stored tensors; (problems, params it claims)."""
    if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
        return [f"layer record {short_repr(layer)} has no name"], 0
    name = layer["name"]
    shape = layer.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        return [f"{name}: bad shape {short_repr(shape)}"], 0
    if layer.get("kind") not in ("linear", "embedding", "param"):
        return [f"{name}: unknown kind {short_repr(layer.get('kind'))}"], 0
    numel = math.prod(shape)
    refs = layer.get("tensors")
    if not isinstance(refs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in refs.items()):
        return [f"{name}: bad tensor list {short_repr(refs)}"], 0
    if layer.get("tied_to") is not None:
        return ([f"{name}: a tied entry stores tensors"] if refs else []), 0
    try:
        layout = quantizers.build(layer.get("spec")).layout(tuple(shape) if len(shape) == 2 else (1, numel))
    except QToolkitError as e:
        return [f"{name}: bad quantizer spec ({short_repr(str(e), 120)})"], 0
    except Exception as e:  # a spec of the wrong type
        return [f"{name}: bad quantizer spec ({type(e).__name__})"], 0
    if set(refs) != set(layout):
        return [f"{name}: stores {sorted(refs)}, its format stores {sorted(layout)}"], numel
    problems = []
    for suffix, key in refs.items():
        t = tensors.get(key)
        if t is None:
            problems.append(f"{name}: tensor {key} is missing")
        elif not layout[suffix].matches(t):
            problems.append(f"{name}.{suffix}: {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, its "
                            f"shape {shape} needs {str(layout[suffix].dtype).removeprefix('torch.')} "
                            f"{list(layout[suffix].shape)}")
    return problems, numel


def check_packed(path: Path | str, obj: dict[str, Any]) -> ModelConfig | None:
    """Structure of a packed checkpoint (module docstring); returns its ModelConfig. A file of a
    module that is not a DecoderLM (`pack.save_packed(net, path)`) has no model_config: its layer
    records are checked against its tensors, and there is no config to check them against."""
    cfg = None if obj["model_config"] is None else model_config(path, obj["model_config"])
    layers, tensors = obj["layers"], obj["tensors"]
    if not isinstance(obj["policy"], dict):
        raise CheckpointError(f"{path}: the policy entry is not a mapping ({short_repr(obj['policy'])})")
    if not isinstance(layers, list) or not layers:
        raise CheckpointError(f"{path}: the layer list is not a non-empty list ({short_repr(layers)})")
    problems, claimed = [], 0
    for layer in layers:
        p, n = _record_problems(layer, tensors)
        problems += p
        claimed += n
    if problems:
        raise _fail(path, "layer records do not match the stored tensors", problems)
    referenced = {key for layer in layers for key in layer["tensors"].values()}
    extra = sorted(set(tensors) - referenced)
    if extra:
        raise _fail(path, "tensors that no layer record uses", extra)
    if cfg is None:
        check_finite(path, tensors)
        return None
    if claimed != cfg.num_params():
        raise CheckpointError(
            f"{path}: model_config describes {cfg.num_params():,} parameters but the layer records hold "
            f"{claimed:,}: the config does not belong to these layers (damaged or edited checkpoint)"
        )
    expected = expected_entries(cfg)
    by_name = {layer["name"]: layer for layer in layers}
    if len(by_name) != len(layers):
        problems.append("a layer name appears twice")
    problems += [f"{k}: missing" for k in expected if k not in by_name]
    problems += [f"{k}: not in the model" for k in by_name if k not in expected]
    for name, layer in by_name.items():
        if name not in expected:
            continue
        kind, shape = expected[name]
        if layer["kind"] != kind or tuple(layer["shape"]) != shape:
            problems.append(f"{name}: {layer['kind']} {layer['shape']}, the config gives {kind} {list(shape)}")
        tied = layer.get("tied_to")
        if tied is not None and not (cfg.tie_embeddings and {name, tied} == {"embed", "lm_head"}
                                     and tied in by_name and not by_name[tied].get("tied_to")):
            problems.append(f"{name}: tied to {short_repr(tied)}, which the config does not allow")
    if cfg.tie_embeddings and not problems and not any(by_name[n].get("tied_to") for n in ("embed", "lm_head")):
        problems.append("embed and lm_head: the config ties them but both store weights")
    if problems:
        raise _fail(path, "layer records do not match model_config", problems)
    check_finite(path, tensors)
    return cfg


__all__ = ["check_finite", "check_packed", "check_train", "expected_entries", "model_config"]
