from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.errors import CheckpointError, TrainingDiverged
from qtoolkit.training import step as step_module
from qtoolkit.training import trainer
from qtoolkit.training.recipe import TrainConfig, available_recipes, load_recipe
from qtoolkit.training.trainer import evaluate_checkpoint, lr_and_wd, model_from_checkpoint, train


def tiny_recipe(name, corpus_dir, *extra):
    return load_recipe(name, ["model.preset=tiny", f"data.path={corpus_dir}", "train.eval_batches=4", *extra])


@pytest.mark.parametrize("name", available_recipes())
def test_every_shipped_recipe_trains_on_tiny(name, corpus_dir, tmp_path):
    r = tiny_recipe(name, corpus_dir, "train.steps=4", "train.eval_every=2", "train.ckpt_every=2")
    res = train(r, tmp_path / name)
    assert res.steps == 4 and math.isfinite(res.val_loss)
    ckpt = load_checkpoint(res.checkpoint)  # weights_only=True
    assert ckpt["step"] == 4 and ckpt["recipe"]["name"] == name
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["type"] == "eval"] == [2, 4]


def test_loss_decreases(corpus_dir, tmp_path):
    r = tiny_recipe("ternary_all", corpus_dir, "train.steps=80", "train.eval_every=40")
    res = train(r, tmp_path / "run")
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trains = [x for x in evals if x["type"] == "train"]
    assert trains[-1]["ce"] < trains[0]["ce"] - 1.0
    assert res.val_loss < math.log(512) - 1.5  # well below a uniform guess
    assert res.val_ppl == pytest.approx(math.exp(res.val_loss))


def test_metrics_have_the_documented_fields(corpus_dir, tmp_path):
    train(tiny_recipe("ternary_all", corpus_dir, "train.steps=4", "train.log_every=2"), tmp_path / "r")
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    t = next(x for x in lines if x["type"] == "train")
    e = next(x for x in lines if x["type"] == "eval")
    assert {"step", "loss", "ce", "lr", "tokens_per_s", "grad_norm", "elapsed"} <= set(t)
    assert {"step", "val_loss", "val_ppl", "train_ce", "train_val_ratio"} <= set(e)
    assert (tmp_path / "r" / "recipe.yaml").is_file()


@pytest.mark.parametrize("name,savers", [
    ("ternary_all", []), ("ternary_bitnet2b", []),
    ("ternary_all", ["train.micro_batch_size=2", "train.ce_chunk=96", "train.activation_checkpointing=true"]),
])
def test_resume_equals_uninterrupted(name, savers, corpus_dir, tmp_path):
    extra = ["train.steps=12", "train.eval_every=6", "train.ckpt_every=100",
             "policy.blocks.0.attn.q_proj={name: ternary, alpha: learned}", *savers]
    train(tiny_recipe(name, corpus_dir, *extra), tmp_path / "full")

    stop = threading.Event()

    def stop_at_5(event):
        if event.kind == "step" and event.step == 5:
            stop.set()

    part = train(tiny_recipe(name, corpus_dir, *extra), tmp_path / "split", callback=stop_at_5, stop=stop)
    assert part.interrupted and part.steps == 5
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 5
    resumed = train(tiny_recipe(name, corpus_dir, *extra), tmp_path / "split", resume=True)
    assert resumed.steps == 12

    a = load_checkpoint(tmp_path / "full" / "ckpt.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "ckpt.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated lines after the resume point


def test_refuses_to_overwrite_and_resume_needs_a_checkpoint(corpus_dir, tmp_path):
    r = tiny_recipe("ternary_all", corpus_dir, "train.steps=2")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(r, tmp_path / "run", resume=True)
    train(r, tmp_path / "run")
    with pytest.raises(CheckpointError, match="--resume"):
        train(r, tmp_path / "run")
    other = tiny_recipe("int8_all", corpus_dir, "train.steps=4")
    with pytest.raises(CheckpointError, match="different recipe: policy"):
        train(other, tmp_path / "run", resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus_dir, tmp_path, monkeypatch):
    r = tiny_recipe("ternary_all", corpus_dir, "train.steps=10", "train.ckpt_every=3")
    good = {}

    def poison(event):
        if event.kind == "checkpoint" and event.step == 3:
            good.update(load_checkpoint(event.data["path"])["model"])
        if event.kind == "step" and event.step == 4:
            raise_nan.set()

    raise_nan = threading.Event()
    real = step_module.loss_fn

    def loss_fn(logits, targets, ls):
        loss, ce = real(logits, targets, ls)
        return (loss * float("nan"), ce) if raise_nan.is_set() else (loss, ce)

    monkeypatch.setattr(step_module, "loss_fn", loss_fn)  # the training step's loss (training.step)
    with pytest.raises(TrainingDiverged, match="step 5.*Last good checkpoint"):
        train(r, tmp_path / "run", callback=poison)
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ckpt["step"] == 3
    assert all(torch.equal(ckpt["model"][k], v) for k, v in good.items())


def test_schedules():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, weight_decay=0.1)
    lrs = [lr_and_wd(s, cfg)[0] for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    two = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, schedule="two_stage", stage2_lr_scale=0.25,
                      weight_decay=0.1)
    (lr49, wd49), (lr50, wd50) = lr_and_wd(49, two), lr_and_wd(50, two)
    assert wd49 == 0.1 and wd50 == 0.0
    assert lr50 < 0.3 * lr49 and lr49 == pytest.approx(lrs[49])


def test_eval_checkpoint_matches_training_eval(corpus_dir, tmp_path):
    res = train(tiny_recipe("ternary_all", corpus_dir, "train.steps=6"), tmp_path / "run")
    ev = evaluate_checkpoint(tmp_path / "run")
    assert ev.val_loss == pytest.approx(res.val_loss, rel=1e-6)
    assert ev.step == 6
    model, coverage = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "ckpt.pt"))
    assert coverage.params_by_quantizer()["ternary"] > 0


def test_trains_on_shared_tinystories(shared_tinystories, tmp_path):
    r = load_recipe("ternary_all", ["model.preset=tiny", f"data.path={shared_tinystories}", "train.steps=30",
                                    "train.eval_batches=4"])
    events = []
    res = train(r, tmp_path / "run", callback=events.append)
    start = next(e for e in events if e.kind == "start")
    assert "tinystories_train_first2MiB.txt" in start.data["data"]
    assert "tinystories_validation_head.txt" in start.data["data"]
    assert start.data["data_info"]["train_tokens"] > 500_000
    assert res.val_loss < 6.0  # from ~ln(512) = 6.24 at init


# ------------------------------------------------------------------------------ --init and the quantization warmup


def test_init_starts_from_the_checkpoint_under_the_policy(fp32_ckpt, corpus_dir, tmp_path):
    """The first step's loss is the source checkpoint's loss under the recipe's policy (on that
    step's batch), i.e. what `qtool quantize` makes of it; the optimizer and schedule are fresh."""
    import qtoolkit
    from qtoolkit.training.data import prepare_data, tokenizer_from_json
    from qtoolkit.training.trainer import loss_fn

    r = tiny_recipe("ternary_all", corpus_dir, "train.steps=2", "train.log_every=1")
    res = train(r, tmp_path / "run", init=fp32_ckpt)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1

    src = load_checkpoint(fp32_ckpt)
    cfg = r.resolved().train
    data = prepare_data(r.data, 512, tokenizer=tokenizer_from_json(src["tokenizer"]))
    x, y = data.train.batch(0, cfg.batch_size, cfg.seq_len, cfg.seed)
    model = qtoolkit.quantize(fp32_ckpt, r.policy)
    with torch.no_grad():
        loss, _ = loss_fn(model(x), y, cfg.label_smoothing)
    assert first["loss"] == loss.item()
    ckpt = load_checkpoint(res.checkpoint)
    assert ckpt["init"]["checkpoint"] == str(fp32_ckpt) and ckpt["tokenizer"] == src["tokenizer"]
    assert ckpt["policy"] == r.policy and ckpt["step"] == 2


def test_init_refuses_another_shape_and_packed_files(fp32_ckpt, corpus_dir, tmp_path):
    from qtoolkit.pack import pack_checkpoint

    r = tiny_recipe("ternary_all", corpus_dir, "train.steps=2", "model.vocab_size=640")
    with pytest.raises(CheckpointError, match=r"tensor embed.weight is \(512, 64\) in the checkpoint but \(640, 64\)"
                                              r".*vocab_size 512 vs 640"):
        train(r, tmp_path / "a", init=fp32_ckpt)
    assert not (tmp_path / "a").exists()
    r = tiny_recipe("ternary_all", corpus_dir, "train.steps=2", "model.n_layers=3")
    with pytest.raises(CheckpointError, match="has no tensor blocks.2.attn_norm.weight"):
        train(r, tmp_path / "b", init=fp32_ckpt)
    pack_checkpoint(fp32_ckpt, tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="already packed"):
        train(tiny_recipe("ternary_all", corpus_dir), tmp_path / "c", init=tmp_path / "p.safetensors")
    assert not (tmp_path / "c").exists()


def test_quantized_checkpoint_cannot_be_resumed_only_initialised_from(fp32_ckpt, corpus_dir, tmp_path):
    from qtoolkit.training.ptq import quantize_checkpoint

    quantize_checkpoint(fp32_ckpt, {"_default": "ternary"}, tmp_path / "q")
    with pytest.raises(CheckpointError, match="no optimizer state.*--init"):
        train(tiny_recipe("ternary_all", corpus_dir, "train.steps=2"), tmp_path / "q", resume=True)


def test_warmup_ramp_ends_are_the_float_and_the_quantized_model(fp32_ckpt):
    import qtoolkit
    from qtoolkit.layers import set_quant_mix
    from qtoolkit.search.probes import float_model

    ckpt = load_checkpoint(fp32_ckpt)
    x = torch.randint(0, 512, (2, 16))
    fp32 = float_model(ckpt)
    model = qtoolkit.quantize(fp32_ckpt, {"_default": "ternary", "embed": "int8"})
    with torch.no_grad():
        quantized = model(x)
        set_quant_mix(model, 0.0)
        torch.testing.assert_close(model(x), fp32(x), rtol=0, atol=0)
        set_quant_mix(model, 0.5)
        half = model(x)
        set_quant_mix(model, 1.0)
        torch.testing.assert_close(model(x), quantized, rtol=0, atol=0)
    assert not torch.allclose(half, quantized) and not torch.allclose(half, fp32(x))


def test_quant_warmup_schedule_in_training(corpus_dir, tmp_path, monkeypatch):
    seen = []
    real = trainer.set_quant_mix
    monkeypatch.setattr(trainer, "set_quant_mix", lambda model, lam: (seen.append(lam), real(model, lam)))
    r = tiny_recipe("ternary_all", corpus_dir, "train.steps=6", "train.quant_warmup_steps=4", "train.eval_every=6")
    train(r, tmp_path / "run")
    assert seen[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0] and seen[-1] == 1.0  # the final eval is fully quantized
    with pytest.raises(Exception, match="quant_warmup_steps"):
        tiny_recipe("ternary_all", corpus_dir, "train.steps=6", "train.quant_warmup_steps=7")


# ------------------------------------------------------------------------------ micro-batches (gradient accumulation)


def _weights(path):
    return load_checkpoint(path / "ckpt.pt")["model"]


@pytest.mark.parametrize("name", ["fp32_baseline", "ternary_all"])
def test_micro_batches_reach_the_weights_of_the_whole_batch(name, corpus_dir, tmp_path):
    """8 steps of batch 8 as one batch and as 4 micro-batches of 2: the same weights up to float
    rounding. Tolerance: max |difference| of any weight below 1e-5 (measured: 5e-7 fp32_baseline,
    1e-7 ternary_all; weights move by ~1e-2 over the run)."""
    extra = ["train.steps=8", "train.batch_size=8", "train.eval_every=100", "train.ckpt_every=100"]
    whole = train(tiny_recipe(name, corpus_dir, *extra), tmp_path / "whole")
    micro = train(tiny_recipe(name, corpus_dir, *extra, "train.micro_batch_size=2"), tmp_path / "micro")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "micro")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{name}: max |weight difference| {diff:.3g}")
    assert diff < 1e-5, diff
    assert micro.val_loss == pytest.approx(whole.val_loss, abs=1e-3)
    la = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "micro" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(la, lb, strict=True):  # the logged loss is the whole batch's, not a micro-batch's
        if x["type"] == "train":
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-4) and y["ce"] == pytest.approx(x["ce"], abs=1e-4)


def test_elastic_activations_initialise_from_the_whole_batch_under_micro_batches(corpus_dir, tmp_path):
    """Elastic activation steps are set from their first input: the trainer runs the whole batch through
    the blocks once before the first step, so micro-batches initialise as the whole batch does (max
    weight difference after 2 steps: 4e-6 with it, 3e-3 without; later steps may flip a rounding of the
    8-bit activations and move further apart, so the comparison is made early)."""
    extra = ["train.steps=2", "train.batch_size=8", "train.eval_every=100", "train.ckpt_every=100",
             "policy._default={name: ternary, activations: elastic}"]
    train(tiny_recipe("ternary_all", corpus_dir, *extra), tmp_path / "whole")
    train(tiny_recipe("ternary_all", corpus_dir, *extra, "train.micro_batch_size=2"), tmp_path / "micro")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "micro")
    assert any(k.endswith("act.step") for k in a)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_micro_batch_must_divide_the_batch(corpus_dir, tmp_path):
    from qtoolkit.errors import ConfigError

    with pytest.raises(Exception, match="micro_batch_size.*divide"):
        tiny_recipe("ternary_all", corpus_dir, "train.batch_size=8", "train.micro_batch_size=3")
    r = tiny_recipe("ternary_all", corpus_dir, "train.micro_batch_size=3")  # batch_size: the preset's 8
    with pytest.raises(ConfigError, match="micro_batch_size=3 does not divide train.batch_size=8"):
        train(r, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_may_change_the_micro_batch(corpus_dir, tmp_path):
    extra = ["train.steps=6", "train.ckpt_every=3"]
    stop = threading.Event()
    part = train(tiny_recipe("ternary_all", corpus_dir, *extra), tmp_path / "run", stop=stop,
                 callback=lambda e: stop.set() if e.kind == "step" and e.step == 3 else None)
    assert part.steps == 3
    res = train(tiny_recipe("ternary_all", corpus_dir, *extra, "train.micro_batch_size=4"), tmp_path / "run",
                resume=True)
    assert res.steps == 6 and load_checkpoint(tmp_path / "run" / "ckpt.pt")["recipe"]["train"]["micro_batch_size"] == 4
