"""The CLI conventions (qtoolkit/cli.py docstring), checked over every registered command and
parameter: a command added later is checked without anyone writing a test for it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from qtoolkit import __version__
from qtoolkit.cli import _bare_json_to_stdout, app

runner = CliRunner()
GROUP = get_command(app)
COMMANDS = dict(GROUP.commands)

# Commands whose output is not a result (none today). A new command either takes --json or is
# listed here with the reason.
NO_JSON: dict[str, str] = {}
# Commands that run a model on a device. bench measures CPU inference (threads, resident memory and
# the CPU kernels), so it takes no --device; pack and analyze compute on the CPU by design (plan takes
# --device for its --train estimate).
DEVICE_COMMANDS = {"train", "eval", "probe", "search", "generate", "plan"}
# One spelling per idea: option -> (required companion spellings, python type of its values)
CANONICAL = {"--out": {"-o"}, "-o": {"--out"}}
# Spellings replaced by a convention: allowed only as hidden, deprecated aliases.
RETIRED = {"--batches", "--ckpt", "--output", "--out-dir", "--output-dir", "--json-path", "--n-batches",
           "--calib", "--dev", "--num-batches"}
# Options whose absence means "not written" (no default to show).
OFF_WHEN_ABSENT = {"--json", "--plot", "--html", "--markdown", "--compare", "--as"}


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def options(command):
    return [p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]


def test_version_and_short_help():
    for flag in ("--version", "-V"):
        r = run(flag)
        assert r.exit_code == 0 and r.stdout.strip() == f"qtool (qtoolkit) {__version__}"
    r = run("-h")
    assert r.exit_code == 0 and "Usage:" in r.stdout and "train" in r.stdout
    r = run("eval", "-h")
    assert r.exit_code == 0 and "CKPT" in r.stdout and "--eval-batches" in r.stdout


def test_importing_the_cli_imports_no_torch_numpy_or_rich():
    code = ("import sys, qtoolkit.cli; heavy = [m for m in ('torch', 'numpy', 'rich', 'matplotlib', 'optuna') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_one_spelling_per_idea(name):
    command = COMMANDS[name]
    opts = {o: p for p in options(command) for o in p.opts + p.secondary_opts}
    for p in command.params:
        if p.param_type_name == "argument" and "ckpt" in p.name:
            assert p.metavar == "CKPT", f"{name}: the checkpoint argument is shown as CKPT"
    assert not RETIRED & set(opts), f"{name}: {RETIRED & set(opts)} are retired spellings (hidden aliases only)"
    for opt, companions in CANONICAL.items():
        if opt in opts:
            assert companions <= set(opts[opt].opts), f"{name}: {opt} comes with {companions}"
    if name not in NO_JSON:
        assert "--json" in opts, f"{name}: every command with a result takes --json [PATH|-] (or is in NO_JSON)"
    if "--json" in opts:
        p = opts["--json"]
        assert p.opts == ["--json"] and p.metavar == "[PATH|-]" and p.default is None
    if name in DEVICE_COMMANDS:
        assert "--device" in opts, f"{name} runs a model: it takes --device"
    if "--device" in opts:
        p = opts["--device"]
        assert p.opts == ["--device"] and p.default in ("auto", None)
        assert "auto" in p.help and "cpu" in p.help and "cuda" in p.help
    for opt in ("--eval-batches", "--calib-tokens", "--seed"):
        if opt in opts:
            assert opts[opt].opts == [opt]
    for alias in ("--batches", "--ckpt"):  # the deprecated spellings still exist, hidden
        hidden = [p for p in command.params if alias in getattr(p, "opts", []) and p.hidden]
        if hidden:
            assert "Deprecated" in hidden[0].help


def _help_entries(command, text: str) -> dict[str, str]:
    """Each visible option's entry in the help text (from its name to the next option's)."""
    spots = []
    for p in options(command):
        m = re.search(r"(?:^| )(?:-\w, )?" + re.escape(p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0])
                      + r"\b", text)
        assert m, f"{command.name}: {p.opts} not in its help"
        spots.append((m.start(), p))
    spots.sort(key=lambda x: x[0])
    ends = [s for s, _ in spots[1:]] + [len(text)]
    return {p.name: text[s:e] for (s, p), e in zip(spots, ends, strict=True)}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_default(name):
    r = run(name, "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = re.sub(r"\s+", " ", r.stdout)
    entries = _help_entries(COMMANDS[name], text)
    for p in options(COMMANDS[name]):
        opt = p.opts[-1]
        if p.is_flag or p.multiple or p.required or opt in OFF_WHEN_ABSENT or opt == "--help":
            continue
        entry = entries[p.name]
        if p.default is None:
            assert re.search(r"\[default: [^\]]+\]", entry), f"{name} {opt}: the help says what no value means"
        else:
            default = str(p.default.value if hasattr(p.default, "value") else p.default)
            assert f"[default: {default}]" in entry, f"{name} {opt}: [default: {default}] missing: {entry!r}"


def test_bare_json_means_stdout():
    assert _bare_json_to_stdout(["plan", "--json"]) == ["plan", "--json=-"]
    assert _bare_json_to_stdout(["plan", "--json", "--model", "tiny"]) == ["plan", "--json=-", "--model", "tiny"]
    assert _bare_json_to_stdout(["plan", "--json", "-"]) == ["plan", "--json", "-"]
    assert _bare_json_to_stdout(["plan", "--json", "p.json"]) == ["plan", "--json", "p.json"]
    assert _bare_json_to_stdout(["x", "--", "--json"]) == ["x", "--", "--json"]


@pytest.mark.parametrize("args", [["--json"], ["--json", "-"], ["--json", "--full"]])
def test_json_on_stdout_and_tables_on_stderr(args):
    r = run("plan", "--model", "tiny", *args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["total_bytes"] == 96056
    assert "lm_head" in r.stderr and "┃" not in r.stdout  # the table is still shown, on stderr


def test_json_to_a_file_is_listed_in_the_outputs(tmp_path):
    r = run("recipes", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    names = [x["name"] for x in json.loads((tmp_path / "r.json").read_text())]
    assert "ternary_middle" in names and "outputs:" in r.stdout and "r.json" in r.stdout
    r = run("quantizers", "--json", "-")
    data = {x["name"]: x for x in json.loads(r.stdout)}
    assert data["ternary"]["spec"]["alpha"] == "absmean" and data["ternary"]["bits_per_weight_768x768"] > 2


def test_json_path_that_looks_like_a_checkpoint_is_refused(tmp_path):
    r = run("plan", "--json", tmp_path / "ckpt.pt")
    assert r.exit_code == 1 and "looks like a checkpoint" in r.output and not (tmp_path / "ckpt.pt").exists()
