from __future__ import annotations

import itertools
import json
import random

import pytest

from qtoolkit.config import ModelConfig
from qtoolkit.errors import ConfigError
from qtoolkit.pack import memory_plan
from qtoolkit.search import allocate as qsearch
from qtoolkit.search.allocate import (
    SearchError,
    build_space,
    milp_allocations,
    parse_budget,
    run_search,
)
from qtoolkit.search.probes import parse_formats
from qtoolkit.training.recipe import load_recipe

FORMATS = parse_formats("ternary,int8,fp16")



def test_parse_budget():
    assert parse_budget("400MB") == 400_000_000
    assert parse_budget("1.5GB") == 1_500_000_000
    assert parse_budget("64MiB") == 64 * 2**20
    assert parse_budget("512 KiB") == 512 * 1024
    assert parse_budget("12345") == 12345 and parse_budget("2kb") == 2000
    for bad in ("400 parsecs", "", "-3MB", "MB"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


@pytest.mark.parametrize("granularity", ["layer", "group"])
@pytest.mark.parametrize("arch", [{}, {"tie_embeddings": True, "subln": True}])
def test_allocation_bytes_equal_qtool_plan(granularity, arch):
    cfg = ModelConfig.from_name("tiny", n_layers=3, **arch)
    formats = parse_formats("[ternary, int8, fp16, {name: ternary, packing: base3, granularity: channel}]")
    space = build_space(cfg, formats, granularity)
    rng = random.Random(0)
    for _ in range(20):
        alloc = {u.name: rng.choice(space.keys) for u in space.units}
        assert space.bytes_of(alloc) == memory_plan(cfg, space.policy(alloc)).total_bytes
    assert space.min_bytes == space.bytes_of({u.name: min(space.cost[u.name], key=space.cost[u.name].get)
                                              for u in space.units})


def test_milp_is_optimal_and_k_best_are_ordered():
    space = build_space(ModelConfig.from_name("tiny"), FORMATS, "group")  # 6 units x 3 formats
    rng = random.Random(1)
    sens = {u.name: {"ternary": rng.uniform(0.1, 1.0), "int8": rng.uniform(0, 0.05), "fp16": rng.uniform(0, 0.01)}
            for u in space.units}
    budget = (space.min_bytes + space.max_bytes) // 3

    def value(a):
        return sum(sens[u][f] for u, f in a.items())

    feasible = []
    for combo in itertools.product(space.keys, repeat=len(space.units)):
        a = dict(zip([u.name for u in space.units], combo, strict=True))
        if space.bytes_of(a) <= budget:
            feasible.append(value(a))
    feasible.sort()
    sols = milp_allocations(space, sens, budget, k=4)
    assert len(sols) == 4
    assert [value(a) for a in sols] == pytest.approx(feasible[:4])
    assert all(space.bytes_of(a) <= budget for a in sols)


def test_impossible_budget_fails_at_once_with_the_smallest_size(fp32_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(qsearch, "run_probe", lambda *a, **k: pytest.fail("probed before checking the budget"))
    smallest = memory_plan(ModelConfig.from_name("tiny"), {"_default": "ternary", "embed": "ternary"}).total_bytes
    with pytest.raises(SearchError, match=f"below the smallest reachable size {smallest:,} B"):
        run_search(fp32_ckpt, "10KB", FORMATS, tmp_path / "out")


def test_search_within_budget_and_outputs(fp32_ckpt, tmp_path):
    budget = 100_000  # between all-ternary (42.8 kB) and all-int8 (176.6 kB)
    res = run_search(fp32_ckpt, budget, FORMATS, tmp_path / "out", trials=8, calib_tokens=256, eval_batches=2)
    assert res.best is not None and res.best["bytes"] <= budget
    cfg = ModelConfig.from_name("tiny")
    policy_file = tmp_path / "out" / "policy.yaml"
    assert memory_plan(cfg, str(policy_file)).total_bytes == res.best["bytes"]  # == qtool plan
    data = json.loads((tmp_path / "out" / "search.json").read_text())
    complete = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    assert len(complete) == 8 and all(t["bytes"] <= budget for t in complete)
    assert complete[0]["source"].startswith("milp")
    assert data["references"]["ternary"]["bytes"] == res.min_bytes
    # the searched policy beats the only uniform policy that fits (all-ternary) by a wide margin
    assert res.best["loss"] < data["references"]["ternary"]["loss"] - 0.1
    # and it is consumable by qtool train
    r = load_recipe("ternary_all", ["model.preset=tiny", f"policy={policy_file}"])
    assert r.policy == __import__("yaml").safe_load(policy_file.read_text())


def test_killed_search_continues_from_finished_trials(fp32_ckpt, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = qsearch.Evaluator.__call__

    def flaky(self, alloc):
        calls["n"] += 1
        if calls["n"] == 3 + 3:  # 3 references, then 2 trials finish, the 3rd is interrupted
            raise KeyboardInterrupt
        return real(self, alloc)

    monkeypatch.setattr(qsearch.Evaluator, "__call__", flaky)
    first = run_search(fp32_ckpt, 100_000, FORMATS, tmp_path / "out", trials=6, calib_tokens=256, eval_batches=2)
    assert first.interrupted
    done_first = [t for t in first.trials if t["state"] == "COMPLETE"]
    assert len(done_first) == 2 and (tmp_path / "out" / "search.json").is_file()
    monkeypatch.setattr(qsearch.Evaluator, "__call__", real)
    second = run_search(fp32_ckpt, 100_000, FORMATS, tmp_path / "out", trials=6, calib_tokens=256, eval_batches=2)
    done = [t for t in second.trials if t["state"] == "COMPLETE"]
    assert len(done) == 6 and not second.interrupted
    kept = {t["number"]: t for t in done}
    for t in done_first:  # the finished trials were kept, not redone
        assert kept[t["number"]]["loss"] == t["loss"]
    assert sum(t["source"] == "milp#1" for t in second.trials) == 1  # seeds enqueued once


def test_pareto_and_finetune_and_journal_storage(fp32_ckpt, tmp_path):
    res = run_search(fp32_ckpt, 150_000, FORMATS, tmp_path / "p", trials=6, pareto=True, calib_tokens=256,
                     eval_batches=2, storage=f"journal:{tmp_path / 'j.log'}", finetune_steps=2)
    front = res.pareto_front
    assert front and all(a["bytes"] < b["bytes"] and a["loss"] > b["loss"] for a, b in zip(front, front[1:], strict=False))
    assert (tmp_path / "j.log").is_file()
    from qtoolkit.report import save_search_plot

    save_search_plot(res, tmp_path / "pareto.png")  # the trial scatter is optuna's plot_pareto_front here
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_search_reproducible(fp32_ckpt, tmp_path):
    a = run_search(fp32_ckpt, 100_000, FORMATS, tmp_path / "a", trials=7, calib_tokens=256, eval_batches=2)
    b = run_search(fp32_ckpt, 100_000, FORMATS, tmp_path / "b", trials=7, calib_tokens=256, eval_batches=2)
    key = [(t["allocation"], t["loss"]) for t in a.trials if t["state"] == "COMPLETE"]
    assert key == [(t["allocation"], t["loss"]) for t in b.trials if t["state"] == "COMPLETE"]


def test_search_with_issue_13_formats_finishes_within_budget(fp32_ckpt, tmp_path):
    """sherry, tequila and binary are candidates like any registered format (exact costs, probes,
    the MILP seed, the Optuna trials); the written policy trains and plans to the charged bytes."""
    formats = parse_formats("sherry,tequila,binary,int8")
    assert [f.key for f in formats] == ["sherry", "tequila", "binary", "int8"]
    budget = 80_000
    res = run_search(fp32_ckpt, budget, formats, tmp_path / "out", trials=6, calib_tokens=256, eval_batches=2)
    assert res.best is not None and res.best["bytes"] <= budget
    assert set(res.probe.measured["blocks.0.mlp.up_proj"]) == {"sherry", "tequila", "binary", "int8"}
    policy_file = tmp_path / "out" / "policy.yaml"
    assert memory_plan(ModelConfig.from_name("tiny"), str(policy_file)).total_bytes == res.best["bytes"]


def test_search_with_issue_12_formats_finishes_within_budget(fp32_ckpt, tmp_path):
    """intn aliases (RTN and GPTQ, which calibrates on the search's calibration windows) and ptqtp
    are candidates like any format: exact costs, probes, the exact MILP seed over all of them."""
    formats = parse_formats("ternary,ptqtp,int4,gptq3,int8")
    assert [f.key for f in formats] == ["ternary", "ptqtp", "int4", "gptq3", "int8"]
    budget = 100_000
    res = run_search(fp32_ckpt, budget, formats, tmp_path / "out", trials=6, calib_tokens=256, eval_batches=2)
    assert res.best is not None and res.best["bytes"] <= budget
    assert set(res.probe.measured["blocks.0.mlp.up_proj"]) == {"ternary", "ptqtp", "int4", "gptq3", "int8"}
    data = json.loads((tmp_path / "out" / "search.json").read_text())
    complete = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    assert complete[0]["source"].startswith("milp") and all(t["bytes"] <= budget for t in complete)
    policy_file = tmp_path / "out" / "policy.yaml"
    assert memory_plan(ModelConfig.from_name("tiny"), str(policy_file)).total_bytes == res.best["bytes"]


# ------------------------------------------------------------------------------ --apply


def test_apply_writes_what_the_search_scored(fp32_ckpt, corpus_dir, tmp_path):
    """PTQ: `qtool eval` of the applied checkpoint gives exactly the trial's loss on the search's
    batches, and `qtool pack` writes exactly the bytes the search charged."""
    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.pack import pack_checkpoint
    from qtoolkit.training.trainer import evaluate_checkpoint

    res = run_search(fp32_ckpt, 100_000, FORMATS, tmp_path / "out", trials=6, calib_tokens=256, eval_batches=2,
                     apply=True)
    applied = res.applied["quantized"]
    path = tmp_path / "out" / "quantized" / "ckpt.pt"
    assert applied["path"] == str(path) and "finetuned" not in res.applied
    ev = evaluate_checkpoint(path.parent, data_path=str(corpus_dir), batches=2)
    assert ev.val_loss == res.best["loss"]  # exactly
    packed = pack_checkpoint(path, tmp_path / "p.safetensors")
    assert packed.tensor_bytes == res.best["bytes"] == applied["bytes"]
    record = load_checkpoint(path)["quantized"]["search"]
    assert record["trial"] == res.best["number"] and record["bytes"] == res.best["bytes"]
    assert json.loads((tmp_path / "out" / "search.json").read_text())["applied"]["quantized"]["path"] == str(path)
    # a second --apply never replaces it: refused before any work
    with pytest.raises(SearchError, match="already exists"):
        run_search(fp32_ckpt, 100_000, FORMATS, tmp_path / "out", trials=6, calib_tokens=256, eval_batches=2,
                   apply=True)


def test_apply_with_finetuning_writes_the_finetuned_trial(fp32_ckpt, corpus_dir, tmp_path):
    from qtoolkit.training.trainer import evaluate_checkpoint

    res = run_search(fp32_ckpt, 100_000, FORMATS, tmp_path / "out", trials=2, calib_tokens=256, eval_batches=2,
                     finetune_steps=3, apply=True)
    quantized = evaluate_checkpoint(tmp_path / "out" / "quantized", data_path=str(corpus_dir), batches=2)
    finetuned = evaluate_checkpoint(tmp_path / "out" / "finetuned", data_path=str(corpus_dir), batches=2)
    assert finetuned.val_loss == res.best["loss"] == res.applied["finetuned"]["loss"]
    assert quantized.val_loss == res.applied["quantized"]["loss"] != finetuned.val_loss
