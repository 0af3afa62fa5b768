"""Faults: concurrent runs, divergence on a checkpoint step, SIGTERM, crashes' leftovers, resume with
another recipe, memory-bomb configs under an allocation cap, and a search whose trials are killed.
Each test states the guarantee it checks (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qtoolkit.checkpoint import atomic_write_text, load_checkpoint
from qtoolkit.cli import app
from qtoolkit.errors import CheckpointError, TrainingDiverged
from qtoolkit.rundir import is_locked, run_dir_lock
from qtoolkit.training import trainer
from qtoolkit.training.recipe import load_recipe
from qtoolkit.training.trainer import train

from .conftest import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def tiny(corpus, *overrides):
    return load_recipe("ternary_all", ["model.preset=tiny", f"data.path={corpus}", "train.eval_batches=1",
                                       *overrides])


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "QTOOLKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------ run directory lock


def test_second_run_into_a_locked_directory_fails_at_once(corpus_dir, tmp_path):
    out = tmp_path / "run"
    with run_dir_lock(out, "test holder"):
        t0 = time.perf_counter()
        r = CliRunner().invoke(app, ["train", "--model", "tiny", "--data", str(corpus_dir), "--out", str(out),
                                     "--max-steps", 2])
        assert time.perf_counter() - t0 < 10
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{out} is in use by pid {os.getpid()} (test holder)" in r.output
    assert sorted(p.name for p in out.iterdir()) == [".qtool.lock"]  # the holder's directory, untouched


def test_two_processes_into_one_directory(corpus_dir, tmp_path):
    """A second `qtool train` into a directory another process is training in fails at once, naming
    that process; the directory then holds one run's checkpoint, recipe and metrics."""
    out = tmp_path / "run"
    code = "from qtoolkit.cli import app; app()"
    args = ["train", "--model", "tiny", "--data", str(corpus_dir), "--out", str(out), "--set", "train.eval_batches=1",
            "--set", "train.eval_every=100000", "--set", "train.log_every=1"]
    first = subprocess.Popen([sys.executable, "-c", code, *args, "--max-steps", "100000"], env=_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not is_locked(out):
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", code, *args, "--max-steps", "7"], env=_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)  # training has started (SIGTERM before that just ends a process with nothing to save)
    first.send_signal(signal.SIGTERM)
    first_output = first.communicate(timeout=120)[0]
    assert second.returncode == 1 and f"is in use by pid {first.pid}" in second.stdout + second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    assert first.returncode == 130, first_output
    assert load_checkpoint(out)["recipe"]["train"]["steps"] == 100000
    assert "steps: 100000" in (out / "recipe.yaml").read_text()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if x["type"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one run's metrics, not interleaved
    assert not is_locked(out)


def test_lock_is_released_when_the_holder_dies(tmp_path):
    out = tmp_path / "run"
    code = f"from qtoolkit.rundir import run_dir_lock\nwith run_dir_lock({str(out)!r}, 'x'):\n    import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), check=True)
    with run_dir_lock(out, "after"):  # kill -9 or exit: the kernel released it
        pass


# ------------------------------------------------------------------------------ divergence


def test_nan_on_a_checkpoint_step_never_reaches_the_checkpoint(corpus_dir, tmp_path):
    """The issue's repro: lr=1e6 with a checkpoint every step. The run stops; the checkpoint on
    disk is finite, loads, and is the one the message calls the last good one."""
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as e:
        train(tiny(corpus_dir, "train.steps=50", "train.lr=1e6", "train.ckpt_every=1"), out)
    ckpt = load_checkpoint(out)  # would refuse non-finite weights
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert f"Last good checkpoint: {out / 'ckpt.pt'} (step {ckpt['step']})" in str(e.value)
    assert "stopped before applying the update" in str(e.value) or "became non-finite" in str(e.value)


def test_weights_that_overflow_in_the_update_are_not_saved(corpus_dir, tmp_path, monkeypatch):
    """A finite loss and gradient whose update still overflows the weights: caught at checkpoint time."""
    out = tmp_path / "run"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        result = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 4:  # the update of step 4, a checkpoint step
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(TrainingDiverged, match=r"non-finite by step 4.*\(step 2\)"):
        train(tiny(corpus_dir, "train.steps=10", "train.ckpt_every=2", "train.eval_every=100"), out)
    assert load_checkpoint(out)["step"] == 2


def test_nan_validation_loss_is_not_checkpointed(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = trainer.evaluate

    def evaluate(*a, **k):
        res = real(*a, **k)
        return {**res, "val_loss": float("nan")}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    with pytest.raises(TrainingDiverged, match="validation loss nan at step 2.*No checkpoint was written"):
        train(tiny(corpus_dir, "train.steps=4", "train.eval_every=2", "train.ckpt_every=2"), out)
    assert not (out / "ckpt.pt").exists()


# ------------------------------------------------------------------------------ signals, crashes


def test_sigterm_saves_a_checkpoint_like_ctrl_c(corpus_dir, tmp_path):
    out = tmp_path / "run"
    code = "from qtoolkit.cli import app; app()"
    args = ["train", "--model", "tiny", "--data", str(corpus_dir), "--out", str(out), "--max-steps", "100000",
            "--set", "train.eval_batches=1", "--set", "train.ckpt_every=100000", "--set", "train.eval_every=100000",
            "--set", "train.log_every=1"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    ckpt = load_checkpoint(out)
    assert 3 <= ckpt["step"] < 100000
    assert "Traceback" not in output


def test_stale_temp_files_are_removed_and_stale_metrics_moved_aside(corpus_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".ckpt.pt.k3j4h5g6.tmp").write_bytes(b"half a checkpoint")
    (out / "metrics.jsonl").write_text('{"type": "train", "step": 7, "loss": 9.0}\n')  # crashed before a checkpoint
    train(tiny(corpus_dir, "train.steps=3"), out)
    assert not (out / ".ckpt.pt.k3j4h5g6.tmp").exists()
    assert (out / "metrics.stale-1.jsonl").read_text() == '{"type": "train", "step": 7, "loss": 9.0}\n'
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 7 not in steps and max(steps) == 3


def test_token_cache_temp_files_of_dead_writers_are_removed(tmp_path):
    from qtoolkit.training.data import _remove_dead_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"k.{dead.pid}.tmp").write_bytes(b"half")
    (tmp_path / f"k.{os.getpid()}.tmp").write_bytes(b"being written")  # a live writer's: kept
    (tmp_path / "k.bin").write_bytes(b"done")
    _remove_dead_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["k.bin", f"k.{os.getpid()}.tmp"])


def test_renames_are_made_durable(tmp_path, monkeypatch):
    import qtoolkit.checkpoint as ck

    synced = []
    monkeypatch.setattr(ck, "_fsync_dir", lambda d: synced.append(Path(d)))
    atomic_write_text(tmp_path / "x.txt", "hello")
    assert synced == [tmp_path]


def test_data_too_small_fails_before_the_first_step(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_corpus(d / "stories_train.txt", 200)
    (d / "stories_val.txt").write_text("Once upon a time.\n")
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="validation split has .* tokens, fewer than one sequence"):
        train(tiny(d, "train.steps=1000", "train.eval_every=1000"), tmp_path / "out")
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ resume


def test_resume_refuses_other_settings_and_allows_more_steps(corpus_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus_dir, "train.steps=4"), out)
    recipe_yaml = (out / "recipe.yaml").read_bytes()
    ckpt_bytes = (out / "ckpt.pt").read_bytes()
    for override, key in (("train.seed=1", "train.seed"), ("train.lr=0.5", "train.lr"),
                          ("train.batch_size=4", "train.batch_size"), ("data.val_fraction=0.1", "data.val_fraction")):
        with pytest.raises(CheckpointError, match=f"cannot resume with a different recipe: {key}"):
            train(tiny(corpus_dir, "train.steps=6", override), out, resume=True)
        assert (out / "recipe.yaml").read_bytes() == recipe_yaml and (out / "ckpt.pt").read_bytes() == ckpt_bytes
    other = tmp_path / "other"
    other.mkdir()
    write_corpus(other / "stories_train.txt", 300, seed=7)
    write_corpus(other / "stories_val.txt", 60, seed=8)
    with pytest.raises(CheckpointError, match="trained on other data"):
        train(tiny(other, "train.steps=6"), out, resume=True)
    res = train(tiny(corpus_dir, "train.steps=6", "train.eval_every=3"), out, resume=True)  # more steps: allowed
    assert res.steps == 6 and load_checkpoint(out)["step"] == 6
    with pytest.raises(CheckpointError, match="at step 6; train.steps \\(5\\) cannot be smaller"):
        train(tiny(corpus_dir, "train.steps=5"), out, resume=True)


@pytest.mark.parametrize("damage, message", [
    (lambda o: o["optimizer"]["state"][0].update(exp_avg=torch.zeros(3, 3)), "optimizer exp_avg of shape"),
    (lambda o: o["optimizer"]["state"][0]["exp_avg_sq"].fill_(float("inf")), "optimizer state holds NaN or inf"),
    (lambda o: o["optimizer"].update(param_groups=[]), "damaged resume state"),
    (lambda o: o.update(rng={"torch": torch.zeros(3)}), "damaged resume state"),
])
def test_damaged_resume_state_is_refused(corpus_dir, tmp_path, damage, message):
    out = tmp_path / "run"
    train(tiny(corpus_dir, "train.steps=2"), out)
    obj = torch.load(out / "ckpt.pt", weights_only=True)
    damage(obj)
    torch.save(obj, out / "ckpt.pt")
    with pytest.raises(CheckpointError, match=message):
        train(tiny(corpus_dir, "train.steps=4"), out, resume=True)


def test_resume_without_max_steps_continues_to_the_original_horizon(corpus_dir, tmp_path):
    out = tmp_path / "run"
    stop = threading.Event()

    def cb(event):
        if event.kind == "step" and event.step == 2:
            stop.set()

    train(tiny(corpus_dir, "train.steps=5"), out, callback=cb, stop=stop)
    assert load_checkpoint(out)["step"] == 2
    res = train(tiny(corpus_dir), out, resume=True)  # no train.steps given: the run's own 5
    assert res.steps == 5 and res.total_steps == 5


# ------------------------------------------------------------------------------ memory bombs


MEMORY_CAP = 2 * 2**30  # address space: torch itself maps ~0.7 GiB


@pytest.mark.parametrize("edit", [
    "cfg.update(vocab_size=2**24)",                    # one 2^24 x 64 fp32 table: 4 GiB, twice
    "cfg.update(n_layers=20000)",                      # 20000 blocks
    "cfg.update(d_model=8192, n_heads=64, d_ff=32768)",  # ~2 GiB per block
    "cfg.update(max_seq_len=2**30)",                   # RoPE tables of 2^30 positions
])
def test_memory_bomb_configs_fail_before_allocating(tmp_path, edit):
    """A 2 MB checkpoint whose config asks for gigabytes: loading it (and building the model, as
    eval does) under a 2 GiB address-space cap fails with a CheckpointError, not a MemoryError or
    the OOM killer, because the config is checked against the stored tensors first."""
    from .conftest import save_untrained_checkpoint

    path = save_untrained_checkpoint(tmp_path / "bomb.pt")
    obj = torch.load(path, weights_only=True)
    cfg = obj["model_config"]
    exec(edit, {"cfg": cfg})
    torch.save(obj, path)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))
        from qtoolkit.checkpoint import load_checkpoint
        from qtoolkit.errors import CheckpointError
        from qtoolkit.pack import model_from_checkpoint
        try:
            model_from_checkpoint(load_checkpoint({str(path)!r}))
        except CheckpointError as e:
            print("refused:", e)
            sys.exit(3)
        print("loaded")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert "refused:" in proc.stdout


# ------------------------------------------------------------------------------ search


FORMATS = None


def _formats():
    from qtoolkit.search.probes import parse_formats

    return parse_formats("ternary,int8,fp16")


def test_study_settings_are_part_of_its_identity(fp32_ckpt, tmp_path):
    from qtoolkit.search.allocate import SearchError, run_search

    kw = dict(trials=3, calib_tokens=256, storage=f"sqlite:///{tmp_path / 's.db'}", study_name="mine")
    first = run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "a", eval_batches=2, **kw)
    assert first.best is not None
    with pytest.raises(SearchError, match="eval_batches: 2 then, 1 now"):
        run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "b", eval_batches=1, **kw)
    with pytest.raises(SearchError, match="seed: 0 then, 1 now"):
        run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "c", eval_batches=2, seed=1, **kw)
    # without --study, other settings are another study (a default name hashes them)
    a = run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "d", trials=2, calib_tokens=256, eval_batches=2)
    b = run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "d2", trials=2, calib_tokens=256, eval_batches=1)
    assert a.study_name != b.study_name


def test_interrupted_seed_trials_are_run_again(fp32_ckpt, tmp_path, monkeypatch):
    import qtoolkit.search.allocate as qsearch

    calls = {"n": 0}
    real = qsearch.Evaluator.__call__

    def flaky(self, alloc):
        calls["n"] += 1
        if calls["n"] == 3 + 1:  # 3 references, then the first seed (milp#1) is interrupted
            raise KeyboardInterrupt
        return real(self, alloc)

    monkeypatch.setattr(qsearch.Evaluator, "__call__", flaky)
    kw = dict(trials=4, calib_tokens=256, eval_batches=2)
    first = qsearch.run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "out", **kw)
    assert first.interrupted and [t["state"] for t in first.trials if t["source"] == "milp#1"] == ["FAIL"]
    monkeypatch.setattr(qsearch.Evaluator, "__call__", real)
    second = qsearch.run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "out", **kw)
    milp1 = [t for t in second.trials if t["source"] == "milp#1"]
    assert [t["state"] for t in milp1] == ["FAIL", "COMPLETE"]  # the exact seed did not drop out
    assert milp1[0]["allocation"] == milp1[1]["allocation"]


def test_trials_of_a_killed_search_process_are_failed_and_retried(fp32_ckpt, tmp_path, monkeypatch):
    """kill -9 in the middle of a seed trial leaves it RUNNING in the database; its heartbeat stops, so
    the next process fails it and retries it (heartbeat interval shortened to 1 s for the test)."""
    import qtoolkit.search.allocate as qsearch

    script = textwrap.dedent(f"""
        import os
        import time
        import qtoolkit.search.allocate as qsearch
        from qtoolkit.search.probes import parse_formats
        qsearch.HEARTBEAT_S = 1
        real, calls = qsearch.Evaluator.__call__, {{"n": 0}}
        def dies(self, alloc):
            calls["n"] += 1
            if calls["n"] == 4:  # 3 references, then the first seed: the process is killed mid-trial
                time.sleep(2.5)  # after the trial's first heartbeat (its thread may not have run yet under load)
                os._exit(9)
            return real(self, alloc)
        qsearch.Evaluator.__call__ = dies
        qsearch.run_search({str(fp32_ckpt)!r}, 100_000, parse_formats("ternary,int8,fp16"), {str(tmp_path / "out")!r},
                           trials=3, calib_tokens=256, eval_batches=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**_env(tmp_path), "QTOOLKIT_CACHE": os.environ["QTOOLKIT_CACHE"]},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    time.sleep(4)  # > grace period (3 heartbeats)
    monkeypatch.setattr(qsearch, "HEARTBEAT_S", 1)
    res = qsearch.run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "out", trials=3, calib_tokens=256,
                             eval_batches=2)
    milp1 = [t for t in res.trials if t["source"] == "milp#1"]
    assert [t["state"] for t in milp1] == ["FAIL", "COMPLETE"], milp1
    assert not any(t["state"] == "RUNNING" for t in res.trials)


def test_best_is_never_worse_than_a_measured_uniform_that_fits(fp32_ckpt, tmp_path, monkeypatch):
    import qtoolkit.search.allocate as qsearch

    real = qsearch.Evaluator.__call__
    n = {"refs": 0}

    def worse_mixed(self, alloc):  # uniform allocations measure true; every mixed one is terrible
        loss = real(self, alloc)
        n["refs"] += 1
        return loss if len(set(alloc.values())) == 1 else loss + 100.0

    monkeypatch.setattr(qsearch.Evaluator, "__call__", worse_mixed)
    res = qsearch.run_search(fp32_ckpt, 100_000, _formats(), tmp_path / "out", trials=3, calib_tokens=256,
                             eval_batches=2)
    ternary = res.references["ternary"]
    assert res.best["source"] == "uniform ternary" and res.best["loss"] == ternary["loss"]
    assert res.policy == {"_default": "ternary", "embed": "ternary"}
    header = (tmp_path / "out" / "policy.yaml").read_text()
    assert "uniform ternary: no searched allocation that fits did better" in header
