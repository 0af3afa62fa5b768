"""`qtool`: each command is a thin call into a library function, rendered by `qtoolkit.report`.

Conventions every command follows (tests/test_cli_conventions.py checks them over the registered
commands, so a new command is checked too):

    CKPT                  the checkpoint: a positional argument (a file, or a run directory)
    -o, --out PATH        the command's main output (file or directory)
    --json [PATH|-]       the result as JSON: to PATH, or with `-` (or no value) to stdout, and then
                          everything else the command prints goes to stderr
    --device auto|cpu|cuda   where models run (default auto: cuda when PyTorch sees a GPU)
    --eval-batches N, --calib-tokens N, --seed N
    help                  every option shows its default (`[default: ...]`)

`--json` with no value: click options take exactly one value, so `_Group.parse_args` turns a bare
`--json` (the last token, or followed by another option) into `--json=-` before parsing. The one
ambiguous spelling, `--json CKPT` before the positional argument, then takes CKPT as the path: the
command fails with "Missing argument 'CKPT'" before doing anything, and `_json_target` refuses paths
that look like checkpoints. Write `--json -` or put `--json` last to print to stdout.

Start-up stays light: this module imports no torch, numpy or rich at import time (library modules
are imported inside the commands), so `qtool --help` and `qtool --version` answer at once; help is
click's plain formatter (no rich markup: option text can contain brackets, and it is faster).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from qtoolkit import __version__
from qtoolkit.errors import ConfigError, QToolkitError


class _Lazy:
    """A module imported on first attribute access (`report.console` imports rich and torch)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


report = _Lazy("qtoolkit.report")
quantizers = _Lazy("qtoolkit.quantizers")


def _bare_json_to_stdout(args: list[str]) -> list[str]:
    """`--json` with no value (last, or before another option) -> `--json=-` (module docstring)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg == "--json":
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or (nxt.startswith("-") and nxt != "-"):
                out.append("--json=-")
                continue
        out.append(arg)
    return out


class _Group(TyperGroup):
    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _bare_json_to_stdout(list(args)))


app = typer.Typer(
    name="qtool",
    cls=_Group,
    help="Mixed-precision (ternary-first) quantization for transformer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"qtool (qtoolkit) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Mixed-precision (ternary-first) quantization for transformer language models."""


# Errors a user can cause and fix: reported without a traceback, exit status 1. The environment's
# refusals (OSError: a read-only or full disk, a missing or unwritable path, a file where a directory
# belongs) and running out of memory are reported the same way. Anything else is a bug and keeps
# its traceback.
USER_ERRORS = (QToolkitError,)


def os_error_text(e: OSError) -> str:
    """One line for an OSError: the file(s) it concerns and the system's reason."""
    where = ": ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except USER_ERRORS as e:
            report.error(str(e))
        except OSError as e:
            report.error(os_error_text(e) + " (check the path, its permissions and the free space)")
        except MemoryError:
            report.error("out of memory: use a smaller model, batch or evaluation size")
        except RuntimeError as e:  # torch's allocators raise RuntimeError subclasses when memory runs out
            if not any(s in str(e) for s in ("can't allocate memory", "out of memory", "OutOfMemory")):
                raise
            report.error("out of memory: use a smaller model, batch or evaluation size "
                         f"({(str(e).strip().splitlines() or [''])[0][:160]})")
        raise typer.Exit(1)

    return wrapper


# ------------------------------------------------------------------------------ shared options

Ckpt = Annotated[Path, typer.Argument(metavar="CKPT", help="Checkpoint file, or a run directory holding ckpt.pt.",
                                      show_default=False)]
Json = Annotated[str | None, typer.Option(
    "--json", metavar="[PATH|-]", show_default=False,
    help="Also write the result as JSON to PATH. '--json -' or a bare --json prints it to stdout "
         "(everything else then goes to stderr).")]
Device = Annotated[str, typer.Option("--device", help="Where the model runs: auto (cuda if available, else cpu), "
                                                      "cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
CalibTokens = Annotated[int, typer.Option("--calib-tokens", help="Calibration tokens (fixed, seeded training windows).")]
Data = Annotated[str | None, typer.Option(help="Local text file or directory of .txt files.  "
                                               "[default: the checkpoint's data]", show_default=False)]
Formats = Annotated[str, typer.Option(help="Candidate formats: names or aliases (ternary,ptqtp,int4,gptq3,int8,fp16; `qtool quantizers` lists them) or a YAML list of specs.")]
# The default candidates: the formats between ternary and INT8 (PTQTP's 3.45 and INT4's 4.19 bits/weight)
# keep the post-training search within 0.03 nats of fp32 at 25-75% budgets on `small`, where
# ternary,int8,fp16 loses 0.28-0.57 (README, "Formats between ternary and INT8"); the probe costs ~2.5x.
DEFAULT_FORMATS = "ternary,ptqtp,int4,int8,fp16"
Units = Annotated[str, typer.Option(help="layer (each linear) or group (a block's attn / mlp).")]


def _json_target(value: str | None) -> str | None:
    """Check a --json value before any work: '-' or a writable file path that is not a checkpoint."""
    if value is None or value == "-":
        return value
    path = Path(value)
    if path.suffix in (".pt", ".safetensors", ".bin", ".gguf") or (path / "ckpt.pt").is_file():
        raise ConfigError(f"--json {value}: that looks like a checkpoint, not a JSON output path; to print the "
                          "JSON write '--json -' (or put --json last)")
    if path.is_dir():
        raise ConfigError(f"--json {value}: is a directory; give a file path (or '-' for stdout)")
    return value


def _check_outputs(json_target: str | None, inputs: list, *others) -> None:
    """Before any work: the --json target and the other outputs (option, path, kind) must not
    destroy an input or a checkpoint (`qtoolkit.outputs.check_outputs`)."""
    from qtoolkit.outputs import check_outputs

    check_outputs([("--json", None if json_target in (None, "-") else json_target, None), *others], inputs)
    _json_target(json_target)


@contextlib.contextmanager
def _human_output(json_target: str | None):
    """While the JSON goes to stdout, tables, progress and notes go to stderr."""
    with report.stdout_to_stderr(json_target == "-"):
        yield


def _write_json(target: str | None, data: Any) -> list[Path]:
    """Write `data` to the --json target; the files written (for the outputs row)."""
    if target is None:
        return []
    text = json.dumps(data, indent=2, default=str)
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return []
    from qtoolkit.checkpoint import atomic_write_text

    atomic_write_text(target, text + "\n")
    return [Path(target)]


def _deprecated(old: str, new: str) -> None:
    report.warn(f"{old} is deprecated and will be removed in the next release; use {new}")


# ------------------------------------------------------------------------------ commands


@app.command(short_help="Quantization-aware training from a recipe.")
@user_errors
def train(
    recipe: Annotated[str, typer.Option(help="Shipped recipe name (see `qtool recipes`) or a YAML path.")] = "ternary_all",
    model: Annotated[str | None, typer.Option(help="Model preset: tiny, small, ternarylm-132m.  "
                                                   "[default: the recipe's model.preset]", show_default=False)] = None,
    data: Annotated[str | None, typer.Option(help="Local text file or directory (instead of the Hub dataset).  "
                                                  "[default: the recipe's data]", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output directory.  "
                                             "[default: runs/<recipe>-<preset>]", show_default=False)] = None,
    max_steps: Annotated[int | None, typer.Option(help="Total training steps (sets train.steps).  "
                                                       "[default: the recipe's train.steps]", show_default=False)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe field (repeatable).",
                                                   show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/ckpt.pt.")] = False,
    init: Annotated[Path | None, typer.Option(help="Start from this training checkpoint's weights (fp32 or quantized) "
                                              "under the recipe's policy; fresh optimizer and schedule.  [default: none, "
                                                   "train from scratch]", show_default=False)] = None,
    calib_tokens: Annotated[int | None, typer.Option("--calib-tokens", help="With --init: calibration tokens for "
                                                     "quantizers that fit themselves on data.  [default: 4096]",
                                                     show_default=False)] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (sets train.device).  "
                         "[default: the recipe's train.device, auto]", show_default=False)] = None,
    json_: Json = None,
) -> None:
    """Quantization-aware training of a language model from a recipe (from scratch or from a checkpoint)."""
    from qtoolkit.training.distributed import is_main_process
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import train as run_train

    _check_outputs(json_, [data, init])
    overrides = list(set_ or [])
    if model:
        overrides.append(f"model.preset={model}")
    if data:
        overrides.append(f"data.path={data}")
    if max_steps is not None:
        overrides.append(f"train.steps={max_steps}")
    if device is not None:
        overrides.append(f"train.device={device}")
    r = load_recipe(recipe, overrides)
    out = out or Path("runs") / f"{r.name}-{r.preset}"
    if not is_main_process():  # under torchrun: rank 0 reports and writes (training.distributed)
        result = run_train(r, out, resume=resume, init=init, init_calib_tokens=calib_tokens)
        raise typer.Exit(130 if result.interrupted else 0)
    with _human_output(json_):
        try:
            with report.TrainProgress() as progress:
                result = run_train(r, out, resume=resume, callback=progress, init=init,
                                   init_calib_tokens=calib_tokens)
        except KeyboardInterrupt:
            report.error(f"interrupted; the last checkpoint in {out} is intact (resume with --resume)")
            raise typer.Exit(130) from None
        written = _write_json(json_, result.to_dict())
        report.console.print(report.train_summary(result, written))
    if result.interrupted:
        raise typer.Exit(130)


@app.command("eval", short_help="Validation loss and perplexity of a checkpoint.")
@user_errors
def eval_(
    ckpt: Ckpt,
    data: Annotated[str | None, typer.Option(help="Text to evaluate: a file (all of it) or a directory (its "
                                                  "validation files, else all).  [default: the checkpoint's "
                                                  "validation split]", show_default=False)] = None,
    eval_batches: Annotated[int | None, typer.Option(
        "--eval-batches", help="Evaluate only the first N batches.  [default: all of --data; without --data "
                               "the recipe's train.eval_batches]", show_default=False)] = None,
    batches: Annotated[int | None, typer.Option("--batches", hidden=True, help="Deprecated: --eval-batches.")] = None,
    device: Device = "auto",
    json_: Json = None,
) -> None:
    """Validation loss and perplexity of a training or packed checkpoint."""
    from qtoolkit.training.trainer import evaluate_checkpoint

    _check_outputs(json_, [ckpt, data])
    if batches is not None:
        _deprecated("--batches", "--eval-batches")
        eval_batches = eval_batches if eval_batches is not None else batches
    with _human_output(json_):
        with report.StageProgress() as progress:
            result = evaluate_checkpoint(ckpt, data_path=data, eval_batches=eval_batches, device=device,
                                         progress=progress)
        written = _write_json(json_, result.to_dict())
        report.console.print(report.eval_summary(result, written))


@app.command(short_help="Post-training quantization of a checkpoint under a policy.")
@user_errors
def quantize(
    ckpt: Ckpt,
    policy: Annotated[str | None, typer.Option(help="A recipe name (its policy), a policy or recipe YAML file (e.g. "
                                               "search_out/policy.yaml), a quantizer name, or an inline mapping "
                                               "'{_default: ternary, embed: int8}'.  [default: none: the policy overrides give it]",
                                               show_default=False)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Policy override: policy.PATTERN=SPEC or "
                                                   "policy=FILE (repeatable).", show_default=False)] = None,
    data: Data = None,
    calib_tokens: CalibTokens = 4096,
    seed: Annotated[int, typer.Option("--seed", help="Calibration seed.")] = 0,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output run directory (or a .pt file).  "
                                             "[default: runs/<source run>-<policy>]", show_default=False)] = None,
    device: Device = "auto",
    json_: Json = None,
) -> None:
    """Post-training quantization: apply a policy to a checkpoint and write a quantized training checkpoint."""
    from qtoolkit.training.ptq import policy_source, quantize_checkpoint

    rules = policy_source(policy, list(set_ or []))
    out = out or Path("runs") / f"{_run_name(ckpt)}-{_policy_label(policy, set_)}"
    _check_outputs(json_, [ckpt, data])
    with _human_output(json_):
        with report.StageProgress() as progress:
            result = quantize_checkpoint(ckpt, rules, out, data=data, calib_tokens=calib_tokens, seed=seed,
                                         device=device, progress=progress)
        written = _write_json(json_, result.to_dict())
        report.console.print(report.quantize_summary(result))
        report.print_outputs([result.path, *written])


def _run_name(ckpt: Path) -> str:
    return (ckpt if ckpt.is_dir() else ckpt.parent).resolve().name or "model"


def _policy_label(policy: str | None, overrides: list[str] | None) -> str:
    if policy and not policy.lstrip().startswith("{") and not overrides:
        return Path(policy).stem
    return "quantized"


@app.command(short_help="Exact stored bytes of a recipe's model per layer; --train: peak training memory.")
@user_errors
def plan(
    recipe: Annotated[str, typer.Option(help="Recipe name or YAML path (its model and policy are used).")] = "ternary_all",
    model: Annotated[str | None, typer.Option(help="Model preset: tiny, small, ternarylm-132m.  "
                                                   "[default: the recipe's model.preset]", show_default=False)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe field (repeatable).",
                                                   show_default=False)] = None,
    packing: Annotated[str | None, typer.Option(help="Ternary packing for every ternary layer: 2bit or base3.  "
                                                     "[default: each layer's own, 2bit]", show_default=False)] = None,
    full: Annotated[bool, typer.Option(help="List every parameter (norms too) in the table.")] = False,
    train: Annotated[bool, typer.Option("--train", help="Also estimate peak training memory on --device (weights, "
                                                        "gradients, optimizer, activations, logits) and the "
                                                        "micro-batch `qtool train` would run.")] = False,
    device: Device = "auto",
    json_: Json = None,
) -> None:
    """Exact stored bytes of a recipe's model, layer by layer, without training anything (with --train:
    the peak memory training it needs, and the micro-batch that fits)."""
    from qtoolkit.device import resolve_device
    from qtoolkit.pack import memory_plan
    from qtoolkit.training.recipe import load_recipe

    _json_target(json_)
    r = load_recipe(recipe, list(set_ or []) + ([f"model.preset={model}"] if model else []))
    p = memory_plan(r.model_config(), r.policy, _packing(packing))
    if train:
        from qtoolkit.training.memory import plan_training_memory

        t = plan_training_memory(r, resolve_device(device))
        with _human_output(json_):
            written = _write_json(json_, {"recipe": r.name, "preset": r.preset, "packing": packing, **p.to_dict(),
                                          "training": t.to_dict()})
            report.console.print(report.plan_table(p, f"{r.name} on {r.preset}", full=full))
            report.console.print(report.train_memory_table(t.to_dict(), f"training memory: {r.name} on {r.preset}"))
            report.print_outputs(written)
        return
    with _human_output(json_):
        written = _write_json(json_, {"recipe": r.name, "preset": r.preset, "packing": packing, **p.to_dict()})
        report.console.print(report.plan_table(p, f"{r.name} on {r.preset}", full=full))
        report.print_outputs(written)


def _packing(value: str | None) -> str | None:
    from qtoolkit.pack import PACKINGS

    if value is not None and value not in PACKINGS:
        raise ConfigError(f"--packing must be one of {', '.join(PACKINGS)}, got {value!r}")
    return value


@app.command(short_help="Write the packed deployment checkpoint.")
@user_errors
def pack(
    ckpt: Ckpt,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output file.  [default: packed.safetensors "
                                             "beside CKPT]", show_default=False)] = None,
    packing: Annotated[str | None, typer.Option(help="Store ternary layers as 2bit or base3 (same codes).  "
                                                     "[default: each layer's own, 2bit]", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    json_: Json = None,
) -> None:
    """Write a deployment checkpoint whose bytes are the packed weights."""
    from qtoolkit.pack import pack_checkpoint

    _check_outputs(json_, [ckpt])
    src = ckpt if ckpt.is_file() else ckpt / "ckpt.pt"
    result = pack_checkpoint(ckpt, out or src.with_name("packed.safetensors"), _packing(packing), overwrite)
    with _human_output(json_):
        written = _write_json(json_, result.to_dict())
        report.console.print(report.pack_summary(result, written))


@app.command(short_help="Per-layer sparsity and quantization report.")
@user_errors
def analyze(
    ckpt: Ckpt,
    full: Annotated[bool, typer.Option(help="Add the per-layer table.")] = False,
    json_: Json = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the report as Markdown.", show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG figure: sparsity per block, alpha, bits per layer.",
                                              show_default=False)] = None,
    html: Annotated[Path | None, typer.Option(help="Write a one-file HTML report (tables + figure).",
                                              show_default=False)] = None,
    compare: Annotated[Path | None, typer.Option(help="A second checkpoint to set side by side (B).",
                                                 show_default=False)] = None,
    as_: Annotated[str | None, typer.Option("--as", show_default=False,
                                            help="Analyse as if quantized: a quantizer spec (ternary, "
                                                 "'{name: ternary, granularity: channel}') or a policy YAML file.")] = None,
    band: Annotated[float, typer.Option(help="Near-threshold band: | |W/alpha| - 0.5 | < band.")] = 0.05,
    middle: Annotated[str | None, typer.Option(help="Middle blocks as a range START:STOP.  [default: the paper's "
                                                    "L5-L9 of 12, scaled]", show_default=False)] = None,
) -> None:
    """Per-layer sparsity and quantization report of a checkpoint."""

    from qtoolkit.checkpoint import atomic_write_text
    from qtoolkit.evaluate.analyze import analyze_checkpoint
    from qtoolkit.yamlsafe import parse_yaml

    _check_outputs(json_, [ckpt, compare, as_ if as_ and Path(as_).is_file() else None],
                   ("--markdown", markdown, None), ("--plot", plot, None), ("--html", html, None))
    as_policy = None
    if as_ is not None:
        as_policy = as_ if Path(as_).is_file() else parse_yaml(as_, "--as")
    a = analyze_checkpoint(ckpt, as_policy=as_policy, band=band, middle=_range(middle))
    b = analyze_checkpoint(compare, band=band, middle=_range(middle)) if compare else None
    with _human_output(json_):
        report.print_renderables(report.analysis_renderables(a, full=full))
        if b is not None:
            report.console.print(report.compare_table(a, b))
        written = _write_json(json_, a.to_dict() | {"compare": b.to_dict() if b else None})
        if markdown:
            written.append(atomic_write_text(markdown, report.analysis_markdown(a, b, base=markdown.parent)))
        if plot:
            report.save_analysis_plot(a, plot, b)
            written.append(plot)
        if html:
            written.append(atomic_write_text(html, report.analysis_html(a, b, base=html.parent)))
        report.print_outputs(written)


def _range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--middle takes START:STOP block indices, e.g. 4:9; got {text!r}") from None
    return lo, hi


def _announce(plan: dict) -> None:
    """What a probe or search is about to do and how long it should take, printed before it does it."""
    report.console.print(report.plan_text(plan), highlight=False, style="bold", soft_wrap=True)


ProbePrecision = Annotated[str, typer.Option(
    "--probe-precision", help="Arithmetic of the probe's forward passes: auto (bf16 where the hardware multiplies "
    "bf16 natively: AMX/AVX512-BF16 CPUs, CUDA), fp32 or bf16.")]


@app.command(short_help="Per-layer sensitivity and sparsity probes.")
@user_errors
def probe(
    ckpt: Ckpt,
    data: Data = None,
    formats: Formats = DEFAULT_FORMATS,
    units: Units = "layer",
    calib_tokens: CalibTokens = 4096,
    seed: Seed = 0,
    timeout: Annotated[float | None, typer.Option(help="Stop measuring after this many seconds (resumable).  "
                                                       "[default: no limit]", show_default=False)] = None,
    full: Annotated[bool, typer.Option(help="Also show the one-pass estimates.")] = False,
    device: Device = "auto",
    json_: Json = None,
    probe_precision: ProbePrecision = "auto",
) -> None:
    """Sparsity and sensitivity probes: loss increase per layer and format, and a one-pass estimate."""
    from qtoolkit.search.probes import parse_formats, run_probe

    _check_outputs(json_, [ckpt, data])
    with _human_output(json_):
        with report.StageProgress() as progress:
            result = run_probe(ckpt, parse_formats(formats), units, data, calib_tokens, seed, timeout, progress,
                               device=device, announce=_announce, precision=probe_precision)
        written = _write_json(json_, result.to_dict())
        report.console.print(report.probe_table(result, full=full, outputs=[Path(result.cache_path), *written]))


@app.command(short_help="Mixed-precision allocation for a byte budget.")
@user_errors
def search(
    ckpt_arg: Annotated[Path | None, typer.Argument(
        metavar="CKPT", show_default=False, help="Training checkpoint to allocate precision for (or its run directory).")] = None,
    budget: Annotated[str, typer.Option(help="Packed bytes of the whole model: e.g. 400MB, 1.5GB, 64MiB.",
                                        show_default=False)] = ...,
    ckpt_opt: Annotated[Path | None, typer.Option("--ckpt", hidden=True, help="Deprecated: the positional CKPT.")] = None,
    data: Data = None,
    formats: Formats = DEFAULT_FORMATS,
    trials: Annotated[int | None, typer.Option(help="Completed trials to reach.  [default: adapts to the space: "
                                                     "4 x sqrt(units x (formats - 1)), 10 to 100]",
                                                show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option(help="Wall-clock limit in seconds (probe included).  "
                                                       "[default: no limit]", show_default=False)] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL.  [default: sqlite:///OUT/search.db]",
                                                show_default=False)] = None,
    study: Annotated[str | None, typer.Option(help="Study name.  [default: derived from the arguments]",
                                              show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory.")] = Path("search_out"),
    units: Units = "layer",
    finetune_steps: Annotated[int, typer.Option(help="QAT steps per trial before evaluating.")] = 0,
    pareto: Annotated[bool, typer.Option(help="Bytes-vs-loss Pareto front over budgets up to --budget.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Sampler and calibration seed.")] = 0,
    calib_tokens: CalibTokens = 4096,
    eval_batches: Annotated[int, typer.Option("--eval-batches", help="Validation batches per trial.")] = 8,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG: trials and Pareto front, chosen formats per layer.",
                                              show_default=False)] = None,
    device: Device = "auto",
    json_: Json = None,
    apply: Annotated[bool, typer.Option(help="Then write the chosen allocation as a quantized checkpoint "
                                        "(OUT/quantized; with --finetune-steps also OUT/finetuned).")] = False,
    probe_precision: ProbePrecision = "auto",
) -> None:
    """Find a per-layer mixed-precision allocation that fits a memory budget."""
    from qtoolkit.search.allocate import run_search
    from qtoolkit.search.probes import parse_formats

    if ckpt_opt is not None:
        _deprecated("--ckpt", "the positional CKPT (qtool search CKPT --budget ...)")
        if ckpt_arg is not None and ckpt_arg != ckpt_opt:
            raise ConfigError(f"two checkpoints given: {ckpt_arg} and --ckpt {ckpt_opt}; pass one (positional)")
    ckpt = ckpt_arg or ckpt_opt
    if ckpt is None:
        raise ConfigError("missing CKPT: qtool search CKPT --budget SIZE (the training checkpoint to allocate for)")
    _check_outputs(json_, [ckpt, data], ("--plot", plot, None))
    with _human_output(json_):
        with report.StageProgress() as progress:
            result = run_search(ckpt, budget, parse_formats(formats), out, data, trials, timeout, storage, study, units,
                                finetune_steps, pareto, seed, calib_tokens, eval_batches, progress=progress,
                                device=device, apply=apply, announce=_announce, probe_precision=probe_precision)
        written = _write_json(json_, result.to_dict())
        if plot and result.no_search is None:  # a budget answered without search has no trials to draw
            report.save_search_plot(result, plot)
            written.append(plot)
        report.print_renderables(report.search_renderables(result, written))
        if plot and result.no_search is not None:
            report.console.print(f"no plot written to {plot}: nothing was searched", highlight=False)
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
@user_errors
def recipes(json_: Json = None) -> None:
    """List the shipped recipes."""
    from qtoolkit.training.recipe import available_recipes, load_recipe

    _json_target(json_)
    rows = []
    for name in available_recipes():
        r = load_recipe(name)
        rows.append({"name": name, "preset": r.preset, "policy": r.policy, "description": r.description})
    with _human_output(json_):
        written = _write_json(json_, rows)
        report.console.print(report.recipes_table(rows))
        report.print_outputs(written)


@app.command("quantizers")
@user_errors
def list_quantizers(json_: Json = None) -> None:
    """List the registered quantizers and their aliases (int4, gptq4, ...): default options, bits per
    weight on a 768x768 weight (codes, scales and zero points counted exactly), whether they calibrate."""
    _json_target(json_)
    rows = quantizers.catalog()
    with _human_output(json_):
        written = _write_json(json_, rows)
        report.console.print(report.quantizers_table(rows))
        report.print_outputs(written)


@app.command(short_help="Generate text with the fast inference runtime.")
@user_errors
def generate(
    ckpt: Ckpt,
    prompt: Annotated[str, typer.Option(help="Text to continue.", show_default=False)],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample among the K most likely tokens (0 = all).")] = 40,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed: the same seed gives the same text.")] = 0,
    kernels: Annotated[str | None, typer.Option(help="auto, reference, avx2 or avx512-vnni.  "
                                                     "[default: $QTOOLKIT_KERNELS or auto]", show_default=False)] = None,
    device: Device = "auto",
    json_: Json = None,
) -> None:
    """Generate text from a packed checkpoint with the fast inference runtime, streaming tokens."""
    from qtoolkit.deploy.runtime import GenerationStats, generate_text, load_inference_model

    _check_outputs(json_, [ckpt])
    with _human_output(json_):
        with report.KernelBuildNotice() as notice:
            model = load_inference_model(ckpt, kernels=kernels, device=device, progress=notice)
        stats = GenerationStats()
        pieces = generate_text(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k or None, seed=seed, stats=stats)
        text = report.stream_generation(prompt, pieces)
        written = _write_json(json_, {"checkpoint": str(ckpt), "prompt": prompt, "text": text,
                                      "backend": model.backend.to_dict(), **stats.to_dict()})
        report.err_console.print(report.generation_summary(stats, model.backend), soft_wrap=True)
        report.print_outputs(written, stderr=True)


@app.command(short_help="CPU inference speed and memory vs PyTorch.")
@user_errors
def bench(
    ckpt: Ckpt,
    baselines: Annotated[str, typer.Option(help="Comma-separated: fp32, int8-dynamic ('' for none).")] = "fp32,int8-dynamic",
    threads: Annotated[int | None, typer.Option(help="CPU threads.  [default: torch's default, the cores "
                                                     "available]", show_default=False)] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens for the prefill measurement (scaled down to "
                                                 "fit the model's context).")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Decode steps per round (scaled down with --prompt-len).")] = 64,
    repeats: Annotated[int, typer.Option(help="Measured rounds (after one warm-up); median, min and max are "
                                              "reported.")] = 3,
    kernels: Annotated[str | None, typer.Option(help="Kernel path of the packed model: auto, reference, avx2, "
                                                     "avx512-vnni.  [default: $QTOOLKIT_KERNELS or auto]",
                                                show_default=False)] = None,
    json_: Json = None,
) -> None:
    """CPU prefill/decode speed, weight bytes and peak memory: packed vs FP32 and dynamic-INT8 PyTorch."""
    from qtoolkit.deploy.bench import parse_baselines, run_bench

    _check_outputs(json_, [ckpt])
    names = parse_baselines(baselines)
    with _human_output(json_):
        with report.BenchProgress() as progress:
            result = run_bench(ckpt, names, threads=threads, prompt_len=prompt_len, new_tokens=new_tokens,
                               repeats=repeats, kernels=kernels, progress=progress)
        written = _write_json(json_, result.to_dict())
        report.console.print(report.bench_table(result, written))


@app.command(short_help="Finetune and score on GLUE (MRPC, SST-2, CoLA).")
@user_errors
def glue(
    ckpt: Ckpt,
    task: Annotated[str, typer.Option(help="mrpc, sst2, cola, a comma list, or all.")] = "all",
    data_dir: Annotated[Path | None, typer.Option(help="Local GLUE TSVs: the folder holding MRPC/, SST-2/, CoLA/.  "
                                                  "[default: the Hub's nyu-mll/glue]", show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training split.  [default: MRPC 2, SST-2 1, "
                                               "CoLA 3]", show_default=False)] = None,
    lr: Annotated[float, typer.Option(help="Backbone peak learning rate.")] = 3e-4,
    head_lr: Annotated[float, typer.Option(help="Classification head peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 32,
    max_len: Annotated[int, typer.Option(help="Tokens per example; longer ones are truncated and counted.")] = 128,
    max_train: Annotated[int | None, typer.Option(help="Use at most N training examples per task (one seeded subset); "
                                                  "0 = all.  [default: SST-2 20,000 of 67,349; MRPC, CoLA all]",
                                                  show_default=False)] = None,
    pooling: Annotated[str, typer.Option(help="last (the closing token's state) or mean (over real tokens).")] = "last",
    policy: Annotated[str | None, typer.Option(help="Finetune under this policy: a policy YAML, a recipe name, or a "
                                               "quantizer spec.  [default: the checkpoint's own]",
                                               show_default=False)] = None,
    freeze: Annotated[bool, typer.Option(help="Train the head only (a linear probe).")] = False,
    seeds: Annotated[int, typer.Option(help="Number of seeds (runs) per task.")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="First seed; runs use SEED, SEED+1, ...")] = 0,
    compare: Annotated[Path | None, typer.Option(help="A second checkpoint to run the same protocol on.",
                                                 show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder for glue.json and glue.md.")] = Path("glue_out"),
    save_models: Annotated[bool, typer.Option(help="Also save every finetuned classifier in OUT as a training "
                                              "checkpoint (qtool pack/eval work on it).")] = False,
    device: Device = "auto",
    json_: Json = None,
) -> None:
    """Finetune on GLUE tasks (MRPC, SST-2, CoLA) and report dev metrics beside the majority baseline."""
    from qtoolkit.checkpoint import atomic_write_text
    from qtoolkit.errors import ConfigError
    from qtoolkit.evaluate.glue import GlueConfig, run_glue
    from qtoolkit.rundir import run_dir_lock

    config = GlueConfig(tasks=task, data_dir=str(data_dir) if data_dir else None, epochs=epochs, lr=lr,
                        head_lr=head_lr, batch_size=batch_size, max_len=max_len, max_train=max_train,
                        pooling=pooling, freeze=freeze, policy=policy, seeds=seeds, seed=seed, device=device)
    outputs = {"json": out / "glue.json", "markdown": out / "glue.md"}
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing:
        raise ConfigError(f"--out {out} already holds {', '.join(existing)}; choose another --out or move them away")
    _check_outputs(json_, [ckpt, compare, data_dir], *(("--out", p, None) for p in outputs.values()))
    with _human_output(json_), run_dir_lock(out, "qtool glue"):
        with report.GlueProgress(report.console) as progress:
            result = run_glue(ckpt, config, compare=compare, save_dir=out if save_models else None, callback=progress)
        report.console.print(report.glue_table(result))
        atomic_write_text(outputs["json"], json.dumps(result.to_dict(), indent=2))
        atomic_write_text(outputs["markdown"], report.glue_markdown(result))
        written = _write_json(json_, result.to_dict())
        report.print_outputs([*outputs.values(), *written])


@app.command("import", short_help="Import a Hugging Face Llama model as a checkpoint.")
@user_errors
def import_(
    hf_dir: Annotated[Path, typer.Argument(help="Local Hugging Face model directory (config.json, safetensors, "
                                                "tokenizer.json).", show_default=False)],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output run directory.  [default: "
                                             "runs/import-<HF_DIR name>]", show_default=False)] = None,
    json_: Json = None,
) -> None:
    """Import a Hugging Face Llama-architecture model as a qtoolkit training checkpoint (OUT/ckpt.pt)."""
    from qtoolkit.interop.hf_import import import_hf

    out = out or Path("runs") / f"import-{hf_dir.resolve().name}"
    _check_outputs(json_, [hf_dir])
    with _human_output(json_):
        with report.StageProgress(report.err_console) as progress:
            result = import_hf(hf_dir, out, progress)
        written = _write_json(json_, result.to_dict())
        report.console.print(report.import_summary(result))
        report.print_outputs([result.path, *written])


@app.command(short_help="Export to GGUF (llama.cpp) or a transformers directory.")
@user_errors
def export(
    ckpt: Ckpt,
    format_: Annotated[str, typer.Option("--format", help="gguf (llama.cpp) or hf (transformers directory).")] = "gguf",
    type_: Annotated[str | None, typer.Option("--type", help="GGUF type of the ternary layers: tq2_0, tq1_0, q8_0 or "
                                              "f16 (gguf only; see docs/interop.md).  [default: tq2_0]",
                                              show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output file (gguf) or directory (hf).  [default: "
                                             "model-<type>.gguf or hf/ beside CKPT]", show_default=False)] = None,
    json_: Json = None,
) -> None:
    """Export a quantized checkpoint to GGUF (llama.cpp) or a transformers directory."""
    from qtoolkit.errors import ConfigError

    src = ckpt if ckpt.is_file() else ckpt / "ckpt.pt"
    if format_ not in ("gguf", "hf"):
        raise ConfigError(f"--format must be gguf or hf, got {format_!r}")
    if format_ == "hf" and type_ is not None:
        raise ConfigError("--type applies to --format gguf only")
    type_ = (type_ or "tq2_0").lower()
    path = out or (src.with_name(f"model-{type_}.gguf") if format_ == "gguf" else src.with_name("hf"))
    if format_ == "gguf" and path.exists():
        raise ConfigError(f"{path} already exists; choose another --out (nothing was overwritten)")
    _check_outputs(json_, [ckpt], ("--out", path if format_ == "gguf" else None, None))
    with _human_output(json_):
        with report.StageProgress(report.err_console) as progress:
            if format_ == "gguf":
                from qtoolkit.interop.gguf_export import export_gguf

                result = export_gguf(ckpt, path, type_, progress=progress)
                table = report.gguf_export_table(result)
            else:
                from qtoolkit.interop.hf_export import export_hf

                result = export_hf(ckpt, path, progress=progress)
                table = report.hf_export_table(result)
        written = _write_json(json_, result.to_dict())
        report.console.print(table)
        report.print_outputs([path, *written])


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # `python -m qtoolkit.cli`, which torchrun launches: `torchrun ... -m qtoolkit.cli train`
    main()
