"""AdamW with bf16 moments for the block linears (training/optimizer.py, `train.optimizer_state`)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.cli import app
from qtoolkit.config import ModelConfig
from qtoolkit.policy import build_model
from qtoolkit.schema import SchemaError
from qtoolkit.training import memory
from qtoolkit.training.memory import estimate_training_memory
from qtoolkit.training.optimizer import (
    LowPrecisionAdamW,
    build_adamw,
    low_precision_params,
    optimizer_state_bytes,
    stochastic_round_,
)
from qtoolkit.training.recipe import load_recipe
from qtoolkit.training.trainer import param_groups, train


def tiny_recipe(corpus_dir, *extra, name="ternary_all"):
    return load_recipe(name, ["model.preset=tiny", f"data.path={corpus_dir}", "train.eval_batches=4", *extra])


def _pair(seed=0):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8))
    b = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8))
    b.load_state_dict(a.state_dict())
    return a, b


def _groups(m):
    return [{"params": [m[0].weight], "weight_decay": 0.1}, {"params": [m[0].bias, *m[1].parameters()],
                                                             "weight_decay": 0.0}]


def _steps(pairs, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 16, generator=g)
        for model, opt in pairs:
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()


def test_fp32_moments_are_torch_adamw_bit_for_bit():
    a, b = _pair()
    ta = torch.optim.AdamW(_groups(a), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    tb = LowPrecisionAdamW(_groups(b), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)  # no low-precision parameters
    _steps([(a, ta), (b, tb)], 6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = ta.state_dict()["state"], tb.state_dict()["state"]
    for i in sa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)


def test_bf16_moments_stay_close_to_fp32_ones():
    a, b = _pair()
    ta = torch.optim.AdamW(_groups(a), lr=1e-2, betas=(0.9, 0.95))
    tb = LowPrecisionAdamW(_groups(b), lr=1e-2, betas=(0.9, 0.95), low_params=[b[0].weight])
    _steps([(a, ta), (b, tb)], 20)
    assert tb.state[b[0].weight]["exp_avg"].dtype == torch.bfloat16
    assert tb.state[b[0].weight]["exp_avg_sq"].dtype == torch.bfloat16
    assert tb.state[b[0].bias]["exp_avg"].dtype == torch.float32
    moved = (a[0].weight - _pair()[0][0].weight).abs().max()
    assert (a[0].weight - b[0].weight).abs().max() < 0.05 * moved  # measured 3.4e-3 of the movement


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 (1 + 2^-7)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert out.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    stochastic_round_(out, -x, torch.Generator().manual_seed(0))
    assert out.float().mean().item() == pytest.approx(-(1.0 + 2**-10), abs=2e-5)
    exact = torch.tensor([1.5, -2.0, 0.0, float("inf")])
    assert torch.equal(stochastic_round_(torch.empty(4, dtype=torch.bfloat16), exact).float(), exact)


def test_round_to_nearest_would_freeze_the_second_moment():
    """Why the bf16 moments are rounded stochastically: with beta2 = 0.999 and zero gradients v should
    decay as 0.999^t, but 0.999 v rounds back to v in bf16 (a step is 0.4% near 1)."""
    results = {}
    for rounding in ("nearest", "stochastic"):
        w = nn.Parameter(torch.zeros(4096))
        opt = LowPrecisionAdamW([w], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, low_params=[w],
                                rounding=rounding)
        w.grad = torch.ones(4096)
        opt.step()
        opt.state[w]["exp_avg_sq"].fill_(1.0)
        w.grad = torch.zeros(4096)
        for _ in range(1000):
            opt.step()
        results[rounding] = opt.state[w]["exp_avg_sq"].float().mean().item()
    assert results["nearest"] == 1.0
    assert results["stochastic"] == pytest.approx(0.999**1000, rel=0.05)


def test_which_parameters_get_low_precision_moments():
    model, _ = build_model(ModelConfig.from_name("tiny"), {"_default": "ternary"})
    low = {id(p) for p in low_precision_params(model)}
    names = [n for n, p in model.named_parameters() if id(p) in low]
    assert names and all(n.startswith("blocks.") and n.endswith("_proj.weight") for n in names)
    assert len(names) == 7 * model.config.n_layers
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_low = sum(p.numel() for p in low_precision_params(model))
    assert optimizer_state_bytes(model, "fp32") == 8 * n_all
    assert optimizer_state_bytes(model, "bf16") == 8 * n_all - 4 * n_low
    assert isinstance(build_adamw(param_groups(model, 0.1), model, 1e-3, (0.9, 0.95), 1e-8, "fp32"),
                      torch.optim.AdamW)


def test_bf16_training_checkpoint_holds_bf16_moments(corpus_dir, tmp_path):
    res = train(tiny_recipe(corpus_dir, "train.steps=6", "train.eval_every=6", "train.optimizer_state=bf16"),
                tmp_path / "run")
    assert res.steps == 6 and res.val_loss < 6.0
    ckpt = load_checkpoint(res.checkpoint)  # weights_only=True: bf16 tensors need no code to load
    assert ckpt["recipe"]["train"]["optimizer_state"] == "bf16"
    model, _ = build_model(ModelConfig.from_name("tiny"), ckpt["policy"])
    low = {id(p) for p in low_precision_params(model)}
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [p for group in param_groups(model, 0.1) for p in group["params"]]  # the state's indexing
    state = ckpt["optimizer"]["state"]
    assert len(state) == len(order) and low
    for i, p in enumerate(order):
        name = name_of[id(p)]
        want = torch.bfloat16 if id(p) in low else torch.float32
        assert state[i]["exp_avg"].dtype == want and state[i]["exp_avg_sq"].dtype == want, name
        assert torch.isfinite(state[i]["exp_avg"].float()).all()


def _split_run(corpus_dir, tmp_path, first, second, steps=10, cut=4):
    extra = [f"train.steps={steps}", "train.eval_every=100", "train.ckpt_every=100"]
    stop = threading.Event()
    part = train(tiny_recipe(corpus_dir, *extra, *first), tmp_path / "split", stop=stop,
                 callback=lambda e: stop.set() if e.kind == "step" and e.step == cut else None)
    assert part.interrupted and part.steps == cut
    return train(tiny_recipe(corpus_dir, *extra, *second), tmp_path / "split", resume=True)


def test_bf16_resume_is_bit_exact(corpus_dir, tmp_path):
    bf16 = ["train.optimizer_state=bf16"]
    train(tiny_recipe(corpus_dir, "train.steps=10", "train.eval_every=100", "train.ckpt_every=100", *bf16),
          tmp_path / "full")
    assert _split_run(corpus_dir, tmp_path, bf16, bf16).steps == 10
    a, b = (load_checkpoint(tmp_path / d / "ckpt.pt") for d in ("full", "split"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for key, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][key]), (i, key)


def test_resume_converts_the_moments_to_the_new_choice(corpus_dir, tmp_path):
    res = _split_run(corpus_dir, tmp_path, [], ["train.optimizer_state=bf16"])
    ckpt = load_checkpoint(res.checkpoint)
    assert res.steps == 10 and ckpt["recipe"]["train"]["optimizer_state"] == "bf16"
    dtypes = {v["exp_avg"].dtype for v in ckpt["optimizer"]["state"].values()}
    assert dtypes == {torch.bfloat16, torch.float32}
    back = _split_run(corpus_dir, tmp_path / "back", ["train.optimizer_state=bf16"], [])  # bf16 -> fp32: exact
    ckpt = load_checkpoint(back.checkpoint)
    assert {v["exp_avg"].dtype for v in ckpt["optimizer"]["state"].values()} == {torch.float32}


def test_the_memory_estimate_counts_the_chosen_precision(monkeypatch):
    monkeypatch.setattr(memory, "_rss", lambda: 100 * 2**20)
    model, _ = build_model(ModelConfig.from_name("small"), load_recipe("ternary_all").policy)
    n_low = sum(p.numel() for p in low_precision_params(model))
    fp32, bf16 = (estimate_training_memory(load_recipe("ternary_all", [f"train.optimizer_state={s}"]))
                  for s in ("fp32", "bf16"))
    assert fp32.parts["optimizer"] - bf16.parts["optimizer"] == 4 * n_low
    assert fp32.total - bf16.total == 4 * n_low  # nothing else moves
    assert 4 * n_low > 0.25 * fp32.parts["optimizer"]  # the block linears are most of `small`'s values


def test_plan_train_shows_the_saving(tmp_path):
    runner = CliRunner()
    out = {}
    for state in ("fp32", "bf16"):
        r = runner.invoke(app, ["plan", "--recipe", "ternary_all", "--model", "tiny", "--train", "--device", "cpu",
                                "--set", f"train.optimizer_state={state}", "--json", str(tmp_path / f"{state}.json")])
        assert r.exit_code == 0, r.output
        estimate = json.loads((tmp_path / f"{state}.json").read_text())["training"]["estimate"]
        assert estimate["optimizer_state"] == state
        out[state] = estimate["parts"]["optimizer"]
    assert out["bf16"] < out["fp32"]


def test_a_bad_choice_is_one_clear_error(corpus_dir, tmp_path):
    with pytest.raises(SchemaError, match="train.optimizer_state: must be one of 'fp32', 'bf16'; got 'fp16'"):
        tiny_recipe(corpus_dir, "train.optimizer_state=fp16")
    r = CliRunner().invoke(app, ["train", "--recipe", "ternary_all", "--model", "tiny", "--data", str(corpus_dir),
                                 "-o", str(tmp_path / "run"), "--set", "train.optimizer_state=fp16"])
    assert r.exit_code != 0
    assert "train.optimizer_state: must be one of 'fp32', 'bf16'" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "run").exists()
