"""Hostile and careless inputs, through the CLI: every case builds a bad file or argument, runs the
command, and asserts (1) a non-zero exit, (2) exactly one line of error output that says what is
wrong, no traceback, and (3) every file that existed before is byte-identical afterwards.

The cases are grouped by reader: checkpoints (training and packed), recipes and policies, text data,
numbers and devices, output paths. docs/reliability.md lists what each group promises."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qtoolkit.checkpoint import tensor_digest
from qtoolkit.cli import app
from qtoolkit.rundir import LOCK_NAME

from .conftest import write_corpus

runner = CliRunner()


# ------------------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def base(trained_tiny, tmp_path_factory) -> dict[str, Path]:
    """A trained tiny run directory, its packed file and a corpus (copied into each case's dir)."""
    from qtoolkit.pack import pack_checkpoint

    root = tmp_path_factory.mktemp("hostile-base")
    run = root / "run"
    run.mkdir()
    shutil.copy(trained_tiny, run / "ckpt.pt")
    pack_checkpoint(run / "ckpt.pt", run / "packed.safetensors")
    corpus = root / "corpus"
    corpus.mkdir()
    write_corpus(corpus / "stories_train.txt", 300, seed=1)
    write_corpus(corpus / "stories_val.txt", 60, seed=2)
    return {"run": run, "corpus": corpus}


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME}


def assert_unchanged(before: dict[Path, bytes]) -> None:
    for path, data in before.items():
        assert path.is_file(), f"{path} was removed"
        assert path.read_bytes() == data, f"{path} was modified"


def assert_one_line_error(result, *needles: str) -> str:
    out = result.output
    assert result.exit_code == 1, f"exit {result.exit_code}: {out[-2000:]}"
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert len(errors[0]) < 600, errors[0]
    return errors[0]


def _copy_run(base, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(base["run"], run)
    return run


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor entry of a torch zip (not in any header)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _edit_train(path: Path, edit) -> None:
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)


def _edit_packed(path: Path, edit, redigest: bool = True) -> None:
    """Rewrite a packed file's metadata/tensors and, like an attacker would, a matching digest."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    inner = json.loads(meta["meta"])
    edit(inner, tensors)
    meta["meta"] = json.dumps(inner)
    if redigest:
        meta["digest"] = tensor_digest(tensors, meta["meta"], meta["tokenizer"])
    else:
        meta.pop("digest", None)
    save_file(tensors, str(path), metadata=meta)


def _alias_bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("name: bomb\npolicy: {_default: ternary}\ntrain: {lr: *j}")
    return "\n".join(lines) + "\n"


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


# ------------------------------------------------------------------------------ the cases
# each: (id, setup(base, tmp) -> argv, needles in the error line)


def _truncated(b, t):
    run = _copy_run(b, t)
    data = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(data[: len(data) // 3])
    return ["eval", run / "ckpt.pt"]


def _bitflip_train(b, t):
    run = _copy_run(b, t)
    _flip_tensor_byte(run / "ckpt.pt")
    return ["eval", run]


def _bitflip_packed(b, t):
    run = _copy_run(b, t)
    p = run / "packed.safetensors"
    data = bytearray(p.read_bytes())
    data[-100] ^= 0x01  # a byte of tensor data near the end
    p.write_bytes(bytes(data))
    return ["analyze", p]


def _config_lie_train(b, t):
    run = _copy_run(b, t)
    _edit_train(run / "ckpt.pt", lambda o: o["model_config"].update(vocab_size=2**26))
    return ["eval", run]


def _config_lie_16g(b, t):  # asks for ~16 GiB: 2^26 tokens x 64 x 4 B per embedding table
    run = _copy_run(b, t)
    _edit_train(run / "ckpt.pt", lambda o: o["model_config"].update(vocab_size=2**24, d_model=64))
    return ["analyze", run]


def _config_lie_layers(b, t):
    run = _copy_run(b, t)
    _edit_train(run / "ckpt.pt", lambda o: o["model_config"].update(n_layers=5))
    return ["generate", run, "--prompt", "Once"]


def _config_lie_packed(b, t):
    run = _copy_run(b, t)
    _edit_packed(run / "packed.safetensors", lambda m, ts: m["model_config"].update(n_layers=3))
    return ["analyze", run / "packed.safetensors"]


def _layer_list_lie(b, t):
    run = _copy_run(b, t)

    def edit(meta, tensors):
        meta["layers"] = [x for x in meta["layers"] if x["name"] != "blocks.1.mlp.up_proj"]
        for k in [k for k in tensors if k.startswith("blocks.1.mlp.up_proj.")]:
            del tensors[k]

    _edit_packed(run / "packed.safetensors", edit)
    return ["analyze", run / "packed.safetensors"]


def _layer_renamed(b, t):
    run = _copy_run(b, t)

    def edit(meta, tensors):
        for x in meta["layers"]:
            if x["name"] == "blocks.1.mlp.up_proj":
                x["name"] = "blocks.1.mlp.upp_proj"

    _edit_packed(run / "packed.safetensors", edit)
    return ["eval", run / "packed.safetensors"]


def _layer_shape_lie(b, t):
    run = _copy_run(b, t)

    def edit(meta, tensors):
        for x in meta["layers"]:
            if x["name"] == "blocks.0.attn.q_proj":
                x["shape"] = [4096, 4096]

    _edit_packed(run / "packed.safetensors", edit, redigest=False)
    return ["generate", run / "packed.safetensors", "--prompt", "Once"]


def _pickle_payload(b, t):
    torch.save({"format": "qtoolkit", "version": 1, "kind": "train", "x": Evil()}, t / "evil.pt")
    return ["eval", t / "evil.pt"]


def _nan_weights(b, t):
    run = _copy_run(b, t)
    _edit_train(run / "ckpt.pt", lambda o: o["model"]["blocks.0.attn.q_proj.weight"].fill_(float("nan")))
    return ["pack", run, "-o", t / "out.safetensors"]


def _zip_bomb(b, t):
    src = b["run"] / "ckpt.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(t / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return ["eval", t / "bomb.pt"]


def _garbage_safetensors(b, t):
    (t / "g.safetensors").write_bytes((200).to_bytes(8, "little") + b'{"__metadata__": ' + os.urandom(300))
    return ["analyze", t / "g.safetensors"]


def _recipe(text: bytes):
    def setup(b, t):
        (t / "r.yaml").write_bytes(text)
        return ["train", "--recipe", t / "r.yaml", "--model", "tiny", "--data", b["corpus"], "--out", t / "out"]

    return setup


def _train_set(*sets: str):
    def setup(b, t):
        argv = ["train", "--model", "tiny", "--data", b["corpus"], "--out", t / "out"]
        for s in sets:
            argv += ["--set", s]
        return argv

    return setup


def _policy_dupes(b, t):
    (t / "p.yaml").write_text("_default: ternary\nembed: int8\nembed: fp16\n")
    return ["train", "--model", "tiny", "--data", b["corpus"], "--out", t / "out", "--set", f"policy={t / 'p.yaml'}"]


def _data(content: bytes, val: bytes | None = None):
    def setup(b, t):
        d = t / "data"
        d.mkdir()
        (d / "train.txt").write_bytes(content)
        if val is not None:
            (d / "val.txt").write_bytes(val)
        return ["train", "--model", "tiny", "--data", d, "--out", t / "out", "--max-steps", 3]

    return setup


_STORY = (b"Once upon a time there was a cat. " * 400)


def _args(*argv):
    def setup(b, t):
        run = _copy_run(b, t)
        return [str(a).replace("RUN", str(run)).replace("CORPUS", str(b["corpus"])).replace("TMP", str(t))
                for a in argv]

    return setup


def _another_checkpoint_as_output(b, t):
    run = _copy_run(b, t)
    other = t / "other"
    shutil.copytree(run, other)
    return ["analyze", run, "--json", other / "ckpt.pt"]


def _pack_over_training_ckpt(b, t):
    run = _copy_run(b, t)
    other = t / "other"
    shutil.copytree(run, other)
    return ["pack", run, "-o", other / "ckpt.pt"]


def _out_is_file(b, t):
    (t / "afile").write_text("keep me")
    return ["train", "--model", "tiny", "--data", b["corpus"], "--out", t / "afile", "--max-steps", 2]


def _garbage_journal(b, t):
    run = _copy_run(b, t)
    (t / "j.log").write_bytes(os.urandom(2000))
    return ["search", "--budget", "100KB", "--ckpt", run / "ckpt.pt", "--storage", f"journal:{t / 'j.log'}",
            "--out", t / "s", "--trials", 1, "--calib-tokens", 64, "--eval-batches", 1]


def _garbage_sqlite(b, t):
    run = _copy_run(b, t)
    (t / "s").mkdir()
    (t / "s" / "search.db").write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    return ["search", "--budget", "100KB", "--ckpt", run / "ckpt.pt", "--out", t / "s", "--trials", 1,
            "--calib-tokens", 64, "--eval-batches", 1]


def _symlinked_output(b, t):
    run = _copy_run(b, t)
    (t / "link.json").symlink_to(run / "ckpt.pt")
    return ["analyze", run, "--json", t / "link.json"]


CASES = [
    # checkpoints
    ("truncated-training", _truncated, ["ckpt.pt"]),
    ("bitflip-training", _bitflip_train, ["CRC32"]),
    ("bitflip-packed", _bitflip_packed, ["digest"]),
    ("config-lie-terabytes", _config_lie_train, ["parameters but the file stores"]),
    ("config-lie-16GiB", _config_lie_16g, ["parameters but the file stores"]),
    ("config-lie-layers", _config_lie_layers, ["parameters but the file stores"]),
    ("config-lie-packed", _config_lie_packed, ["layer records hold"]),
    ("layer-list-lie-packed", _layer_list_lie, ["layer records hold"]),
    ("layer-renamed-packed", _layer_renamed, ["blocks.1.mlp.up_proj: missing"]),
    ("layer-shape-lie-packed", _layer_shape_lie, ["blocks.0.attn.q_proj.codes"]),
    ("pickle-payload", _pickle_payload, ["could execute code"]),
    ("nan-weights", _nan_weights, ["NaN or inf", "blocks.0.attn.q_proj.weight"]),
    ("zip-bomb", _zip_bomb, ["compressed entries"]),
    ("garbage-safetensors", _garbage_safetensors, ["g.safetensors"]),
    # recipes and policies
    ("recipe-duplicate-keys", _recipe(b"name: x\npolicy: {_default: ternary}\ntrain: {lr: 1.0e-3}\ntrain: {lr: 1}\n"),
     ["duplicate key 'train'", "line 4"]),
    ("recipe-alias-bomb", _recipe(_alias_bomb().encode()), ["alias bomb"]),
    ("recipe-binary", _recipe(b"\x00\x01\x02binary\xff" * 20), ["binary file"]),
    ("recipe-not-utf8", _recipe("name: caf\xe9\npolicy: {_default: ternary}\n".encode("latin-1")), ["not UTF-8", "0xe9"]),
    ("recipe-empty", _recipe(b"  \n"), ["empty file"]),
    ("recipe-python-tag", _recipe(b"name: !!python/object/apply:os.system [touch pwned]\npolicy: {}\n"),
     ["python/object/apply"]),
    ("recipe-malformed", _recipe(b"name: x\npolicy: {_default: ternary\n"), ["not valid YAML", "line"]),
    ("nan-lr", _train_set("train.lr=.nan"), ["train.lr", "finite"]),
    ("inf-grad-clip", _train_set("train.grad_clip=.inf"), ["train.grad_clip", "finite"]),
    ("nan-adam-eps", _train_set("train.adam_eps=nan"), ["train.adam_eps", "finite"]),
    ("inf-rope-theta", _train_set("model.rope_theta=.inf"), ["model.rope_theta", "finite"]),
    ("negative-seed", _train_set("train.seed=-1"), ["train.seed"]),
    ("huge-seed", _train_set(f"train.seed={2**70}"), ["train.seed"]),
    ("device-tpu-recipe", _train_set("train.device=tpu"), ["train.device"]),
    ("policy-duplicate-keys", _policy_dupes, ["duplicate key 'embed'"]),
    ("set-deep-nesting", _train_set("train.lr=" + "[" * 2000), ["--set overrides: train.lr", "nested too deeply"]),
    # text data
    ("data-not-utf8", _data(_STORY + b"caf\xe9 " + _STORY), ["not UTF-8", "train.txt"]),
    ("data-binary", _data(b"\x7fELF\x02\x01\x01\x00" + os.urandom(500)), ["binary file", "train.txt"]),
    ("data-empty", _data(b""), ["hold no text", "train.txt"]),
    ("data-val-too-small", _data(_STORY, b"The end."), ["validation split has", "smaller train.seq_len"]),
    # numbers and devices
    ("eval-batches-0", _args("eval", "RUN", "--eval-batches", 0), ["--eval-batches must be >= 1"]),
    ("eval-device-tpu", _args("eval", "RUN", "--device", "tpu"), ["device must be"]),
    ("generate-device-tpu", _args("generate", "RUN/packed.safetensors", "--prompt", "Hi", "--device", "tpu"),
     ["device must be"]),
    ("generate-seed-negative", _args("generate", "RUN/packed.safetensors", "--prompt", "Hi", "--seed", -1), ["seed"]),
    ("bench-threads-0", _args("bench", "RUN/packed.safetensors", "--threads", 0), ["threads must be"]),
    ("search-finetune-negative", _args("search", "--budget", "100KB", "--ckpt", "RUN/ckpt.pt", "--out", "TMP/s",
                                       "--finetune-steps", -3), ["finetune_steps"]),
    ("search-calib-negative", _args("search", "--budget", "100KB", "--ckpt", "RUN/ckpt.pt", "--out", "TMP/s",
                                    "--calib-tokens", -100), ["calib_tokens"]),
    ("search-timeout-negative", _args("search", "--budget", "100KB", "--ckpt", "RUN/ckpt.pt", "--out", "TMP/s",
                                      "--timeout", -5), ["timeout"]),
    ("search-huge-budget", _args("search", "--budget", "9" * 400 + "GB", "--ckpt", "RUN/ckpt.pt", "--out", "TMP/s"),
     ["beyond any model"]),
    ("search-seed-huge", _args("search", "--budget", "100KB", "--ckpt", "RUN/ckpt.pt", "--out", "TMP/s",
                               "--seed", 2**40), ["seed"]),
    ("probe-formats-malformed", _args("probe", "RUN", "--formats", "[ternary, {name: int8"), ["--formats", "YAML"]),
    ("probe-calib-negative", _args("probe", "RUN", "--calib-tokens", -100), ["calib_tokens"]),
    ("analyze-as-malformed", _args("analyze", "RUN", "--as", "{name: ternary"), ["--as", "YAML"]),
    ("search-garbage-journal", _garbage_journal, ["storage"]),
    ("search-garbage-sqlite", _garbage_sqlite, ["storage"]),
    # outputs
    ("pack-output-is-input", _args("pack", "RUN", "-o", "RUN/ckpt.pt"), ["which this command reads"]),
    ("analyze-json-is-input", _args("analyze", "RUN", "--json", "RUN/ckpt.pt"), ["which this command reads"]),
    ("analyze-json-relative-alias", _args("analyze", "RUN/ckpt.pt", "--json", "RUN/../run/./ckpt.pt"),
     ["which this command reads"]),
    ("analyze-json-symlink-to-input", _symlinked_output, ["which this command reads"]),
    ("bench-json-is-input", _args("bench", "RUN/packed.safetensors", "--json", "RUN/packed.safetensors"),
     ["which this command reads"]),
    ("analyze-two-outputs-one-file", _args("analyze", "RUN", "--json", "TMP/r.txt", "--html", "TMP/r.txt"),
     ["the same file as --json"]),
    ("analyze-json-over-checkpoint", _another_checkpoint_as_output, ["is a training checkpoint; refusing"]),
    ("pack-over-training-checkpoint", _pack_over_training_ckpt, ["is a training checkpoint; refusing"]),
    ("pack-output-is-directory", _args("pack", "RUN", "-o", "TMP"), ["is a directory"]),
    ("train-out-is-a-file", _out_is_file, ["is a file, not a directory"]),
    ("unwritable-output", _args("pack", "RUN", "-o", "/proc/qtool-hostile-test.safetensors"),
     ["qtool-hostile-test"]),
]


@pytest.mark.parametrize("setup, needles", [pytest.param(s, n, id=i) for i, s, n in CASES])
def test_hostile_input_is_one_line_and_destroys_nothing(base, tmp_path, setup, needles, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a payload that ran would leave ./pwned
    argv = [str(a) for a in setup(base, tmp_path)]
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    result = runner.invoke(app, argv)
    elapsed = time.perf_counter() - t0
    assert_one_line_error(result, *needles)
    assert_unchanged(before)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists()  # a failed train leaves no run directory behind
    assert elapsed < 60, f"took {elapsed:.1f} s"


def test_alias_bomb_fails_fast(tmp_path):
    """500 bytes of YAML that describe 10^10 values: refused in well under a second."""
    (tmp_path / "bomb.yaml").write_text(_alias_bomb())
    t0 = time.perf_counter()
    result = runner.invoke(app, ["plan", "--recipe", str(tmp_path / "bomb.yaml")])
    assert time.perf_counter() - t0 < 5
    assert_one_line_error(result, "alias bomb")


def test_byte_identical_outputs_of_failed_writes_are_not_partial(base, tmp_path):
    """A refused output leaves no temporary file behind either."""
    run = _copy_run(base, tmp_path)
    result = runner.invoke(app, ["pack", str(run), "-o", str(run / "ckpt.pt")])
    assert_one_line_error(result)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in base["run"].iterdir())


def test_old_packed_file_without_digest_still_loads(base, tmp_path):
    """Files written before digests existed load (their structure is still checked)."""
    from qtoolkit.checkpoint import load_checkpoint

    run = _copy_run(base, tmp_path)
    _edit_packed(run / "packed.safetensors", lambda m, t: None, redigest=False)
    ckpt = load_checkpoint(run / "packed.safetensors")
    assert ckpt["verified_digest"] is False and ckpt["kind"] == "packed"


def test_foreign_json_output_may_be_replaced_but_not_a_checkpoint(base, tmp_path):
    run = _copy_run(base, tmp_path)
    (tmp_path / "old.json").write_text("{}")
    result = runner.invoke(app, ["analyze", str(run), "--json", str(tmp_path / "old.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "old.json").read_text())["schema_version"] == 3
    buf = io.BytesIO((run / "ckpt.pt").read_bytes())
    assert zipfile.is_zipfile(buf)  # the checkpoint it read is untouched


def test_out_of_memory_is_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    import qtoolkit.training.trainer as trainer

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes")

    monkeypatch.setattr(trainer, "train", oom)
    result = runner.invoke(app, ["train", "--model", "tiny", "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "out of memory")

    def bug(*a, **k):
        raise RuntimeError("shape mismatch in a matmul")

    monkeypatch.setattr(trainer, "train", bug)
    result = runner.invoke(app, ["train", "--model", "tiny", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)  # a bug: not hidden


def test_unwritable_cache_is_one_line(base, tmp_path):
    result = runner.invoke(app, ["train", "--model", "tiny", "--data", str(base["corpus"]), "--out",
                                 str(tmp_path / "out"), "--max-steps", 2], env={"QTOOLKIT_CACHE": "/proc/qtool-cache"})
    assert_one_line_error(result, "/proc/qtool-cache")
    assert not (tmp_path / "out").exists()


def test_full_disk_keeps_the_last_checkpoint(base, tmp_path, monkeypatch):
    """ENOSPC while writing a checkpoint: one line, the previous checkpoint byte-identical, no temp file."""
    import errno

    import qtoolkit.checkpoint as ck

    out = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--data", str(base["corpus"]), "--out", str(out),
            "--set", "train.eval_batches=1"]
    assert runner.invoke(app, [*argv, "--max-steps", "4"]).exit_code == 0
    before = snapshot(out)

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full)
    result = runner.invoke(app, [*argv, "--max-steps", "8", "--resume"])
    assert_one_line_error(result, "No space left on device", "ckpt.pt")
    # the resume itself legitimately updated recipe.yaml (steps 4 -> 8) and logged its steps; the
    # checkpoint, which the failed write would have replaced, is byte-identical
    assert_unchanged({out / "ckpt.pt": before[out / "ckpt.pt"]})
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
