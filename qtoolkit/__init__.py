"""qtoolkit: non-uniform mixed-precision (ternary-first) quantization for transformer LMs.

The public Python API; every `qtool` command is a thin wrapper over these.

    from qtoolkit import ModelConfig, DecoderLM, apply_policy, load_recipe, train

    model = DecoderLM(ModelConfig.from_name("small"))
    coverage = apply_policy(model, {"_default": "ternary", "embed": "int8", "lm_head": "int8"})
    result = train(load_recipe("ternary_all", ["data.path=../shared/data/tinystories"]), "runs/x")
"""

from qtoolkit import quantizers
from qtoolkit.checkpoint import load_checkpoint, save_checkpoint
from qtoolkit.config import PRESETS, ModelConfig
from qtoolkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PolicyError,
    QToolkitError,
    TrainingDiverged,
    UnknownNameError,
)
from qtoolkit.model import DecoderLM
from qtoolkit.policy import Coverage, Policy, apply_policy
from qtoolkit.recipe import Recipe, available_recipes, load_recipe
from qtoolkit.train import build_model, evaluate_checkpoint, model_from_checkpoint, train

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "Coverage", "DataError", "DecoderLM", "ModelConfig",
    "Policy", "PolicyError", "QToolkitError", "Recipe", "TrainingDiverged", "UnknownNameError",
    "apply_policy", "available_recipes", "build_model", "evaluate_checkpoint", "load_checkpoint",
    "load_recipe", "model_from_checkpoint", "quantizers", "save_checkpoint", "train",
]
