"""Import a local Hugging Face Llama-architecture causal LM as a qtoolkit training checkpoint.

    from_hf(dir)            -> HFModel: the DecoderLM (fp32), its config, the tokenizer, notes
    import_hf(dir, out)     -> ImportResult: writes OUT/ckpt.pt (+ recipe.yaml, tokenizer.json)

The directory is what `save_pretrained` writes: `config.json`, the weights as `model.safetensors` or
shards listed by `model.safetensors.index.json`, and `tokenizer.json`. Nothing is downloaded and no
code from the directory runs (safetensors and JSON only; transformers is not needed).

config.json -> ModelConfig, field by field:

    vocab_size -> vocab_size          hidden_size -> d_model        num_hidden_layers -> n_layers
    num_attention_heads -> n_heads    num_key_value_heads -> n_kv_heads (grouped-query attention)
    intermediate_size -> d_ff         max_position_embeddings -> max_seq_len
    rope_theta (or rope_parameters.rope_theta) -> rope_theta
    rms_norm_eps -> norm_eps          tie_word_embeddings -> tie_embeddings

Weights are renamed (`hf_names`) and converted to float32, the latent weights of a training
checkpoint. No weight is permuted: transformers' Llama and qtoolkit rotate the same (i, i + hd/2)
pairs by RoPE (see `hf_names`). The result is a checkpoint of the `fp32` policy (every linear listed
in the coverage, nothing quantized), so `quantize`, `train --init`, `probe`, `search`, `pack`,
`eval` and `generate` take it like a checkpoint that qtoolkit trained.

Refused, each with one error naming the field: another model_type, biases (attention_bias, mlp_bias,
or bias tensors), a hidden_act other than silu, rope scaling (rope_type other than default), a
head_dim other than hidden_size / num_attention_heads, an already quantized checkpoint
(quantization_config), a tied/untied mismatch between config and tensors, missing or unexpected
tensors, and a tokenizer larger than the vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qtoolkit.checkpoint import CKPT_NAME, atomic_write_text, save_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import CheckpointError, ConversionError, QToolkitError
from qtoolkit.interop import hf_names
from qtoolkit.model import DecoderLM, rope_tables
from qtoolkit.policy import Coverage, build_model
from qtoolkit.rundir import run_dir_lock

Progress = Callable[[str, int, "int | None"], None]
POLICY = {"_default": "fp32"}
PRESET = "ternarylm-132m"  # the Llama-shaped preset: the recipe's training defaults come from it
ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


@dataclass
class HFModel:
    """A Hugging Face model read into qtoolkit's DecoderLM."""

    model: DecoderLM
    coverage: Coverage
    config: ModelConfig
    tokenizer: Any  # tokenizers.Tokenizer
    source: dict[str, Any]  # path, model_type, source dtype, parameter count
    notes: list[str] = field(default_factory=list)

    def checkpoint(self) -> dict[str, Any]:
        """The training checkpoint state (what `import_hf` saves)."""
        recipe = import_recipe(self.config, self.source["path"])
        return {
            "kind": "train", "model_config": self.config.to_dict(), "recipe": recipe.to_dict(),
            "policy": dict(POLICY), "coverage": self.coverage.to_dict(), "tokenizer": self.tokenizer.to_str(),
            "model": self.model.state_dict(), "step": 0, "metrics": {}, "data": {},
            "source": {"hf": self.source},
        }


@dataclass
class ImportResult:
    path: Path  # the checkpoint written
    source: dict[str, Any]
    config: ModelConfig
    params: int
    tokenizer_size: int
    file_bytes: int
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.path), "source": self.source, "model_config": self.config.to_dict(),
                "params": self.params, "tokenizer_size": self.tokenizer_size, "file_bytes": self.file_bytes,
                "notes": self.notes}


# ------------------------------------------------------------------------------ config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a Hugging Face model directory holds config.json, "
                              "safetensors weights and tokenizer.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _rope(hf: dict[str, Any], where: str) -> float:
    """rope_theta, refusing any rope scaling: transformers 5 writes `rope_parameters`, 4.x
    `rope_theta` and `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for key, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise ConversionError(f"{where}: {key}.rope_type={kind!r} is not supported (qtoolkit implements "
                                  "plain RoPE; rope scaling types such as llama3, linear, dynamic or yarn are not)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConversionError(f"{where}: rope_theta={theta!r} must be a positive number")
    return float(theta)


def read_hf_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, the raw config.json) of a Llama-architecture model directory."""
    where = str(Path(path) / "config.json")
    hf = _read_json(Path(path) / "config.json")
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"{where}: model_type={model_type!r} is not supported; qtoolkit imports "
                              f"Llama-architecture causal LMs (model_type {', '.join(ARCHITECTURES)})")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ConversionError(f"{where}: quantization_config: the model is already quantized ({method}); "
                              "import its unquantized (float) version")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"{where}: {key}=true is not supported (qtoolkit's linears have no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (qtoolkit's MLP is SwiGLU: silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in hf]
    if missing:
        raise ConversionError(f"{where}: missing {', '.join(missing)}")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ConversionError(f"{where}: head_dim={head_dim} with num_attention_heads={heads} is not "
                              f"hidden_size={d} (qtoolkit's heads split d_model)")
    values = dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=_rope(hf, where),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    errors = ModelConfig.check_values(values)
    if errors:
        raise ConversionError(f"{where}: " + "; ".join(f"{k}: {m}" for k, m in errors))
    return ModelConfig(**values), hf


def import_recipe(config: ModelConfig, source: str):
    """The recipe stored with an imported checkpoint: the imported shape, the fp32 policy, and
    training defaults of the Llama-shaped preset (sequences no longer than the model's context)."""
    from qtoolkit.training.recipe import load_recipe

    model = {"preset": PRESET, **config.to_dict()}
    seq_len = min(512, config.max_seq_len)
    raw = {"name": "imported", "description": f"Imported from the Hugging Face model {source}",
           "model": model, "policy": dict(POLICY), "train": {"seq_len": seq_len}}
    return load_recipe(raw).resolved()


# ------------------------------------------------------------------------------ weights


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if not shards or missing:
            raise CheckpointError(f"{index}: lists shards that are not in the directory: {', '.join(missing) or 'none'}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")):
        raise CheckpointError(f"{path}: only PyTorch pickle weights (*.bin); qtoolkit reads safetensors only "
                              "(loading pickles can run code): re-save with save_pretrained(DIR, safe_serialization=True)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _read_weights(files: list[Path], progress: Progress) -> tuple[dict[str, Tensor], str]:
    """{qtoolkit name: float32 tensor}, and the source dtype(s)."""
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    dtypes: set[str] = set()
    for i, f in enumerate(files):
        progress("reading weights", i, len(files))
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open has no iteration)
                    if key.endswith("rotary_emb.inv_freq"):  # a buffer some older exports carry
                        continue
                    ours = hf_names.from_hf(key)
                    if ours is None:
                        what = "a bias" if key.endswith(".bias") else "a tensor Llama does not have"
                        raise ConversionError(f"{f}: {key} is {what}; qtoolkit's DecoderLM cannot hold it")
                    t = st.get_tensor(key)
                    dtypes.add(str(t.dtype).removeprefix("torch."))
                    out[ours] = t.to(torch.float32)
        except QToolkitError:
            raise
        except Exception as e:  # safetensors' own error types for damaged files
            raise CheckpointError(f"{f}: cannot read safetensors ({str(e).splitlines()[0][:160]})") from None
    progress("reading weights", len(files), len(files))
    return out, ",".join(sorted(dtypes))


def _check_tying(weights: dict[str, Tensor], cfg: ModelConfig, where: Path) -> None:
    head = weights.get("lm_head.weight")
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, weights.get("embed.weight", head)):
            raise ConversionError(f"{where}: tie_word_embeddings=true, but lm_head.weight differs from "
                                  "model.embed_tokens.weight")
        weights.pop("lm_head.weight", None)
    elif head is None:
        raise ConversionError(f"{where}: tie_word_embeddings=false, but there is no lm_head.weight "
                              "(set tie_word_embeddings to true if the head shares the embedding)")


def _tokenizer(path: Path, vocab_size: int):
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        extra = " (tokenizer.model alone is SentencePiece: write tokenizer.json with transformers' " \
                "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))" if (path / "tokenizer.model").is_file() else ""
        raise CheckpointError(f"{path}: no tokenizer.json{extra}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:
        raise CheckpointError(f"{file}: cannot load ({str(e).splitlines()[0][:160]})") from None
    if tok.get_vocab_size() > vocab_size:
        raise ConversionError(f"{file}: {tok.get_vocab_size()} tokens, more than config.json's "
                              f"vocab_size={vocab_size}")
    return tok


def from_hf(path: str | Path, progress: Progress = _noop) -> HFModel:
    """Read a local Hugging Face Llama directory into a DecoderLM (float32, `fp32` policy)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
    cfg, hf = read_hf_config(path)
    tokenizer = _tokenizer(path, cfg.vocab_size)
    weights, dtype = _read_weights(_weight_files(path), progress)
    _check_tying(weights, cfg, path)
    with torch.device("meta"):
        model, coverage = build_model(cfg, POLICY)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in weights:
            raise ConversionError(f"{path}: missing {hf_names.to_hf(name)} (the config asks for {shape})")
        if tuple(weights[name].shape) != shape:
            raise ConversionError(f"{path}: {hf_names.to_hf(name)} has shape {tuple(weights[name].shape)}, "
                                  f"the config asks for {shape}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ConversionError(f"{path}: {hf_names.to_hf(extra[0])} does not belong to a model of this config")
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    model.load_state_dict(weights, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced the shared Parameter on both sides separately
        model.lm_head.weight = model.embed.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.eval()
    notes = []
    if hf.get("pretraining_tp", 1) != 1:
        notes.append(f"pretraining_tp={hf['pretraining_tp']} only split transformers' matmuls; the model is the same")
    if cfg.n_kv_heads != cfg.n_heads:
        notes.append(f"grouped-query attention: {cfg.n_heads} query heads over {cfg.n_kv_heads} k/v heads")
    source = {"path": str(path.resolve()), "model_type": hf["model_type"], "dtype": dtype,
              "architectures": hf.get("architectures", [])}
    return HFModel(model, coverage, cfg, tokenizer, source, notes)


def import_hf(path: str | Path, out: str | Path, progress: Progress = _noop) -> ImportResult:
    """`qtool import`: write OUT/ckpt.pt (a training checkpoint), OUT/recipe.yaml and OUT/tokenizer.json.
    Refuses an OUT that already holds a checkpoint."""
    out = Path(out)
    ckpt_path = out / CKPT_NAME
    if ckpt_path.exists():
        raise CheckpointError(f"{ckpt_path} already exists; choose another --out (nothing was overwritten)")
    hf = from_hf(path, progress)
    progress("writing checkpoint", 0, 1)
    with run_dir_lock(out, "qtool import"):  # OUT is a run directory: one writer at a time
        if ckpt_path.exists():  # a run that started meanwhile
            raise CheckpointError(f"{ckpt_path} already exists; choose another --out (nothing was overwritten)")
        return _write_import(hf, out, ckpt_path, progress)


def _write_import(hf: HFModel, out: Path, ckpt_path: Path, progress: Progress) -> ImportResult:
    state = hf.checkpoint()
    atomic_write_text(out / "tokenizer.json", hf.tokenizer.to_str())
    recipe = import_recipe(hf.config, hf.source["path"])
    recipe.data.tokenizer = str((out / "tokenizer.json").resolve())
    state["recipe"] = recipe.to_dict()
    from qtoolkit.training.recipe import save_recipe

    save_recipe(recipe, out / "recipe.yaml")
    save_checkpoint(state, ckpt_path)
    progress("writing checkpoint", 1, 1)
    return ImportResult(ckpt_path, hf.source, hf.config, hf.model.num_params(), hf.tokenizer.get_vocab_size(),
                        ckpt_path.stat().st_size, hf.notes)


__all__ = ["HFModel", "ImportResult", "from_hf", "import_hf", "import_recipe", "read_hf_config"]
