from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from qtoolkit.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_then_eval(corpus_dir, tmp_path):
    out = tmp_path / "run"
    r = run("train", "--recipe", "ternary_all", "--model", "tiny", "--data", corpus_dir, "--out", out,
            "--max-steps", 6, "--set", "train.eval_batches=2")
    assert r.exit_code == 0, r.output
    assert "Training summary" in r.output and "val perplexity" in r.output
    assert (out / "ckpt.pt").is_file() and (out / "metrics.jsonl").is_file()
    assert "outputs" in r.output and "recipe.yaml" in r.output and "float32" not in r.output
    r = run("eval", out / "ckpt.pt", "--batches", 2)  # the deprecated spelling of --eval-batches
    assert r.exit_code == 0, r.output
    assert re.search(r"val perplexity\s+│\s+\d+\.\d+", r.output)
    assert "--batches is deprecated" in r.stderr and "tokens scored" in r.output
    assert "evaluating: 2/2" in r.output  # progress


def test_eval_data_scores_the_whole_named_file(fp32_ckpt, corpus_dir):
    import json

    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.training.data import EOS, tokenizer_from_json

    path = corpus_dir / "stories_val.txt"
    tok = tokenizer_from_json(load_checkpoint(fp32_ckpt)["tokenizer"])
    stories = [s.strip() for s in path.read_text().split(EOS) if s.strip()]
    n_tokens = sum(len(tok.encode(s, add_special_tokens=False).ids) + 1 for s in stories)  # each + <|endoftext|>
    r = run("eval", fp32_ckpt, "--data", path, "--json", "-")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["val_tokens"] == n_tokens - 1 and result["whole"]  # every token after the first, once
    assert f"{n_tokens - 1:,}" in r.stderr and "every token of the data" in r.stderr
    r = run("eval", fp32_ckpt, "--data", path, "--eval-batches", 1, "--json", "-")
    assert json.loads(r.stdout)["val_tokens"] == 8 * 64  # one batch of the recipe's 8 x 64-token windows


def test_a_policy_rule_that_assigns_nothing_warns(corpus_dir, tmp_path):
    r = run("plan", "--recipe", "ternary_middle", "--model", "tiny")
    assert r.exit_code == 0 and "warning: policy rule _default assigns no module" in r.output
    r = run("train", "--recipe", "ternary_middle", "--model", "tiny", "--data", corpus_dir, "-o", tmp_path / "m",
            "--max-steps", 1, "--set", "train.eval_batches=1")
    assert r.exit_code == 0, r.output
    assert "warning: policy rule _default assigns no module" in r.output


def test_resume_continues(corpus_dir, tmp_path):
    out = tmp_path / "run"
    base = ["train", "--recipe", "int8_all", "--model", "tiny", "--data", corpus_dir, "--out", out,
            "--set", "train.eval_batches=2"]
    assert run(*base, "--max-steps", 4).exit_code == 0
    r = run(*base, "--max-steps", 4)
    assert r.exit_code == 1 and "--resume" in r.output
    r = run(*base, "--max-steps", 6, "--resume")
    assert r.exit_code == 0, r.output
    assert "6 / 6" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["train", "--model", "huge"], "model.preset: unknown preset 'huge'"),
        (["train", "--set", "train.lr=-1", "--set", "train.schedule=linear"], "2 errors"),
        (["train", "--set", "policy.blocks.0.attn.q_prj=int8", "--model", "tiny", "--data", "/nonexistent"],
         "did you mean blocks.0.attn.q_proj"),
        (["train", "--model", "tiny", "--data", "/nonexistent"], "--data /nonexistent: no such file"),
        (["eval", "/nonexistent/ckpt.pt"], "no such file"),
    ],
)
def test_user_errors_are_one_clean_message(args, message):
    r = run(*args)
    assert r.exit_code == 1
    assert message in r.output
    assert "Traceback" not in r.output


def test_corrupted_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    r = run("eval", tmp_path / "bad.pt")
    assert r.exit_code == 1 and "bad.pt: not a checkpoint" in r.output and "Traceback" not in r.output


def test_listing_commands():
    r = run("recipes")
    assert r.exit_code == 0 and "ternary_middle" in r.output and "blocks[0, -1]=int8" in r.output
    r = run("quantizers")
    assert r.exit_code == 0 and "ternary" in r.output and "2.0001" in r.output


def test_plan_table_and_json():
    r = run("plan", "--recipe", "ternary_all", "--model", "tiny")
    assert r.exit_code == 0, r.output
    assert "lm_head" in r.output and "embed" in r.output and "96,056" in r.output
    r = run("plan", "--recipe", "ternary_all", "--model", "tiny", "--json")
    import json

    data = json.loads(r.stdout)  # the table went to stderr
    assert data["total_bytes"] == 96056 and data["entries"][0]["name"] == "embed"
    r = run("plan", "--packing", "base4")
    assert r.exit_code == 1 and "--packing must be one of" in r.output


def test_pack_then_eval(corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert run("train", "--model", "tiny", "--data", corpus_dir, "--out", out, "--max-steps", 3,
               "--set", "train.eval_batches=2").exit_code == 0
    r = run("pack", out, "--packing", "base3")
    assert r.exit_code == 0, r.output
    assert "== predicted" in r.output and (out / "packed.safetensors").is_file()
    r = run("eval", out / "packed.safetensors", "--batches", 2)
    assert r.exit_code == 0, r.output and "val perplexity" in r.output


def test_analyze_outputs_and_compare(tmp_path):
    from .conftest import save_untrained_checkpoint

    a = save_untrained_checkpoint(tmp_path / "a.pt")
    b = save_untrained_checkpoint(tmp_path / "b.pt", "fp32_baseline")
    r = run("analyze", a, "--full", "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md",
            "--plot", tmp_path / "r.png", "--html", tmp_path / "r.html", "--compare", b)
    assert r.exit_code == 0, r.output
    assert "By block" in r.output and "By module kind" in r.output and "middle blocks" in r.output
    assert "blocks.0.attn.q_proj" in r.output  # --full
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["schema_version"] == 3 and data["compare"]["checkpoint"].endswith("b.pt")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "r.md").read_text().startswith("# Quantization analysis")
    r = run("analyze", b, "--as", "{name: ternary, granularity: channel}")
    assert r.exit_code == 0, r.output and "analysed as" in r.output


def test_compare_html_shows_both_checkpoints(tmp_path):
    from qtoolkit import __version__

    from .conftest import save_untrained_checkpoint

    a = save_untrained_checkpoint(tmp_path / "runs" / "a" / "ckpt.pt")
    b = save_untrained_checkpoint(tmp_path / "runs" / "b" / "ckpt.pt", "ternary_middle")
    html = tmp_path / "reports" / "r.html"
    r = run("analyze", a, "--compare", b, "--html", html, "--markdown", tmp_path / "reports" / "r.md")
    assert r.exit_code == 0, r.output
    for doc in (html.read_text(), (tmp_path / "reports" / "r.md").read_text()):
        assert "../runs/a/ckpt.pt" in doc and "../runs/b/ckpt.pt" in doc  # relative to the report
        assert "Comparison, A vs B" in doc and "recipe ternary_all" in doc and "recipe ternary_middle" in doc
        assert f"qtoolkit {__version__}" in doc and str(tmp_path) not in doc
    page = html.read_text()
    assert page.count("<h3>By block</h3>") == 2 and page.count("data:image/png;base64,") == 1


@pytest.mark.parametrize("content, message", [
    (b"hello, not a checkpoint", "not a checkpoint"),
    (None, "corrupted or truncated"),
])
def test_analyze_bad_input_is_one_line(tmp_path, content, message):
    from .conftest import save_untrained_checkpoint

    path = tmp_path / "x.pt"
    if content is None:
        good = save_untrained_checkpoint(tmp_path / "g.pt").read_bytes()
        path.write_bytes(good[:-200])  # zip directory damaged at the end
    else:
        path.write_bytes(content)
    r = run("analyze", path)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert message in r.output or "not a checkpoint" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_analyze_unknown_version(tmp_path):
    import torch

    torch.save({"format": "qtoolkit", "version": 3, "kind": "train"}, tmp_path / "v.pt")
    r = run("analyze", tmp_path / "v.pt")
    assert r.exit_code == 1 and "version 3 is not supported" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_probe_and_search_commands(corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert run("train", "--recipe", "fp32_baseline", "--model", "tiny", "--data", corpus_dir, "--out", out,
               "--max-steps", 20, "--set", "train.eval_batches=2").exit_code == 0
    r = run("probe", out, "--units", "group", "--calib-tokens", 256, "--json", tmp_path / "probe.json")
    assert r.exit_code == 0, r.output
    assert "blocks.0.attn" in r.output and "Spearman" in r.output and (tmp_path / "probe.json").is_file()
    # what it will do and how long, before the measurements; progress with an ETA
    assert re.search(r"probe: \d+ units x 5 formats .* estimated \d+ s", r.output), r.output
    assert r.output.index("probe: ") < r.output.index("sensitivity probe: ")
    assert re.search(r"sensitivity probe: \d+/\d+  elapsed \d+s  eta \d+s", r.output), r.output
    r = run("search", "--budget", "1KB", "--ckpt", out, "--out", tmp_path / "s")  # deprecated --ckpt still works
    assert r.exit_code == 1 and "smallest reachable size" in r.output and "Traceback" not in r.output
    assert "--ckpt is deprecated" in r.stderr
    r = run("search", out, "--budget", "90kB", "-o", tmp_path / "s", "--trials", 4, "--units", "group",
            "--calib-tokens", 256, "--eval-batches", 2, "--plot", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    assert "Chosen format per unit" in r.output and "Search summary" in r.output
    assert re.search(r"search: probe cached, then up to 4 trials and 5 uniform references.*estimated", r.output)
    assert (tmp_path / "s" / "policy.yaml").is_file() and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "search.db" in r.output and "optuna-dashboard sqlite:///" in r.output  # the outputs row
    r = run("plan", "--model", "tiny", "--set", f"policy={tmp_path / 's' / 'policy.yaml'}", "--json")
    import json

    searched = json.loads((tmp_path / "s" / "search.json").read_text())["best"]["bytes"]
    assert json.loads(r.stdout)["total_bytes"] == searched
    # a budget that holds all-fp16 is answered at once, and the room left is named
    r = run("search", out, "--budget", "10MB", "-o", tmp_path / "s2", "--plot", tmp_path / "s2.png")
    assert r.exit_code == 0, r.output
    assert "nothing was probed or searched" in r.output and "--formats ternary,ptqtp,int4,int8,fp16,fp32" in r.output
    assert not (tmp_path / "s2.png").exists() and "no plot written" in r.output
    assert (tmp_path / "s2" / "policy.yaml").is_file()


# ------------------------------------------------------------------------------ qtool quantize


def test_quantize_then_every_command_accepts_the_result(fp32_ckpt, corpus_dir, tmp_path):
    import json

    out = tmp_path / "q"
    r = run("quantize", fp32_ckpt, "--policy", "ternary_all", "--set", "policy.lm_head=fp16", "-o", out,
            "--json", tmp_path / "q.json")
    assert r.exit_code == 0, r.output
    assert "Quantized checkpoint" in r.output and (out / "ckpt.pt").is_file()
    summary = json.loads((tmp_path / "q.json").read_text())
    assert summary["coverage"]["layers"][-1]["spec"]["name"] == "fp16"
    for args in (["eval", out, "--eval-batches", 2], ["analyze", out], ["pack", out, "-o", tmp_path / "p.safetensors"],
                 ["generate", out, "--prompt", "Once", "--max-new-tokens", 4],
                 ["probe", out, "--calib-tokens", 256, "--formats", "ternary,int8"],
                 ["bench", out, "--baselines", "", "--threads", 1, "--prompt-len", 8, "--new-tokens", 4, "--repeats", 1],
                 ["train", "--recipe", "ternary_all", "--model", "tiny", "--data", corpus_dir, "--init", out,
                  "--max-steps", 2, "--set", "train.eval_batches=2", "--out", tmp_path / "qat"]):
        r = run(*args)
        assert r.exit_code == 0, (args[0], r.output)
    assert int(json.loads(run("quantize", fp32_ckpt, "--policy", "int8", "-o", tmp_path / "j", "--json", "-")
                          .stdout)["total_bytes"]) > 0


@pytest.mark.parametrize("args, message", [
    (["--policy", "{_default: ternary, blocks.5.attn.q_proj: int8}"], "blocks.5.attn.q_proj: matches no quantizable"),
    (["--policy", "int9"], "--policy 'int9' is not a policy file"),
    ([], "no policy given"),
])
def test_quantize_user_errors(fp32_ckpt, tmp_path, args, message):
    r = run("quantize", fp32_ckpt, *args, "-o", tmp_path / "q")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_a_packed_checkpoint(fp32_ckpt, tmp_path):
    assert run("pack", fp32_ckpt, "-o", tmp_path / "p.safetensors").exit_code == 0
    r = run("quantize", tmp_path / "p.safetensors", "--policy", "int8", "-o", tmp_path / "q")
    assert r.exit_code == 1 and "already packed" in r.output and not (tmp_path / "q").exists()


def test_train_init_of_another_shape_is_one_message(fp32_ckpt, corpus_dir, tmp_path):
    r = run("train", "--recipe", "ternary_all", "--data", corpus_dir, "--init", fp32_ckpt, "--out", tmp_path / "r")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "tensor embed.weight is (512, 64) in the checkpoint but (8192, 256) here" in r.output
    assert "pass --model tiny" in r.output and not (tmp_path / "r").exists()
