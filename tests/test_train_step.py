"""training.step: train.compile (and its eager fallback), the on-device non-finite guard, and the
throughput figures (training.throughput)."""

from __future__ import annotations

import json
import math
import shutil
import threading

import pytest
import torch

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.errors import TrainingDiverged
from qtoolkit.schema import SchemaError
from qtoolkit.training import step as step_module
from qtoolkit.training import trainer
from qtoolkit.training.recipe import TrainConfig, load_recipe
from qtoolkit.training.step import NonFiniteGuard, TrainStep, compile_enabled
from qtoolkit.training.throughput import flops_per_token, mfu, peak_flops, peak_for_name
from qtoolkit.training.trainer import train


def tiny_recipe(name, corpus_dir, *extra):
    return load_recipe(name, ["model.preset=tiny", f"data.path={corpus_dir}", "train.eval_batches=2",
                              "train.log_every=1", *extra])


def train_losses(run_dir) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["type"] == "train"]


def notices(events) -> list[str]:
    return [e.data["message"] for e in events if e.kind == "notice"]


# ------------------------------------------------------------------------------ train.compile


def test_compile_option_values():
    assert load_recipe("ternary_all", ["train.compile=true"]).train.compile is True
    assert load_recipe("ternary_all", ["train.compile=false"]).train.compile is False
    assert load_recipe("ternary_all").train.compile == "auto"
    with pytest.raises(SchemaError, match="train.compile"):
        load_recipe("ternary_all", ["train.compile=sometimes"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (compile_enabled("auto", cpu), compile_enabled("auto", cuda)) == (False, True)
    assert compile_enabled(True, cpu) and not compile_enabled(False, cuda)


@pytest.mark.parametrize("options", [
    ["train.steps=5", "train.quant_warmup_steps=2"],  # lambda changes: Dynamo recompiles, then goes dynamic
    ["train.steps=3", "train.micro_batch_size=4", "train.ce_chunk=96", "train.activation_checkpointing=true"],
])
def test_compiled_training_follows_the_eager_trajectory(options, corpus_dir, tmp_path, monkeypatch):
    """train.compile=true through torch.compile (aot_eager: the same Dynamo/AOTAutograd graphs as
    inductor without the C++ build) gives the eager run's losses and weights."""
    monkeypatch.setenv(step_module.COMPILE_BACKEND_ENV, "aot_eager")
    compiled_calls = []
    real_compile = torch.compile

    def spy(fn, **kwargs):
        compiled_calls.append(kwargs.get("backend"))
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    extra = options
    eager = train(tiny_recipe("ternary_all", corpus_dir, *extra, "train.compile=false"), tmp_path / "eager")
    events = []
    comp = train(tiny_recipe("ternary_all", corpus_dir, *extra, "train.compile=true"), tmp_path / "compiled",
                 callback=events.append)
    assert compiled_calls == ["aot_eager"] and not notices(events)
    assert next(e for e in events if e.kind == "start").data["compile"] is True
    a, b = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert len(a) == len(b) == int(options[0].split("=")[1])
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert comp.val_loss == pytest.approx(eager.val_loss, rel=1e-5)
    wa, wb = load_checkpoint(eager.checkpoint)["model"], load_checkpoint(comp.checkpoint)["model"]
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on the CPU")
def test_compiled_training_with_inductor(corpus_dir, tmp_path):
    """The default backend (inductor, C++ code generated for the CPU; about a minute without a warm
    inductor cache): same losses to 1e-4."""
    extra = ["train.steps=3"]
    train(tiny_recipe("ternary_all", corpus_dir, *extra, "train.compile=false"), tmp_path / "eager")
    events = []
    train(tiny_recipe("ternary_all", corpus_dir, *extra, "train.compile=true"), tmp_path / "compiled",
          callback=events.append)
    assert not notices(events), notices(events)
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-4)


def test_compile_unavailable_falls_back_with_one_message(corpus_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken)
    events = []
    res = train(tiny_recipe("ternary_all", corpus_dir, "train.steps=4", "train.compile=true"), tmp_path / "run",
                callback=events.append)
    assert res.steps == 4 and math.isfinite(res.val_loss)
    (message,) = notices(events)
    assert "train.compile" in message and "eager" in message and "Dynamo is not supported" in message


def test_compile_failure_at_the_first_step_redoes_it_eagerly(corpus_dir, tmp_path, monkeypatch):
    """A failure when the compiled step first runs (where Dynamo and the backend actually work):
    the step is redone in eager mode, so the run equals an eager run exactly."""
    from torch._dynamo.exc import BackendCompilerFailed

    def lazily_broken(fn, **kwargs):
        def call(*args, **kw):
            fn(*args, **kw)  # part of a forward ran (and may have left state behind) before the failure
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("InvalidCxxCompiler: no working C++ compiler"))
        return call

    monkeypatch.setattr(torch, "compile", lazily_broken)
    extra = ["train.steps=4", "train.micro_batch_size=4"]
    events = []
    train(tiny_recipe("ternary_all", corpus_dir, *extra, "train.compile=true"), tmp_path / "fallback",
          callback=events.append)
    train(tiny_recipe("ternary_all", corpus_dir, *extra, "train.compile=false"), tmp_path / "eager")
    (message,) = notices(events)
    assert "BackendCompilerFailed" in message and "eager" in message
    assert train_losses(tmp_path / "fallback") == train_losses(tmp_path / "eager")


def test_shipped_quantizers_compile_without_graph_breaks():
    """The fake-quant forwards (STE by detach) trace into one graph each (torch._dynamo.explain)."""
    import torch._dynamo

    from qtoolkit.policy import build_model
    from qtoolkit.training.loss import chunked_loss, loss_fn

    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    for name in ("ternary_all", "sherry_all", "tequila_all", "ternary_hgf"):
        recipe = load_recipe(name, ["model.preset=tiny"])
        model, _ = build_model(recipe.model_config(), recipe.policy)
        for q in trainer.progress_quantizers(model):
            q.set_progress(0.5)
        plain = torch._dynamo.explain(lambda a, b, m=model: loss_fn(m(a), b, 0.1))(x, y)
        chunked = torch._dynamo.explain(lambda a, b, m=model: chunked_loss(m.hidden_states(a), m.lm_head, b, 0.1, 8))(x, y)
        assert (plain.graph_break_count, chunked.graph_break_count) == (0, 0), (name, plain.break_reasons,
                                                                              chunked.break_reasons)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ the non-finite guard


def _adamw(params, fused):
    return torch.optim.AdamW(params, lr=0.1, **({"fused": True} if fused else {}))


@pytest.mark.parametrize("fused", [True, False])
def test_guard_keeps_a_bad_step_from_the_weights(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = _adamw(model.parameters(), fused)
    guard = NonFiniteGuard(opt, torch.device("cpu"))
    assert guard.deferred is fused

    def step(index, scale):
        model.weight.grad = torch.randn(4, 4) * scale
        model.bias.grad = torch.randn(4)
        guard.update(index, torch.tensor(1.0), torch.linalg.vector_norm(model.weight.grad))
        if guard.deferred or guard.first_bad() is None:
            opt.step()

    step(1, 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    step(2, float("nan"))
    step(3, 1.0)  # sticky: nothing after the first bad step is applied either
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters(), strict=True))
    at, loss, norm = guard.first_bad()
    assert at == 2 and loss == 1.0 and math.isnan(norm)


def test_use_fused_survives_loading_a_non_fused_state():
    model = torch.nn.Linear(2, 2)
    plain = _adamw(model.parameters(), False)
    model.weight.grad, model.bias.grad = torch.ones(2, 2), torch.ones(2)
    plain.step()
    fused = _adamw(model.parameters(), True)
    fused.load_state_dict(plain.state_dict())
    assert not fused.param_groups[0]["fused"]  # what load_state_dict does
    step_module.use_fused(fused, True)
    assert NonFiniteGuard(fused, torch.device("cpu")).deferred


def test_nan_between_host_reads_stops_at_the_next_read(corpus_dir, tmp_path, monkeypatch):
    """The CUDA cadence on the CPU (reads only at log/eval/ckpt steps): a NaN loss at step 7 is found
    at step 10, the error names step 7, the weights in memory are those after step 6 and the
    checkpoint on disk is step 5's."""
    monkeypatch.setattr(trainer, "_host_reads_every_step", lambda device: False)
    extra = ["train.steps=12", "train.log_every=5", "train.eval_every=5", "train.ckpt_every=5"]

    stop = threading.Event()  # the reference: the same run stopped after step 6
    ref = train(tiny_recipe("ternary_all", corpus_dir, *extra),
                tmp_path / "ref", stop=stop, callback=lambda e: e.kind == "step" and e.step == 6 and stop.set())
    assert ref.interrupted and ref.steps == 6
    after6 = load_checkpoint(ref.checkpoint)

    steps_built = []
    monkeypatch.setattr(trainer, "TrainStep", lambda *a, **k: steps_built.append(TrainStep(*a, **k)) or steps_built[-1])
    seen, poison = [], threading.Event()
    real = step_module.loss_fn

    def loss_fn(logits, targets, ls):
        loss, ce = real(logits, targets, ls)
        return (loss * float("nan"), ce) if poison.is_set() else (loss, ce)

    def callback(event):
        if event.kind == "step":
            seen.append(event.step)
            if event.step == 6:
                poison.set()

    monkeypatch.setattr(step_module, "loss_fn", loss_fn)
    with pytest.raises(TrainingDiverged, match=r"loss nan at step 7: stopped before.*Last good checkpoint.*step 5"):
        train(tiny_recipe("ternary_all", corpus_dir, *extra), tmp_path / "run", callback=callback)
    assert seen[-1] == 9  # step 10 raised at its read, before reporting
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 5
    (ts,) = steps_built
    state = ts.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in after6["model"].items())
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in
               zip(ts.optimizer.state_dict()["state"].values(), after6["optimizer"]["state"].values(), strict=True))


def test_train_step_without_found_inf_skips_after_a_host_read(monkeypatch):
    """An optimizer that cannot skip on the device (not fused): the step reads the guard before
    optimizer.step() and leaves the weights alone."""
    from qtoolkit.config import ModelConfig
    from qtoolkit.model import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny"))
    ts = TrainStep(model, _adamw(model.parameters(), fused=False), TrainConfig(label_smoothing=0.0),
                   torch.device("cpu"))
    x = torch.randint(0, 512, (2, 8))
    ts(x, x, 1)
    before = [p.detach().clone() for p in model.parameters()]
    real = step_module.loss_fn
    monkeypatch.setattr(step_module, "loss_fn", lambda *a: tuple(v * float("inf") for v in real(*a)))
    stats = ts(x, x, 2)
    assert math.isinf(stats.loss.item())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert ts.guard.first_bad()[0] == 2


# ------------------------------------------------------------------------------ throughput


def test_peak_of_a_cuda_device_from_its_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")  # the query only
    assert peak_flops("cuda:0") == (989e12, "NVIDIA H100 80GB HBM3")


def test_flops_per_token_and_mfu():
    from qtoolkit.config import ModelConfig
    from qtoolkit.model import DecoderLM

    cfg = ModelConfig.from_name("tiny")
    model = DecoderLM(cfg)
    d, f, L, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    matmul = L * (4 * d * d + 3 * d * f) + V * d  # attention, SwiGLU, output layer (the embedding is a lookup)
    assert flops_per_token(model, 64) == 6 * (matmul + norms) + 12 * L * d * 64
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_for_name("NVIDIA GeForce GTX 1080") is None
    assert peak_flops("cpu") == (None, "cpu")
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(100_000.0, 1e9, 1e15) == pytest.approx(0.1)


def test_metrics_carry_mfu(corpus_dir, tmp_path):
    train(tiny_recipe("ternary_all", corpus_dir, "train.steps=2"), tmp_path / "r")
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    t = [x for x in lines if x["type"] == "train"]
    assert len(t) == 2 and all("mfu" in x and x["mfu"] is None and x["tokens_per_s"] > 0 for x in t)  # CPU: unknown
