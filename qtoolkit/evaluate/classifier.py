"""A sequence classifier on a qtoolkit language model: the decoder's final hidden states, pooled
into one vector per example, and a linear head.

    idx (B, T), right-padded ─ DecoderLM.hidden_states ─> (B, T, d) ─ pool ─> (B, d) ─ head ─> (B, classes)

Pooling:
  * `last` (the default): the hidden state at each example's last real token, the closing
    `<|endoftext|>` (see glue_data). In a causal decoder this is the only position that has
    attended to the whole input, and for a sentence pair the only one that has read both
    sentences; it is how GPT (Radford et al. 2018) and `GPT2ForSequenceClassification` classify.
  * `mean`: the average over real tokens; every position contributes, but early positions have
    not seen the rest of the input (in a pair, the first sentence's tokens never see the second).
Right padding needs no attention mask: attention is causal, so pad tokens after an example never
reach its real positions, and pooling reads real positions only.

The head is a float32 `nn.Linear(d, classes)` with a bias (d x classes weights: nothing to gain by
quantizing it). The backbone keeps its quantization: `load_backbone` rebuilds the checkpoint's
model with its policy, i.e. `QuantLinear`s whose latent weights the optimizer updates while the
forward pass uses fake-quantized weights (QAT, the training stage's straight-through estimator),
so a ternary checkpoint is still ternary after finetuning and `qtool pack` stores it exactly as
for any training checkpoint (`save_classifier` writes one; tested: packed logits == finetuned logits).

Backbone sources:
  * training checkpoint, its own policy: the training model as saved (learned scales included);
  * training checkpoint, another policy (`--policy`): its latent float weights, the new policy
    applied (scales initialised from the weights, as `qtool train` does at step 0);
  * packed checkpoint, frozen (`--freeze`): the deployed model exactly (dequantized stored codes);
  * packed checkpoint, finetuned: the dequantized weights become latent weights and the policy is
    applied to them (for absmean ternary the codes survive; the scale is re-estimated).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from qtoolkit import quantizers
from qtoolkit.checkpoint import load_checkpoint, save_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import CheckpointError, ConfigError
from qtoolkit.model import DecoderLM
from qtoolkit.pack import model_from_checkpoint
from qtoolkit.policy import Coverage, Policy, apply_policy

POOLINGS = ("last", "mean")


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: DecoderLM, n_classes: int, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=backbone.config.init_std)
        nn.init.zeros_(self.head.bias)

    def features(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """idx (B, T) right-padded ids, lengths (B,) real tokens per row -> pooled (B, d) float32."""
        h = self.backbone.hidden_states(idx).float()  # (B, T, d)
        if self.pooling == "last":
            return h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        mask = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
        return (h * mask).sum(1) / lengths[:, None]

    def forward(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """-> logits (B, n_classes)."""
        return self.head(self.features(idx, lengths))


# ------------------------------------------------------------------------------ policies


def resolve_policy(value: Any) -> dict[str, Any]:
    """A `--policy` value as policy rules: a policy YAML file, a shipped recipe's name (its policy),
    inline YAML of a policy mapping, or a quantizer spec (`ternary`, `{name: int8}`), which stands
    for `{_default: spec}` (every linear layer; embeddings only when named)."""
    from qtoolkit.training.recipe import available_recipes, load_recipe

    if isinstance(value, (dict, Policy)):
        return Policy.load(value).to_dict()
    text = str(value)
    if Path(text).is_file():
        return Policy.load(Path(text)).to_dict()
    if text in available_recipes():
        return dict(load_recipe(text).policy)
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, (str, dict)):
        try:
            quantizers.build(parsed)
            return {"_default": parsed}
        except Exception:  # not a quantizer spec: a policy mapping, checked below
            pass
    if isinstance(parsed, dict):
        return Policy.load(parsed).to_dict()
    raise ConfigError(f"--policy {text!r}: not a policy file, a recipe name ({', '.join(available_recipes())}), "
                      "a quantizer spec or a YAML policy mapping")


def _canonical(policy: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, spec in policy.items():
        spec = quantizers.canonical(spec)
        out[key] = {k: v for k, v in spec.items() if k != "packing"}  # storage only, not the codes
    return out


def same_policy(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _canonical(a) == _canonical(b)


def float_backbone(model: nn.Module, config: ModelConfig) -> DecoderLM:
    """A float DecoderLM holding `model`'s (latent or dequantized) weights, without quantizers."""
    state = {k: v for k, v in model.state_dict().items() if ".quantizer." not in f".{k}"}
    backbone = DecoderLM(config)
    backbone.load_state_dict(state, strict=True)
    return backbone


def load_backbone(ckpt: dict[str, Any], policy: Any = None, freeze: bool = False
                  ) -> tuple[DecoderLM, Coverage | None, dict[str, Any]]:
    """(backbone, coverage, policy rules) of a loaded checkpoint under `policy` (None: its own).

    coverage is None only for a frozen packed backbone (the deployed model, nothing to re-quantize).
    """
    config = ModelConfig.from_dict(ckpt["model_config"])
    own = dict(ckpt["policy"])
    rules = own if policy is None else resolve_policy(policy)
    if ckpt["kind"] == "train" and same_policy(rules, own):
        model, coverage = model_from_checkpoint(ckpt)
        return model, coverage, own
    model, _ = model_from_checkpoint(ckpt)
    if ckpt["kind"] == "packed" and freeze and same_policy(rules, own):
        return model, None, own
    backbone = float_backbone(model, config)
    coverage = apply_policy(backbone, rules)
    return backbone, coverage, rules


# ------------------------------------------------------------------------------ checkpoints


def save_classifier(classifier: SequenceClassifier, source: dict[str, Any], coverage: Coverage | None,
                    policy: dict[str, Any], path: str | Path, info: dict[str, Any]) -> Path:
    """Write the finetuned backbone as a training checkpoint (so `qtool pack`, `qtool eval` and
    `qtool analyze` work on it) with the head and `info` (task, labels, metrics) under `classifier`."""
    if coverage is None:
        raise ConfigError("a frozen packed backbone is the packed checkpoint itself; only a backbone "
                          "built from latent weights can be saved as a training checkpoint")
    recipe = copy.deepcopy(source.get("recipe") or {})
    recipe["policy"] = policy
    state = {
        "kind": "train",
        "model_config": classifier.backbone.config.to_dict(),
        "recipe": recipe,
        "policy": policy,
        "coverage": coverage.to_dict(),
        "tokenizer": source["tokenizer"],
        "model": {k: v.detach().cpu() for k, v in classifier.backbone.state_dict().items()},
        "step": source.get("step", (source.get("source") or {}).get("step")) or 0,
        "metrics": {},
        "classifier": {**info, "pooling": classifier.pooling, "source": str(source["path"]),
                       "head": {k: v.detach().cpu() for k, v in classifier.head.state_dict().items()}},
    }
    return save_checkpoint(state, path)


def load_classifier(path: str | Path, backbone: str | Path | None = None) -> tuple[SequenceClassifier, dict[str, Any]]:
    """(classifier, its `classifier` info) from a `save_classifier` checkpoint; `backbone` takes the
    decoder from another file instead, e.g. the packed form of the same checkpoint."""
    ckpt = load_checkpoint(path)
    info = ckpt.get("classifier")
    if not isinstance(info, dict) or "head" not in info:
        raise CheckpointError(f"{ckpt['path']}: not a classifier checkpoint (written by `qtool glue --save-models`)")
    model, _ = model_from_checkpoint(ckpt if backbone is None else load_checkpoint(backbone))
    clf = SequenceClassifier(model, info["head"]["weight"].shape[0], info["pooling"])
    clf.head.load_state_dict(info["head"])
    clf.eval()
    return clf, {k: v for k, v in info.items() if k != "head"}


__all__ = ["POOLINGS", "SequenceClassifier", "float_backbone", "load_backbone", "load_classifier",
           "resolve_policy", "same_policy", "save_classifier"]
