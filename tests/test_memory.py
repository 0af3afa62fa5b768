"""The training-memory estimate and the micro-batch fitting (training/memory.py, `qtool plan --train`,
the start of `qtool train`)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from qtoolkit.cli import app
from qtoolkit.config import ModelConfig
from qtoolkit.errors import InsufficientMemory
from qtoolkit.training import memory
from qtoolkit.training.memory import GIB, estimate_training_memory, plan_training_memory, safety
from qtoolkit.training.recipe import load_recipe
from qtoolkit.training.trainer import train


@pytest.fixture
def fixed_rss(monkeypatch):
    """The process's own resident set varies from call to call; a constant makes estimates exact."""
    monkeypatch.setattr(memory, "_rss", lambda: 100 * 2**20)


def recipe(*extra, preset="tiny", name="ternary_all"):
    return load_recipe(name, [f"model.preset={preset}", *extra])


def test_static_parts_are_exact(fixed_rss):
    e = estimate_training_memory(recipe(name="fp32_baseline"), "cpu")
    n = ModelConfig.from_name("tiny").num_params()
    assert e.parts["gradients"] == 4 * n and e.parts["optimizer"] == 8 * n
    assert e.parts["weights"] >= 4 * n  # + the RoPE tables
    assert e.total == sum(e.parts.values())
    assert e.parts["runtime"] == 100 * 2**20


def test_each_saver_lowers_its_part(fixed_rss):
    base = estimate_training_memory(recipe(preset="small"), "cpu")
    half = estimate_training_memory(recipe("train.micro_batch_size=8", preset="small"), "cpu")
    chunked = estimate_training_memory(recipe("train.ce_chunk=512", preset="small"), "cpu")
    ckpt = estimate_training_memory(recipe("train.activation_checkpointing=true", preset="small"), "cpu")
    assert half.parts["logits"] * 2 == base.parts["logits"]
    assert 0.45 < half.parts["activations"] / base.parts["activations"] < 0.55
    assert chunked.parts["logits"] * 8 == base.parts["logits"] and chunked.parts["activations"] == base.parts["activations"]
    assert ckpt.parts["activations"] < base.parts["activations"] / 3 and ckpt.parts["logits"] == base.parts["logits"]
    # ternary layers save more than fp32 ones (quantized weight copies, int8 inputs): measured, not assumed
    fp32 = estimate_training_memory(recipe(preset="small", name="fp32_baseline"), "cpu")
    assert fp32.parts["activations"] < base.parts["activations"]


def test_the_plan_picks_the_largest_micro_batch_that_fits(fixed_rss):
    r = recipe("train.batch_size=16")
    sizes = {m: estimate_training_memory(r, "cpu", m).total for m in (16, 8, 4, 2, 1)}
    assert sizes[16] > sizes[8] > sizes[4] > sizes[2] > sizes[1]
    room = int((sizes[4] + sizes[8]) / 2 / safety("cpu"))  # 4 fits, 8 does not
    plan = plan_training_memory(r, "cpu", available=(room, "test"))
    assert not plan.fits and plan.fitted_micro_batch == 4 and plan.tried == [8, 4]
    assert plan_training_memory(r, "cpu", available=(10 * sizes[16], "test")).fitted_micro_batch == 16
    assert plan_training_memory(r, "cpu", available=(sizes[1] // 2, "test")).fitted is None
    d = plan.to_dict()
    assert d["fitted_micro_batch"] == 4 and d["estimate"]["total"] == sizes[16]


def test_train_runs_the_micro_batch_that_fits(fixed_rss, corpus_dir, tmp_path):
    r = recipe(f"data.path={corpus_dir}", "train.steps=2", "train.eval_batches=1")
    sizes = {m: estimate_training_memory(r, "cpu", m).total for m in (8, 4, 2)}
    gib = (sizes[2] + sizes[4]) / 2 / safety("cpu") / GIB  # 2 fits, 4 does not
    events = []
    res = train(recipe(f"data.path={corpus_dir}", "train.steps=2", "train.eval_batches=1", f"train.memory_gib={gib}"),
                tmp_path / "run", callback=events.append)
    assert res.steps == 2
    mem = next(e for e in events if e.kind == "memory").data
    assert mem["changed"] and mem["micro_batch_size"] == 2 and mem["available_source"] == "train.memory_gib"
    assert mem["estimate"]["micro_batch_size"] == 8 and mem["fitted"]["micro_batch_size"] == 2  # asked, chosen
    saved = load_recipe(str(tmp_path / "run" / "recipe.yaml"))
    assert saved.train.micro_batch_size == 2 and saved.train.batch_size == 8  # the global batch is unchanged


def test_a_run_that_cannot_fit_stops_before_anything_is_written(corpus_dir, tmp_path):
    r = recipe(f"data.path={corpus_dir}", "train.memory_gib=0.01")
    with pytest.raises(InsufficientMemory, match=r"even at train.micro_batch_size=1.*train.ce_chunk.*"
                                                  r"activation_checkpointing.*memory_gib"):
        train(r, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # fit_memory=false: the estimate is reported, the run goes on
    events = []
    train(recipe(f"data.path={corpus_dir}", "train.memory_gib=0.01", "train.fit_memory=false", "train.steps=1"),
          tmp_path / "anyway", callback=events.append)
    mem = next(e for e in events if e.kind == "memory").data
    assert not mem["fits"] and not mem["changed"]


def test_cli_refuses_with_one_line_and_writes_nothing(corpus_dir, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--recipe", "ternary_all", "--model", "tiny", "--data", str(corpus_dir),
                                   "-o", str(out), "--set", "train.memory_gib=0.01"])
    assert res.exit_code == 1
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "even at train.micro_batch_size=1" in lines[0], res.output
    assert not out.exists()


def test_plan_train_cli(tmp_path):
    res = CliRunner().invoke(app, ["plan", "--recipe", "ternary_all", "--model", "small", "--train", "--device", "cpu",
                                   "--json", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    assert "training memory" in res.output and "activations" in res.output
    d = json.loads((tmp_path / "plan.json").read_text())["training"]
    assert d["estimate"]["micro_batch_size"] == 16 and d["estimate"]["total"] == sum(d["estimate"]["parts"].values())
    assert d["available"] > 0


_MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import train

    def status(field):
        return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith(field + ":"))

    seen = {}
    def callback(event):
        if event.kind == "memory":
            seen["estimate"] = (event.data["fitted"] or event.data["estimate"])["total"]
        if event.kind == "start":  # data and tokenizer are ready: reset the peak to the current resident set
            Path("/proc/self/clear_refs").write_text("5")
    preset, data, out, *extra = sys.argv[1:]
    train(load_recipe("ternary_all", [f"model.preset={preset}", f"data.path={data}", "train.eval_batches=1", *extra]),
          out, callback=callback)
    print(json.dumps({"estimate": seen["estimate"], "peak": status("VmHWM")}))
""")


@pytest.mark.parametrize("preset,extra", [
    ("tiny", ["train.steps=2"]),
    ("small", ["train.steps=1", "train.batch_size=4"]),
])
def test_estimate_is_within_a_third_of_the_measured_peak(preset, extra, corpus_dir, tmp_path):
    """The estimate against the peak resident set of a real run's steps (a fresh process each).
    Margin: 33%. benchmarks/train_memory.py measures the full-size cases (docs/training.md)."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, preset, str(corpus_dir), str(tmp_path / "run"), *extra],
                          capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode and "clear_refs" in proc.stderr:
        pytest.skip("this kernel cannot reset the peak resident set")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    error = (r["estimate"] - r["peak"]) / r["peak"]
    print(f"{preset}: estimate {r['estimate'] / 2**20:.0f} MiB, measured {r['peak'] / 2**20:.0f} MiB, {error:+.1%}")
    assert abs(error) < 0.33, r
