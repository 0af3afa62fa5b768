from __future__ import annotations

import inspect
import json
import random
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.cli import app
from qtoolkit.errors import ConfigError
from qtoolkit.evaluate import glue_data
from qtoolkit.evaluate.classifier import (
    SequenceClassifier,
    load_backbone,
    load_classifier,
    save_classifier,
)
from qtoolkit.evaluate.glue import (
    GlueConfig,
    GlueReport,
    GlueResult,
    SeedRun,
    TaskResult,
    _pad,
    epoch_batches,
    finetune,
    majority_baseline,
    predict,
    run_glue,
)
from qtoolkit.evaluate.glue_data import GlueSplit, encode_split, get_task
from qtoolkit.evaluate.metrics import accuracy
from qtoolkit.layers import FROZEN_MODULES, QuantLinear
from qtoolkit.pack import pack_checkpoint
from qtoolkit.training.data import eos_id, tokenizer_from_json

NAMES = ["Lily", "Tom", "Sam", "Mia", "Ben", "Anna"]
THINGS = ["ball", "cat", "dog", "tree", "cake", "boat", "kite", "hat"]


def easy_split(n: int, seed: int, shuffle_labels: bool = False) -> GlueSplit:
    """An easy sentiment task: the label is whether the closing word is `happy` or `sad`."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        texts.append((f"{rng.choice(NAMES)} found a {rng.choice(THINGS)} and was {'happy' if label else 'sad'}.",))
        labels.append(label)
    if shuffle_labels:
        rng.shuffle(labels)
    return GlueSplit(get_task("sst2"), "train", texts, labels, "constructed")


def encoded(ckpt_path: Path, split: GlueSplit, max_len: int = 64):
    tok = tokenizer_from_json(load_checkpoint(ckpt_path)["tokenizer"])
    return encode_split(split, tok, max_len), eos_id(tok)


EASY = dict(lr=2e-3, head_lr=5e-3, batch_size=8, epochs=12, warmup=0.1, seeds=1, device="cpu")


def test_finetune_learns_an_easy_task_and_beats_a_shuffled_label_control(trained_tiny):
    ckpt = load_checkpoint(trained_tiny)
    backbone, _, _ = load_backbone(ckpt)
    task = get_task("sst2")
    dev, pad = encoded(trained_tiny, easy_split(64, seed=1))
    scores = {}
    for shuffled in (False, True):
        train, _ = encoded(trained_tiny, easy_split(48, seed=0, shuffle_labels=shuffled))
        _, run = finetune(backbone, task, train, dev, GlueConfig(**EASY), 0, pad, torch.device("cpu"))
        scores[shuffled] = run.metrics["accuracy"]
    assert scores[False] >= 90, scores
    assert scores[True] <= 75, scores
    assert scores[False] - scores[True] >= 20, scores


def test_ternary_stays_ternary_and_packs_with_identical_logits(trained_tiny, tmp_path):
    ckpt = load_checkpoint(trained_tiny)
    backbone, coverage, policy = load_backbone(ckpt)
    task = get_task("sst2")
    train, pad = encoded(trained_tiny, easy_split(32, seed=0))
    dev, _ = encoded(trained_tiny, easy_split(16, seed=1))
    cfg = GlueConfig(**{**EASY, "epochs": 2})
    clf, run = finetune(backbone, task, train, dev, cfg, 0, pad, torch.device("cpu"))

    q = clf.backbone.blocks[0].mlp.up_proj
    assert isinstance(q, QuantLinear) and q.quantizer.spec()["name"] == "ternary"
    assert set(q.quantizer.quantize(q.weight.detach()).codes.unique().tolist()) <= {-1, 0, 1}
    before = backbone.blocks[0].mlp.up_proj.weight
    assert not torch.equal(q.weight, before)  # the backbone was trained (QAT), not only the head

    saved = save_classifier(clf, ckpt, coverage, policy, tmp_path / "clf.pt", {"task": "sst2", "seed": 0})
    packed = pack_checkpoint(saved, tmp_path / "clf.safetensors")
    assert packed.tensor_bytes == packed.predicted_bytes
    from_packed, info = load_classifier(saved, backbone=packed.path)
    assert any(isinstance(m, FROZEN_MODULES) for m in from_packed.modules())
    assert info["task"] == "sst2" and info["pooling"] == "last"

    clf.eval()
    x, lengths = _pad(dev.ids, list(range(len(dev))), pad)
    with torch.no_grad():
        assert torch.equal(from_packed(x, lengths), clf(x, lengths))
    assert predict(from_packed, dev, pad) == predict(clf, dev, pad)
    # the saved checkpoint is an ordinary training checkpoint of the finetuned backbone
    again, _ = load_classifier(saved)
    with torch.no_grad():
        assert torch.equal(again(x, lengths), clf(x, lengths))


def test_freeze_trains_the_head_only(trained_tiny):
    ckpt = load_checkpoint(trained_tiny)
    backbone, _, _ = load_backbone(ckpt)
    train, pad = encoded(trained_tiny, easy_split(32, seed=0))
    clf, run = finetune(backbone, get_task("sst2"), train, train, GlueConfig(**{**EASY, "epochs": 3, "freeze": True}),
                        0, pad, torch.device("cpu"))
    for (name, a), b in zip(backbone.state_dict().items(), clf.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert run.steps == 3 * 4
    # scored from the cached features == scored by running the whole classifier
    assert run.metrics["accuracy"] == pytest.approx(100 * accuracy(train.labels, predict(clf, train, pad)))


def test_policy_override_and_packed_backbones(fp32_ckpt, trained_tiny, tmp_path):
    ckpt = load_checkpoint(fp32_ckpt)
    backbone, coverage, policy = load_backbone(ckpt, "ternary")
    assert policy == {"_default": "ternary"}
    assert {a.quantizer for a in coverage.layers if a.name.startswith("blocks.")} == {"ternary"}
    latent = dict(ckpt["model"])
    assert torch.equal(backbone.blocks[1].attn.q_proj.weight, latent["blocks.1.attn.q_proj.weight"])
    _, _, policy = load_backbone(ckpt, "int8_all")  # a recipe name stands for its policy
    assert policy["_default"] in ("int8", {"name": "int8"})
    with pytest.raises(ConfigError, match="--policy 'nonsense: \\[': not a policy file"):
        load_backbone(ckpt, "nonsense: [")

    packed = load_checkpoint(pack_checkpoint(trained_tiny, tmp_path / "p.safetensors").path)
    frozen, coverage, _ = load_backbone(packed, freeze=True)
    assert coverage is None and any(isinstance(m, FROZEN_MODULES) for m in frozen.modules())
    trainable, coverage, _ = load_backbone(packed)  # dequantized weights become latent weights, QAT again
    assert coverage is not None and isinstance(trainable.blocks[0].attn.q_proj, QuantLinear)
    probe = run_glue(packed["path"], GlueConfig(tasks="sst2", data_dir=str(glue_dir(tmp_path / "g")), seeds=1,
                                                freeze=True, epochs=1)).results[0]
    assert probe.kind == "packed" and probe.quantizers == {"ternary": 2 * (4 * 64 * 64 + 3 * 64 * 176),
                                                           "int8": 2 * 512 * 64}
    reference, _, _ = load_backbone(load_checkpoint(trained_tiny))
    idx = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        assert torch.equal(frozen.hidden_states(idx), reference.hidden_states(idx))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_right_padding_does_not_change_pooled_features(trained_tiny, pooling):
    backbone, _, _ = load_backbone(load_checkpoint(trained_tiny))
    clf = SequenceClassifier(backbone, 2, pooling).eval()
    ids = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    x, lengths = _pad(ids, [0, 1], pad_id=0)
    with torch.no_grad():
        batched = clf.features(x, lengths)
        for i, seq in enumerate(ids):
            alone = clf.features(torch.tensor([seq]), torch.tensor([len(seq)]))
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)
        h = backbone.hidden_states(torch.tensor([ids[0]]))[0]
    expected = h[-1] if pooling == "last" else h.mean(0)
    torch.testing.assert_close(batched[0], expected, rtol=1e-5, atol=1e-5)


def test_epoch_batches_cover_every_example_once_and_depend_on_the_seed():
    lengths = [random.Random(i).randint(1, 50) for i in range(103)]
    batches = epoch_batches(lengths, 8, seed=3, epoch=0)
    flat = sorted(i for b in batches for i in b.tolist())
    assert flat == list(range(103)) and max(len(b) for b in batches) == 8
    assert [b.tolist() for b in batches] == [b.tolist() for b in epoch_batches(lengths, 8, seed=3, epoch=0)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in epoch_batches(lengths, 8, seed=4, epoch=0)]


def test_majority_baseline():
    task = get_task("mrpc")
    train = glue_data.EncodedSplit([[1]] * 5, [1, 1, 1, 0, 0], 8, 0)
    dev = glue_data.EncodedSplit([[1]] * 4, [1, 0, 1, 1], 8, 0)
    m = majority_baseline(task, train, dev)
    assert m["label"] == 1 and m["label_name"] == "equivalent"
    assert m["accuracy"] == pytest.approx(75.0) and m["f1"] == pytest.approx(100 * 6 / 7)


def _task_result(values: list[float]) -> TaskResult:
    r = TaskResult("cola", "CoLA", ["mcc"], {}, {"mcc": 0.0}, 1, 1)
    r.runs = [SeedRun(i, {"mcc": v}, 0.5, 1, 1.0) for i, v in enumerate(values)]
    return r


def test_differences_against_the_seed_spread():
    a, b = GlueResult("a", "train", 1, {}, "checkpoint", {}, "cpu"), GlueResult("b", "train", 1, {}, "checkpoint", {}, "cpu")
    a.tasks["cola"], b.tasks["cola"] = _task_result([10.0, 12.0, 14.0]), _task_result([4.0, 6.0, 8.0])
    d = GlueReport(GlueConfig(tasks="cola"), [a, b]).differences()["cola"]["mcc"]
    assert d["diff"] == pytest.approx(-6.0) and d["std_a"] == pytest.approx(2.0)
    assert d["exceeds_spread"] is True and d["welch_t"] == pytest.approx(-6.0 / (2 * (2 / 3) ** 0.5))
    b.tasks["cola"] = _task_result([9.0, 11.0, 13.0])
    assert GlueReport(GlueConfig(tasks="cola"), [a, b]).differences()["cola"]["mcc"]["exceeds_spread"] is False
    assert GlueReport(GlueConfig(tasks="cola"), [a]).differences() is None


def test_config_is_checked():
    with pytest.raises(ConfigError, match="lr must be > 0"):
        GlueConfig(lr=0)
    with pytest.raises(ConfigError, match="pooling must be one of last, mean"):
        GlueConfig(pooling="cls")
    with pytest.raises(Exception, match="unknown GLUE task"):
        GlueConfig(tasks="mrpc,qqp")


# ------------------------------------------------------------------------------ end to end


def glue_dir(root: Path, n: int = 24) -> Path:
    """A tiny local GLUE root in the distribution layout (MRPC with BOM, SST-2, headerless CoLA)."""
    rng = random.Random(0)

    def sentence(label: int) -> str:
        return f"{rng.choice(NAMES)} found a {rng.choice(THINGS)} and was {'happy' if label else 'sad'}."

    for split in ("train", "dev"):
        mrpc = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        sst = ["sentence\tlabel"]
        cola = []
        for i in range(n):
            y = i % 2
            mrpc.append(f"{y}\t{i}\t{i + 1}\t{sentence(y)}\t{sentence(y)}")
            sst.append(f"{sentence(y)}\t{y}")
            cola.append(f"src\t{y}\t{'' if y else '*'}\t{sentence(y)}")
        for task, lines in (("MRPC", mrpc), ("SST-2", sst), ("CoLA", cola)):
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


runner = CliRunner()


def test_cli_runs_all_tasks_with_compare_and_writes_json_and_markdown(trained_tiny, fp32_ckpt, tmp_path):
    data = glue_dir(tmp_path / "glue")
    out = tmp_path / "out"
    args = ["glue", str(trained_tiny), "--data-dir", str(data), "--seeds", "2", "--epochs", "1", "--batch-size", "8",
            "--compare", str(fp32_ckpt), "--out", str(out), "--max-train", "16"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "GLUE dev results" in r.output and "majority" in r.output and "MRPC" in r.output
    assert re.search(r"CoLA\s+MCC", r.output)
    result = json.loads((out / "glue.json").read_text())
    a, b = result["results"]
    assert set(a["tasks"]) == {"mrpc", "sst2", "cola"} and b["checkpoint"].endswith(str(fp32_ckpt.name))
    mrpc = a["tasks"]["mrpc"]
    assert [run["seed"] for run in mrpc["runs"]] == [0, 1] and set(mrpc["summary"]) == {"f1", "accuracy"}
    assert mrpc["data"]["train"]["used"] == 16 and mrpc["data"]["train"]["examples"] == 24
    assert mrpc["majority"]["label"] in (0, 1)
    assert set(result["differences"]["cola"]["mcc"]) >= {"diff", "exceeds_spread"}
    assert "| CoLA | MCC |" in (out / "glue.md").read_text()

    r = runner.invoke(app, args)  # never overwrites earlier results
    assert r.exit_code == 1 and "already holds" in r.output and "Traceback" not in r.output


def test_cli_json_to_stdout_and_saved_models(trained_tiny, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["glue", str(trained_tiny), "--task", "cola", "--data-dir", str(glue_dir(tmp_path / "g")),
                            "--seeds", "1", "--epochs", "1", "--out", str(out), "--json", "-", "--save-models"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["tasks"]["cola"]["runs"][0]["seed"] == 0
    clf, info = load_classifier(out / "cola-seed0.pt")
    assert info["task"] == "cola" and info["labels"] == ["unacceptable", "acceptable"]


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "/nonexistent"], "--data-dir /nonexistent: no such directory"),
    (["--task", "qqp"], "unknown GLUE task 'qqp'"),
    (["--pooling", "cls"], "pooling must be one of last, mean"),
    ([], "Hub is unreachable"),
])
def test_cli_errors_are_one_clear_line(trained_tiny, tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(glue_data, "hub_reachable", lambda: False)
    r = runner.invoke(app, ["glue", str(trained_tiny), "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_cli_defaults_are_the_library_defaults():
    from qtoolkit.cli import glue

    params = inspect.signature(glue).parameters
    defaults = GlueConfig()
    for name in ("lr", "head_lr", "batch_size", "max_len", "max_train", "pooling", "freeze", "seeds", "seed",
                 "device", "epochs", "policy"):
        assert params[name].default == getattr(defaults, name), name
    assert params["task"].default == defaults.tasks


def test_run_glue_refuses_to_overwrite_saved_models(trained_tiny, tmp_path):
    (tmp_path / "cola-seed0.pt").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="already holds"):
        run_glue(trained_tiny, GlueConfig(tasks="cola", seeds=1), save_dir=tmp_path)
    assert (tmp_path / "cola-seed0.pt").read_bytes() == b"mine"
