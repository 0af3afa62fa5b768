"""Post-training quantization: a policy applied to a trained model (`qtool quantize`, `qtoolkit.quantize`).

    quantize(model_or_ckpt, policy, calib=None, ...)   -> the quantized model
    quantize_checkpoint(ckpt, policy, out, ...)         -> QuantizeResult; writes a training checkpoint
    policy_source(text, overrides)                      -> the policy a `--policy` argument names

On a plain `nn.Module` (torchao's `quantize_` style), `quantize` applies the policy in place to the
module's `nn.Linear`/`nn.Embedding` layers (block selectors find `blocks`, `model.layers`,
`transformer.h`, ... or take `blocks=`), and calibrates on `calib` (batches of model inputs) when a
quantizer needs data.

From a training checkpoint (any precision), the steps are:

1. the latent float weights in a `DecoderLM` (a packed checkpoint has none: refused);
2. `apply_policy`: every layer the policy names gets its quantizer (fit checked first, on `meta`);
3. layers whose quantizer spec is the one they already had in the checkpoint keep its state
   (learned or calibrated scales) and are not recalibrated: re-quantizing a ternary checkpoint
   with a policy that changes a few layers leaves the others exactly as trained;
4. calibration (`qtoolkit.calibration`), only when a quantizer needs data: `--calib-tokens`
   tokens of seeded training windows of the checkpoint's data (or `--data`), the same windows the
   probe and search draw (`training.data.calibration_batches`), so the result is a pure function
   of (checkpoint, policy, data, tokens, seed).

The written checkpoint is an ordinary training checkpoint (`kind: train`): model_config, recipe
(the source's, with this policy), policy, coverage, tokenizer, the state dict (latent weights as
calibrated, quantizer state), the source's step and data fingerprints, and a `quantized` record
(source checkpoint, calibration, adopted layers). It has no optimizer state: `qtool train --init`
starts QAT from it; eval, analyze, pack, generate, bench and probe read it like any other.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from qtoolkit import quantizers
from qtoolkit.calibration import CalibrationReport, calibrate_model, calibration_targets
from qtoolkit.checkpoint import CKPT_NAME, load_checkpoint, save_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import CheckpointError, ConfigError, PolicyError, UnknownNameError
from qtoolkit.layers import QUANT_MODULES
from qtoolkit.model import DecoderLM
from qtoolkit.pack import memory_plan
from qtoolkit.policy import Coverage, Policy, apply_policy

Progress = Callable[[str, int, int | None], None]
DEFAULT_CALIB_TOKENS = 4096


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


# ------------------------------------------------------------------------------ the policy argument


def policy_source(value: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The policy a `--policy` value names, with `--set policy...` overrides applied.

    `value`: a policy YAML file (a mapping, optionally under `policy:`; the search's `policy.yaml`),
    a recipe YAML file or shipped recipe name (its policy), an inline YAML mapping
    (`"{_default: ternary, embed: int8}"`), or a quantizer spec (`int8`: `{_default: int8}`).
    Overrides: `policy.PATTERN=SPEC` or `policy=FILE`."""
    from qtoolkit.training.recipe import apply_overrides

    overrides = list(overrides or [])
    for item in overrides:
        if not item.strip().startswith("policy"):
            raise ConfigError(f"--set {item}: only policy overrides apply here (policy.PATTERN=SPEC or policy=FILE)")
    raw = _policy_value(value) if value is not None else {}
    policy = apply_overrides({"policy": dict(raw)}, overrides)["policy"]
    if isinstance(policy, str):
        policy = _policy_value(policy)
    if not policy:
        raise ConfigError("no policy given: pass --policy (a recipe name, a policy YAML file or an inline "
                          "mapping) or --set policy.PATTERN=SPEC")
    return Policy.load(policy).to_dict()


def _policy_value(text: str) -> dict[str, Any]:
    from qtoolkit.training.recipe import available_recipes, load_recipe

    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise PolicyError(f"policy file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise PolicyError(f"{path}: not valid YAML: {e}") from None
        if isinstance(data, dict) and "policy" in data and len(data) > 1:  # a recipe file
            return load_recipe(path).policy
        return Policy.load(path).to_dict()
    if text.lstrip().startswith("{"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PolicyError(f"--policy {text!r}: not a valid YAML mapping: {e}") from None
        return Policy.load(data).to_dict()
    if text in available_recipes():
        return load_recipe(text).policy
    try:
        quantizers.build(text)
    except UnknownNameError:
        raise UnknownNameError(
            f"--policy {text!r} is not a policy file, a shipped recipe ({', '.join(available_recipes())}), "
            f"a quantizer ({', '.join(quantizers.available() + list(quantizers.aliases()))}) or an inline mapping like "
            "'{_default: ternary, embed: int8}'"
        ) from None
    return {"_default": text}


# ------------------------------------------------------------------------------ the source


def load_source(source: str | Path | dict[str, Any], what: str = "checkpoint") -> dict[str, Any]:
    """A loaded training checkpoint; a packed one is refused (it has no latent weights)."""
    ckpt = source if isinstance(source, dict) else load_checkpoint(source)
    if ckpt["kind"] != "train":
        raise CheckpointError(
            f"{what} {ckpt['path']}: already packed (a deployment checkpoint keeps only the quantized codes, "
            "not the latent weights to quantize or train from); pass the training checkpoint it was packed from"
        )
    return ckpt


def latent_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The float weights of a training checkpoint's state dict (quantizer state left out)."""
    return {k: v for k, v in ckpt["model"].items() if ".quantizer." not in k}


def check_fits(ckpt: dict[str, Any], model_config: ModelConfig, what: str = "checkpoint") -> None:
    """The checkpoint's latent weights fit a DecoderLM of `model_config`; else one error naming the
    first tensor that differs, and how the two configs differ."""
    with torch.device("meta"):
        target = DecoderLM(model_config).state_dict()
    source = latent_state(ckpt)
    problem = None
    for key, t in target.items():
        if key not in source:
            problem = f"the checkpoint has no tensor {key}, which this model has"
            break
        if tuple(source[key].shape) != tuple(t.shape):
            problem = f"tensor {key} is {tuple(source[key].shape)} in the checkpoint but {tuple(t.shape)} here"
            break
    else:
        extra = [k for k in source if k not in target]
        if extra:
            problem = f"the checkpoint has a tensor {extra[0]}, which this model does not have"
    src_cfg = ckpt.get("model_config") or {}
    if problem is None and bool(src_cfg.get("tie_embeddings")) != model_config.tie_embeddings:
        problem = (f"the checkpoint {'ties' if src_cfg.get('tie_embeddings') else 'does not tie'} embed and "
                   "lm_head, unlike this model")
    if problem is None:
        return
    mine = model_config.to_dict()
    diffs = [f"{k} {src_cfg[k]} vs {mine[k]}" for k in mine if k in src_cfg and src_cfg[k] != mine[k]]
    preset = (ckpt.get("recipe") or {}).get("model", {}).get("preset")
    hint = (f"; the models differ in {', '.join(diffs)} (checkpoint vs here)" if diffs else "")
    hint += f"; the checkpoint's model is preset {preset!r}: pass --model {preset}" if preset else ""
    raise CheckpointError(f"{what} {ckpt['path']}: does not fit this model: {problem}{hint}")


def latent_model(ckpt: dict[str, Any], model_config: ModelConfig | None = None) -> DecoderLM:
    """A float DecoderLM holding the checkpoint's latent weights (quantizer state dropped)."""
    cfg = model_config or ModelConfig.from_dict(ckpt["model_config"])
    check_fits(ckpt, cfg)
    model = DecoderLM(cfg)
    model.load_state_dict(latent_state(ckpt), strict=False)  # exactly the float keys: checked above
    return model.eval()


def source_quantizers(ckpt: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """{layer: (canonical spec, quantizer state)} of the checkpoint's quantized layers."""
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    with torch.device("meta"):
        coverage = Policy.load(ckpt["policy"]).resolve(DecoderLM(cfg))
    out = {}
    for a in coverage.layers:
        if a.spec is None:
            continue
        prefix = f"{a.name}.quantizer."
        out[a.name] = (a.spec, {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)})
    return out


def adopt_state(model: nn.Module, sources: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> list[str]:
    """Load the source quantizer state into every quantized layer whose spec is unchanged and whose
    quantizer has state; returns those layers (they are not recalibrated)."""
    adopted = []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_MODULES) and name in sources:
            spec, state = sources[name]
            if state and m.quantizer.spec() == spec:
                m.quantizer.load_state_dict(state)
                adopted.append(name)
    return adopted


# ------------------------------------------------------------------------------ calibration data


def checkpoint_calibration(ckpt: dict[str, Any], data_path: str | None = None,
                           calib_tokens: int = DEFAULT_CALIB_TOKENS, seed: int = 0, progress: Progress = _noop,
                           train=None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Calibration inputs (token-id batches) from the checkpoint's data config (or `data_path`, or an
    already prepared training stream `train`), and what they are."""
    from qtoolkit.training.data import calibration_batches, prepare_data, tokenizer_from_json
    from qtoolkit.training.recipe import DataConfig

    cfg = ModelConfig.from_dict(ckpt["model_config"])
    recipe = ckpt.get("recipe") or {}
    seq_len = int(recipe.get("train", {}).get("seq_len") or cfg.max_seq_len)
    source = "training stream"
    if train is None:
        data_cfg = DataConfig(**recipe.get("data", {}))
        if data_path is not None:
            data_cfg = dataclasses.replace(data_cfg, path=str(data_path))
        data = prepare_data(data_cfg, cfg.vocab_size, tokenizer=tokenizer_from_json(ckpt["tokenizer"]),
                            progress=progress)
        train, source = data.train, data.info.get("source")
    batches = calibration_batches(train, calib_tokens, seq_len, seed)
    info = {"tokens": sum(int(x.numel()) for x, _ in batches), "seq_len": seq_len, "seed": seed, "data": source}
    return [x for x, _ in batches], info


# ------------------------------------------------------------------------------ quantize


@dataclass
class Quantized:
    """A checkpoint's model under a policy, and how it got there."""

    model: DecoderLM
    coverage: Coverage
    calibration: CalibrationReport = field(default_factory=CalibrationReport)
    calibration_data: dict[str, Any] = field(default_factory=dict)
    adopted: list[str] = field(default_factory=list)


def quantize_source(ckpt: dict[str, Any], policy: Policy | dict[str, Any] | str | Path,
                    calib: list[Any] | Callable[[], list[Any]] | None = None, *, data_path: str | None = None,
                    calib_tokens: int = DEFAULT_CALIB_TOKENS, seed: int = 0, device: str | torch.device = "cpu",
                    model_config: ModelConfig | None = None, progress: Progress = _noop) -> Quantized:
    """Steps 1-4 of the module docstring on a loaded training checkpoint. `calib`: model inputs, or
    a function returning them (called only when a quantizer needs data); default: the checkpoint's
    own data. `model_config`: the model to build (default: the checkpoint's)."""
    ckpt = load_source(ckpt)
    cfg = model_config or ModelConfig.from_dict(ckpt["model_config"])
    rules = Policy.load(policy).to_dict()
    check_fits(ckpt, cfg)
    with torch.device("meta"):  # a policy that does not fit fails before any real work
        Policy.load(rules).resolve(DecoderLM(cfg))
    model = latent_model(ckpt, cfg)
    coverage = apply_policy(model, rules)
    result = Quantized(model, coverage, adopted=adopt_state(model, source_quantizers(ckpt)))
    todo = [n for n in calibration_targets(model) if n not in result.adopted]
    if todo:
        if calib is None:
            calib, result.calibration_data = checkpoint_calibration(ckpt, data_path, calib_tokens, seed, progress)
        elif callable(calib):
            calib = calib()
        model.to(device)
        try:
            result.calibration = calibrate_model(model, calib, modules=todo, progress=progress)
        finally:
            model.to("cpu")
    return result


def quantize(model_or_ckpt: nn.Module | str | Path | dict[str, Any], policy: Policy | dict[str, Any] | str | Path,
             calib: list[Any] | None = None, *, blocks: str | None = None, data: str | None = None,
             calib_tokens: int = DEFAULT_CALIB_TOKENS, seed: int = 0, device: str = "cpu",
             progress: Progress = _noop) -> nn.Module:
    """Quantize a model with a policy and return it (module docstring).

    * an `nn.Module`: the policy is applied in place (any module: its Linear/Embedding layers, named
      as `named_modules()` names them; `blocks` names the block list for `blocks[...]` selectors when
      it is not one of the common layouts); `calib` (an iterable of model inputs) is required only
      when a quantizer needs calibration data;
    * a training checkpoint (path, run directory or loaded dict): a new DecoderLM, calibrated on
      `calib` or else `calib_tokens` tokens of the checkpoint's data (or `data`) with `seed`.
    """
    if isinstance(model_or_ckpt, nn.Module):
        model = model_or_ckpt
        apply_policy(model, policy, blocks)
        targets = calibration_targets(model)
        if targets:
            if calib is None:
                raise ConfigError(f"the policy uses quantizers that fit themselves on data ({', '.join(targets)}); "
                                  "pass calib= an iterable of model inputs")
            calibrate_model(model, calib, blocks, progress=progress)
        return model
    ckpt = load_source(model_or_ckpt)
    return quantize_source(ckpt, policy, calib, data_path=data, calib_tokens=calib_tokens, seed=seed,
                           device=_device(device), progress=progress).model


def _device(name: str | torch.device) -> torch.device:
    from qtoolkit.training.trainer import resolve_device

    return name if isinstance(name, torch.device) else resolve_device(name)


# ------------------------------------------------------------------------------ the checkpoint


@dataclass
class QuantizeResult:
    path: Path
    source: str
    coverage: Coverage
    calibration: dict[str, Any]
    adopted: list[str]
    total_bytes: int  # packed bytes of the result (what `qtool pack` writes)
    fp32_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "source": self.source, "coverage": self.coverage.to_dict(),
                "calibration": self.calibration, "adopted": self.adopted, "total_bytes": self.total_bytes,
                "fp32_bytes": self.fp32_bytes, "seconds": self.seconds}


def output_path(out: str | Path) -> Path:
    """`out` as a checkpoint file: a `.pt` path as given, anything else a run directory/ckpt.pt."""
    out = Path(out)
    return out if out.suffix == ".pt" else out / CKPT_NAME


def quantized_state(src: dict[str, Any], q: Quantized, policy: dict[str, Any],
                    record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training-checkpoint dict of a quantized model (module docstring)."""
    recipe = dict(src.get("recipe") or {})
    recipe["policy"] = policy
    if recipe.get("name") and not str(recipe["name"]).endswith("-quantized"):
        recipe["name"] = f"{recipe['name']}-quantized"
    return {
        "kind": "train",
        "model_config": q.model.config.to_dict(),
        "recipe": recipe,
        "policy": policy,
        "coverage": q.coverage.to_dict(),
        "tokenizer": src["tokenizer"],
        "model": q.model.state_dict(),
        "step": src.get("step", 0),
        "data": src.get("data", {}),
        "metrics": {},
        "quantized": {
            "source": {"checkpoint": str(src["path"]), "step": src.get("step"), "metrics": src.get("metrics", {})},
            "calibration": {**q.calibration_data, **q.calibration.to_dict()},
            "adopted": q.adopted,
            **(record or {}),
        },
    }


def quantize_checkpoint(ckpt: str | Path | dict[str, Any], policy: Policy | dict[str, Any] | str | Path,
                        out: str | Path, *, data: str | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS,
                        seed: int = 0, device: str = "cpu", progress: Progress = _noop,
                        record: dict[str, Any] | None = None) -> QuantizeResult:
    """`qtool quantize`: write the quantized training checkpoint of `ckpt` under `policy` to `out`
    (a run directory, or a `.pt` file). Nothing is written unless every step succeeds, and an
    existing file is never replaced. `record` adds to the checkpoint's `quantized` record."""
    t0 = time.perf_counter()
    src = load_source(ckpt)
    path = output_path(out)
    if path.exists():
        raise CheckpointError(f"{path} already exists; choose another --out (nothing is overwritten)")
    rules = Policy.load(policy).to_dict()
    q = quantize_source(src, rules, data_path=data, calib_tokens=calib_tokens, seed=seed, device=_device(device),
                        progress=progress)
    save_checkpoint(quantized_state(src, q, rules, record), path)
    plan = memory_plan(q.model)
    return QuantizeResult(path, str(src["path"]), q.coverage, {**q.calibration_data, **q.calibration.to_dict()},
                          q.adopted, plan.total_bytes, plan.fp32_bytes, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ short QAT


def finetune_checkpoint(ckpt: str | Path | dict[str, Any], out: str | Path, steps: int, *, lr: float | None = None,
                        data: str | None = None, seed: int = 0, batch_size: int | None = None,
                        seq_len: int | None = None, device: str = "cpu", progress: Progress = _noop) -> Path:
    """Finetune a (quantized) training checkpoint for `steps` steps with `training.trainer.finetune`
    (the search's `--finetune-steps` loop; `lr` defaults to the recipe's final learning rate, lr *
    min_lr_ratio) on its training data (or `data`), and write the result to `out` like
    `quantize_checkpoint` does. For full QAT with a schedule use `qtool train --init`."""
    from qtoolkit.pack import model_from_checkpoint
    from qtoolkit.training.data import prepare_data, tokenizer_from_json
    from qtoolkit.training.recipe import DataConfig
    from qtoolkit.training.trainer import finetune

    if steps < 1:
        raise ConfigError(f"finetune steps must be >= 1, got {steps}")
    src = load_source(ckpt)
    path = output_path(out)
    if path.exists():
        raise CheckpointError(f"{path} already exists; choose another --out (nothing is overwritten)")
    recipe = src.get("recipe") or {}
    train_cfg = recipe.get("train", {})
    cfg = ModelConfig.from_dict(src["model_config"])
    lr = lr if lr is not None else float(train_cfg.get("lr", 1e-3)) * float(train_cfg.get("min_lr_ratio", 0.1))
    batch_size = batch_size or int(train_cfg.get("batch_size") or 8)
    seq_len = seq_len or int(train_cfg.get("seq_len") or cfg.max_seq_len)
    data_cfg = DataConfig(**recipe.get("data", {}))
    if data is not None:
        data_cfg = dataclasses.replace(data_cfg, path=str(data))
    prepared = prepare_data(data_cfg, cfg.vocab_size, tokenizer=tokenizer_from_json(src["tokenizer"]), progress=progress)
    model, coverage = model_from_checkpoint(src)
    progress("finetuning", 0, steps)
    losses = finetune(model, prepared.train, steps, lr, batch_size, seq_len, seed, _device(device))
    progress("finetuning", steps, steps)
    model.to("cpu")
    state = {k: v for k, v in src.items() if k not in ("path", "format", "version", "optimizer", "rng")}
    state["model"], state["metrics"] = model.state_dict(), {}
    state["quantized"] = {**(src.get("quantized") or {}),
                          "finetune": {"steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size,
                                       "seq_len": seq_len, "from": str(src["path"]), "last_loss": losses[-1]}}
    save_checkpoint(state, path)
    return path


__all__ = ["DEFAULT_CALIB_TOKENS", "QuantizeResult", "Quantized", "adopt_state", "check_fits", "checkpoint_calibration",
           "finetune_checkpoint", "latent_model", "latent_state", "load_source", "output_path", "policy_source", "quantize",
           "quantize_checkpoint", "quantize_source", "quantized_state", "source_quantizers"]
