"""Shared fixtures: deterministic seeds, isolated caches, a small synthetic corpus, the shared data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# ../shared/data beside the checkout; QTOOLKIT_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(os.environ.get("QTOOLKIT_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")

_NAMES = ["Lily", "Tom", "Sam", "Mia", "Ben", "Anna"]
_THINGS = ["ball", "cat", "dog", "tree", "cake", "boat", "kite", "hat"]
_COLORS = ["red", "big", "small", "blue", "happy", "shiny"]
_VERBS = ["found", "saw", "liked", "lost", "wanted", "made"]


def make_story(rng: random.Random) -> str:
    name, thing, color, verb = (rng.choice(x) for x in (_NAMES, _THINGS, _COLORS, _VERBS))
    friend = rng.choice([n for n in _NAMES if n != name])
    return (
        f"Once upon a time, {name} {verb} a {color} {thing}. {name} showed the {thing} to {friend}.\n"
        f"{friend} said, \"I like your {color} {thing}!\" They played with the {thing} all day. "
        f"The end."
    )


def write_corpus(path: Path, n_stories: int, seed: int = 0, sep: str = "\n<|endoftext|>\n") -> Path:
    rng = random.Random(seed)
    path.write_text(sep.join(make_story(rng) for _ in range(n_stories)) + "\n")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    """Caches live in the session's temp dir (session-scoped so session fixtures use them too)."""
    root = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTOOLKIT_CACHE", str(root / "qtoolkit-cache"))
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets-cache"))
        yield


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory with a train file and a validation file of synthetic stories."""
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d / "stories_train.txt", 1500, seed=1)
    write_corpus(d / "stories_val.txt", 200, seed=2)
    return d


@pytest.fixture(scope="session")
def fp32_ckpt(corpus_dir, tmp_path_factory) -> Path:
    """A tiny fp32 model trained for 40 steps on the synthetic corpus (latent weights for probes/search)."""
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import train

    out = tmp_path_factory.mktemp("fp32run")
    train(load_recipe("fp32_baseline", ["model.preset=tiny", f"data.path={corpus_dir}", "train.steps=40",
                                        "train.eval_batches=2"]), out)
    return out / "ckpt.pt"


@pytest.fixture()
def shared_tinystories() -> Path:
    d = SHARED_DATA / "tinystories"
    if not d.is_dir():
        pytest.skip(f"shared TinyStories data not found at {d}")
    return d


def save_untrained_checkpoint(path: Path, recipe_name: str = "ternary_all", overrides=(), mutate=None) -> Path:
    """A training checkpoint of a freshly built model (no training), optionally edited by `mutate(model)`."""
    from qtoolkit.checkpoint import save_checkpoint
    from qtoolkit.policy import build_model
    from qtoolkit.training.recipe import load_recipe

    r = load_recipe(recipe_name, ["model.preset=tiny", *overrides]).resolved()
    model, coverage = build_model(r.model_config(), r.policy)
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    save_checkpoint({"kind": "train", "model_config": r.model_config().to_dict(), "recipe": r.to_dict(),
                     "policy": r.policy, "coverage": coverage.to_dict(), "tokenizer": "{}",
                     "model": model.state_dict(), "step": 0}, path)
    return path


@pytest.fixture(scope="session")
def trained_tiny(corpus_dir, tmp_path_factory) -> Path:
    """A `ternary_all` tiny model trained for 100 steps on the synthetic stories (~10 s): sharp
    enough predictions for greedy generations to be compared, with a real tokenizer."""
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import train

    out = tmp_path_factory.mktemp("trained_tiny")
    root = tmp_path_factory.getbasetemp()
    r = load_recipe("ternary_all", ["model.preset=tiny", f"data.path={corpus_dir}", "train.steps=100",
                                    "train.eval_batches=2", "train.eval_every=100", "train.ckpt_every=100"])
    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before the per-test cache isolation
        mp.setenv("QTOOLKIT_CACHE", str(root / "qtoolkit-cache"))
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets-cache"))
        train(r, out)
    return out / "ckpt.pt"


# ------------------------------------------------------------------------------ a calibrating quantizer


def _calib_int8_class():
    from qtoolkit.quantizers.int8 import Int8Quantizer

    class CalibInt8(Int8Quantizer):
        """A real, small calibrating quantizer (registered only by the `calib_int8` fixture): int8 codes
        whose per-row scale is fixed by calibration, the clipping ratio that minimises the layer's
        output error tr((Q - W) H (Q - W)^T), H = sum x^T x over the calibration inputs. It returns
        the rounded weight as the new latent weight (as GPTQ will), keeps its scale as a buffer, and
        keeps what it observed (`last_h`, `observed_batches`) for the tests to inspect."""

        calibration = True
        RATIOS = torch.linspace(0.5, 1.0, 11)

        def init_from_weight(self, weight):
            rows = weight.shape[0]
            absmax = weight.detach().float().abs().amax(dim=1).clamp_min(1e-8)
            self.register_buffer("scale", (absmax / 127).reshape(rows, 1, 1))
            self._h, self.observed_batches, self.last_h = None, 0, None

        def scales(self, w):
            return self.scale

        def observe(self, x):
            x2 = x.reshape(-1, x.shape[-1]).double()
            self._h = x2.T @ x2 if self._h is None else self._h + x2.T @ x2
            self.observed_batches += 1

        def calibrate(self, weight):
            w = weight.float()
            h = self._h.float()
            absmax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
            best_err, best_s = None, None
            for r in self.RATIOS:
                s = absmax * r / 127
                d = (w / s).round().clamp(-127, 127) * s - w
                err = ((d @ h) * d).sum(dim=1, keepdim=True)
                if best_err is None:
                    best_err, best_s = err, s
                else:
                    better = err < best_err
                    best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
            self.scale.copy_(best_s.reshape(self.scale.shape))
            self.last_h, self._h = self._h, None  # statistics released (kept only for the test to inspect)
            return (w / best_s).round().clamp(-127, 127) * best_s

    return CalibInt8


@pytest.fixture()
def calib_int8():
    """Registers `calib_int8` for one test (the registry's contract tests never see it)."""
    from qtoolkit import quantizers

    quantizers.register("calib_int8")(_calib_int8_class())
    yield "calib_int8"
    quantizers._REGISTRY.pop("calib_int8")
