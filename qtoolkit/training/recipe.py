"""Training recipes: YAML files validated into dataclasses, with `--set key=value` overrides.

    name: ternary_all
    model:  {preset: small, subln: false, ...}      # a preset plus any ModelConfig field
    policy: {_default: ternary, embed: int8, ...}   # or the path of a policy YAML file
    train:  {lr: 1.0e-3, schedule: cosine, ...}     # unset fields take the preset's defaults
    data:   {dataset: roneneldan/TinyStories, ...}

`load_recipe` reports every problem at once (unknown keys, wrong types, bad values, a policy that
does not validate), each with its key path. See docs/recipes.md for every field.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qtoolkit import schema
from qtoolkit.config import PRESETS, TRAIN_DEFAULTS, ModelConfig
from qtoolkit.errors import ConfigError, PolicyError, UnknownNameError, short_repr
from qtoolkit.model import meta_model
from qtoolkit.policy import Policy, PolicyFitError
from qtoolkit.schema import SchemaError
from qtoolkit.yamlsafe import parse_yaml, read_yaml_file

HUB_TINYSTORIES = "roneneldan/TinyStories"


@dataclass
class TrainConfig:
    steps: int | None = None  # total optimizer steps (also the schedule's horizon)
    batch_size: int | None = None  # the global batch (sequences per optimizer step)
    # Sequences per forward/backward: the batch runs as batch_size / micro_batch_size micro-batches whose
    # gradients add up to the whole batch's (gradient accumulation). None: the whole batch at once
    # (or, with fit_memory, the largest micro-batch that fits in memory).
    micro_batch_size: int | None = None
    seq_len: int | None = None
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int | None = None
    schedule: Literal["cosine", "two_stage"] = "cosine"
    stage2_lr_scale: float = 0.25  # two_stage: lr multiplier from the midpoint on (weight decay -> 0)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    label_smoothing: float = 0.1
    quant_warmup_steps: int = 0  # ramp quantization in: W + lambda (Q(W) - W), lambda 0 -> 1 over these steps
    eval_every: int | None = None
    eval_batches: int = 20
    ckpt_every: int | None = None
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Run the step's forward and loss under torch.compile (training.step): true, false, or auto (on for
    # CUDA, off for the CPU). A compile failure falls back to eager mode with a message.
    compile: bool | Literal["auto"] = "auto"
    # Memory savers (docs/training.md states their cost): the loss over `ce_chunk` tokens at a time
    # without the full logits (0: off), and per-block activation checkpointing.
    ce_chunk: int = 0
    activation_checkpointing: bool = False
    # AdamW's moments of the block linears' weights: fp32, or bf16 with stochastic rounding (half the
    # bytes; training.optimizer says which parameters and why). Other parameters keep fp32 moments.
    optimizer_state: Literal["fp32", "bf16"] = "fp32"
    # Before the first step: estimate peak memory (training.memory); when it exceeds what the device
    # has free (or memory_gib), run the largest micro-batch that fits, or stop with a message. false:
    # only report the estimate.
    fit_memory: bool = True
    memory_gib: float | None = None  # memory the run may use, GiB (default: what the device has free)

    def check(self) -> list[tuple[str, str]]:
        errors = []
        for name in ("steps", "batch_size", "seq_len", "eval_every", "ckpt_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                errors.append((name, f"must be >= 1, got {v}"))
        for name in ("eval_batches", "log_every"):
            if getattr(self, name) < 1:
                errors.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.micro_batch_size is not None:
            if self.micro_batch_size < 1:
                errors.append(("micro_batch_size", f"must be >= 1, got {self.micro_batch_size}"))
            elif self.batch_size is not None and self.batch_size % self.micro_batch_size:
                errors.append(("micro_batch_size", f"must divide batch_size ({self.batch_size}), "
                                                   f"got {self.micro_batch_size}"))
        if self.ce_chunk < 0:
            errors.append(("ce_chunk", f"must be >= 0 (0 = off), got {self.ce_chunk}"))
        if self.memory_gib is not None and not self.memory_gib > 0:
            errors.append(("memory_gib", f"must be > 0, got {self.memory_gib}"))
        if self.warmup_steps is not None and self.warmup_steps < 0:
            errors.append(("warmup_steps", f"must be >= 0, got {self.warmup_steps}"))
        if self.quant_warmup_steps < 0:
            errors.append(("quant_warmup_steps", f"must be >= 0, got {self.quant_warmup_steps}"))
        if self.steps and self.quant_warmup_steps > self.steps:
            errors.append(("quant_warmup_steps", f"must be at most steps ({self.steps}), got {self.quant_warmup_steps}"))
        if self.steps and self.warmup_steps and self.warmup_steps >= self.steps:
            errors.append(("warmup_steps", f"must be smaller than steps ({self.steps}), got {self.warmup_steps}"))
        if not self.lr > 0:
            errors.append(("lr", f"must be > 0, got {self.lr}"))
        for name in ("min_lr_ratio", "stage2_lr_scale"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append((name, f"must be in [0, 1], got {getattr(self, name)}"))
        if self.weight_decay < 0:
            errors.append(("weight_decay", f"must be >= 0, got {self.weight_decay}"))
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                errors.append((name, f"must be in [0, 1), got {getattr(self, name)}"))
        if not self.adam_eps > 0:
            errors.append(("adam_eps", f"must be > 0, got {self.adam_eps}"))
        if self.grad_clip < 0:
            errors.append(("grad_clip", f"must be >= 0, got {self.grad_clip}"))
        if not 0 <= self.label_smoothing < 1:
            errors.append(("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"))
        if not 0 <= self.seed <= schema.MAX_SEED:
            errors.append(("seed", f"must be in [0, {schema.MAX_SEED}], got {short_repr(self.seed)}"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            errors.append(("device", f"must be auto, cpu, cuda or cuda:N, got {short_repr(self.device)}"))
        return errors


@dataclass
class DataConfig:
    dataset: str = HUB_TINYSTORIES  # Hugging Face Hub dataset, used when `path` is unset
    path: str | None = None  # local text file or directory (--data); takes precedence over `dataset`
    train_split: str = "train"
    val_split: str = "validation"
    text_field: str = "text"
    val_fraction: float = 0.02  # held out (deterministically) when there is no validation split
    tokenizer: str | None = None  # tokenizer.json, or a dir with vocab.json + merges.txt; None = train BPE
    max_train_tokens: int | None = None  # cap on training tokens; Hub default: what the run consumes
    max_val_tokens: int = 262_144

    def check(self) -> list[tuple[str, str]]:
        errors = []
        if not 0 < self.val_fraction <= 0.5:
            errors.append(("val_fraction", f"must be in (0, 0.5], got {self.val_fraction}"))
        if self.max_train_tokens is not None and self.max_train_tokens < 1:
            errors.append(("max_train_tokens", f"must be >= 1, got {self.max_train_tokens}"))
        if self.max_val_tokens < 1:
            errors.append(("max_val_tokens", f"must be >= 1, got {self.max_val_tokens}"))
        return errors


@dataclass
class Recipe:
    name: str
    policy: dict[str, Any]
    description: str = ""
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "small"})
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def preset(self) -> str:
        return self.model.get("preset", "small")

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_name(self.preset, **{k: v for k, v in self.model.items() if k != "preset"})

    def check(self) -> list[tuple[str, str]]:
        errors = _check_model_section(self.model)
        policy_errors = Policy(self.policy).check("policy")
        errors += policy_errors
        if errors:
            return errors
        model_config = self.model_config()
        if self.train is not None:
            seq_len = self.train.seq_len or TRAIN_DEFAULTS[self.preset]["seq_len"]
            if seq_len > model_config.max_seq_len:
                errors.append(("train.seq_len", f"{seq_len} exceeds model.max_seq_len={model_config.max_seq_len}"))
        try:  # does the policy fit this model? (on the meta device: no memory, little time)
            Policy(self.policy).resolve(meta_model(model_config))
        except PolicyFitError as e:
            errors += [(f"policy.{key}", message) for key, message in e.problems]
        return errors

    def resolved(self) -> Recipe:
        """A copy with every preset-dependent default filled in (what checkpoints store)."""
        defaults = TRAIN_DEFAULTS[self.preset]
        train = dataclasses.replace(
            self.train, **{k: v for k, v in defaults.items() if getattr(self.train, k) is None}
        )
        if train.warmup_steps is not None and train.warmup_steps >= train.steps:
            train.warmup_steps = max(0, train.steps // 10)
        return dataclasses.replace(self, train=train, model={"preset": self.preset, **self.model})

    def to_dict(self) -> dict[str, Any]:
        return schema.to_dict(self)


def _check_model_section(model: dict[str, Any]) -> list[tuple[str, str]]:
    errors = []
    preset = model.get("preset", "small")
    if not isinstance(preset, str) or preset not in PRESETS:
        return [("model.preset", f"unknown preset {short_repr(preset)}; available: {', '.join(PRESETS)}")]
    hints = typing.get_type_hints(ModelConfig)
    values = dict(PRESETS[preset])
    for key, value in model.items():
        if key == "preset":
            continue
        if key not in hints:
            errors.append((f"model.{key}", f"unknown key (allowed: preset, {', '.join(hints)})"))
            continue
        values[key] = schema.convert(hints[key], value, f"model.{key}", errors)
    if not errors:
        errors += [(f"model.{k}", m) for k, m in ModelConfig.check_values(values)]
    return errors


# ------------------------------------------------------------------------------ loading


def recipe_dirs() -> list[Path]:
    package = Path(__file__).resolve().parent.parent  # recipes/ sits in the wheel's package, or at the repo root
    return [d for d in (package / "recipes", package.parent / "recipes") if d.is_dir()]


def available_recipes() -> list[str]:
    names = set()
    for d in recipe_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_recipe(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UnknownNameError(f"recipe file not found: {path}")
        return path
    for d in recipe_dirs():
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise UnknownNameError(
        f"unknown recipe {str(name_or_path)!r}; shipped recipes: {', '.join(available_recipes())} "
        "(or pass the path of a .yaml file)"
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw recipe dict, in place.

    Under `policy.` the rest of the key is one policy pattern: `policy.blocks.0.attn.q_proj=int8`.
    """
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            errors.append((item, "an override is KEY=VALUE, e.g. train.lr=3e-4"))
            continue
        try:
            value = parse_yaml(text, "the value") if text.strip() else ""
        except ConfigError as e:
            if "refused" in str(e) or "duplicate key" in str(e):
                errors.append((key, str(e)))
                continue
            value = text  # not YAML: the text itself (e.g. a path with a colon)
        head, _, rest = key.partition(".")
        if head == "policy" and rest:  # policy keys are module names: they contain dots themselves
            parents, leaf = ["policy"], rest
        else:
            *parents, leaf = key.split(".")
        node = raw
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append((key, f"{'.'.join(parents[: i + 1])} is not a mapping"))
                break
            node = child
        else:
            node[leaf] = value
    if errors:
        raise SchemaError(errors, "--set overrides")
    return raw


def load_recipe(
    name_or_path: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> Recipe:
    """A validated Recipe from a shipped name, a YAML path, or a raw mapping, plus overrides."""
    base_dir = Path.cwd()
    if isinstance(name_or_path, dict):
        raw, where = dict(name_or_path), "recipe"
    else:
        path = find_recipe(name_or_path)
        base_dir = path.parent
        raw = read_yaml_file(path, "recipe")
        if not isinstance(raw, dict):
            raise SchemaError([("", f"a recipe is a mapping, got {short_repr(raw)}")], str(path))
        where = f"recipe {path}"
        raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, list(overrides or []))
    if isinstance(raw.get("policy"), str):
        raw["policy"] = _load_policy_file(raw["policy"], base_dir)
    return schema.from_dict(Recipe, raw, what=where)


def _load_policy_file(text: str, base_dir: Path) -> dict[str, Any]:
    for candidate in (Path(text), base_dir / text):
        if candidate.is_file():
            try:
                return Policy.load(candidate).to_dict()
            except SchemaError as e:
                raise SchemaError(e.errors, f"policy file {candidate}") from None
            except PolicyError as e:
                raise SchemaError([("policy", str(e))], "recipe") from None
    raise SchemaError([("policy", f"policy file not found: {text}")], "recipe")


def checkpoint_data_config(ckpt: dict[str, Any], data_path: str | Path | None = None) -> DataConfig:
    """The data section of a checkpoint's recipe (validated), with `data_path` as --data if given."""
    recipe = ckpt.get("recipe") or {}
    raw = recipe.get("data") if isinstance(recipe, dict) else None
    cfg = schema.from_dict(DataConfig, raw if isinstance(raw, dict) else {}, what=f"{ckpt['path']}: recipe.data")
    return dataclasses.replace(cfg, path=str(data_path)) if data_path is not None else cfg


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    from qtoolkit.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
