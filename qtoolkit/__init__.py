"""qtoolkit: non-uniform mixed-precision (ternary-first) quantization for transformer LMs.

The public Python API; every `qtool` command is a thin wrapper over these.

    from qtoolkit import ModelConfig, DecoderLM, apply_policy, load_recipe, quantize, train

    model = DecoderLM(ModelConfig.from_name("small"))
    coverage = apply_policy(model, {"_default": "ternary", "embed": "int8", "lm_head": "int8"})
    result = train(load_recipe("ternary_all", ["data.path=../shared/data/tinystories"]), "runs/x")
    quantized = quantize("runs/fp32/ckpt.pt", "search_out/policy.yaml")   # post-training

Names are imported on first use (PEP 562), so e.g. loading a packed checkpoint does not import the
training loop or the data pipeline.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "quantizers": "qtoolkit.quantizers",
    "ModelConfig": "qtoolkit.config",
    "PRESETS": "qtoolkit.config",
    "DecoderLM": "qtoolkit.model",
    "Policy": "qtoolkit.policy",
    "Coverage": "qtoolkit.policy",
    "apply_policy": "qtoolkit.policy",
    "build_model": "qtoolkit.policy",
    "Recipe": "qtoolkit.training.recipe",
    "load_recipe": "qtoolkit.training.recipe",
    "available_recipes": "qtoolkit.training.recipe",
    "load_checkpoint": "qtoolkit.checkpoint",
    "save_checkpoint": "qtoolkit.checkpoint",
    "memory_plan": "qtoolkit.pack",
    "pack_checkpoint": "qtoolkit.pack",
    "save_packed": "qtoolkit.pack",
    "load_packed": "qtoolkit.pack",
    "model_from_checkpoint": "qtoolkit.pack",
    "calibrate_model": "qtoolkit.calibration",
    "quantize": "qtoolkit.training.ptq",
    "quantize_checkpoint": "qtoolkit.training.ptq",
    "train": "qtoolkit.training.trainer",
    "evaluate_checkpoint": "qtoolkit.training.trainer",
    "GlueConfig": "qtoolkit.evaluate.glue",
    "run_glue": "qtoolkit.evaluate.glue",
    "from_hf": "qtoolkit.interop.hf_import",
    "import_hf": "qtoolkit.interop.hf_import",
    "export_gguf": "qtoolkit.interop.gguf_export",
    "export_hf": "qtoolkit.interop.hf_export",
    "QToolkitError": "qtoolkit.errors",
    "ConfigError": "qtoolkit.errors",
    "UnknownNameError": "qtoolkit.errors",
    "PolicyError": "qtoolkit.errors",
    "CheckpointError": "qtoolkit.errors",
    "DataError": "qtoolkit.errors",
    "ConversionError": "qtoolkit.errors",
    "TrainingDiverged": "qtoolkit.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qtoolkit' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if mod.__name__ == f"qtoolkit.{name}" else getattr(mod, name)  # a module or a name in it
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
