"""`qtool`: each command is a thin call into a library function, rendered by `qtoolkit.report`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from qtoolkit import quantizers, report
from qtoolkit.errors import QToolkitError
from qtoolkit.training.recipe import available_recipes, load_recipe

app = typer.Typer(
    name="qtool",
    help="Mixed-precision (ternary-first) quantization for transformer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

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


@app.command()
@user_errors
def train(
    recipe: Annotated[str, typer.Option(help="Shipped recipe name (see `qtool recipes`) or a YAML path.")] = "ternary_all",
    model: Annotated[str | None, typer.Option(help="Model preset: tiny, small, ternarylm-132m.")] = None,
    data: Annotated[str | None, typer.Option(help="Local text file or directory (instead of the Hub dataset).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory [default: runs/<recipe>-<preset>].")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Total training steps (sets train.steps).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: KEY=VALUE (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/ckpt.pt.")] = False,
) -> None:
    """Quantization-aware training of a language model from a recipe."""
    from qtoolkit.training.trainer import train as run_train

    overrides = list(set_ or [])
    if model:
        overrides.append(f"model.preset={model}")
    if data:
        overrides.append(f"data.path={data}")
    if max_steps is not None:
        overrides.append(f"train.steps={max_steps}")
    r = load_recipe(recipe, overrides)
    out = out or Path("runs") / f"{r.name}-{r.preset}"
    try:
        with report.TrainProgress() as progress:
            result = run_train(r, out, resume=resume, callback=progress)
    except KeyboardInterrupt:
        report.error(f"interrupted; the last checkpoint in {out} is intact (resume with --resume)")
        raise typer.Exit(130) from None
    report.console.print(report.train_summary(result))
    if result.interrupted:
        raise typer.Exit(130)


@app.command("eval")
@user_errors
def eval_(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file (or a run directory holding ckpt.pt).")],
    data: Annotated[str | None, typer.Option(help="Local text to evaluate on (default: the checkpoint's data).")] = None,
    batches: Annotated[int | None, typer.Option(help="Number of validation batches.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Validation loss and perplexity of a training or packed checkpoint."""
    from qtoolkit.training.trainer import evaluate_checkpoint

    result = evaluate_checkpoint(ckpt, data_path=data, batches=batches, device=device)
    report.console.print(report.eval_summary(result))


@app.command()
@user_errors
def plan(
    recipe: Annotated[str, typer.Option(help="Recipe name or YAML path (its model and policy are used).")] = "ternary_all",
    model: Annotated[str | None, typer.Option(help="Model preset: tiny, small, ternarylm-132m.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: KEY=VALUE.")] = None,
    packing: Annotated[str | None, typer.Option(help="Ternary packing for every ternary layer: 2bit or base3.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")] = False,
    full: Annotated[bool, typer.Option(help="List every parameter (norms too) in the table.")] = False,
) -> None:
    """Exact stored bytes of a recipe's model, layer by layer, without training anything."""
    import json

    from qtoolkit.pack import memory_plan

    r = load_recipe(recipe, list(set_ or []) + ([f"model.preset={model}"] if model else []))
    p = memory_plan(r.model_config(), r.policy, _packing(packing))
    if json_:
        typer.echo(json.dumps({"recipe": r.name, "preset": r.preset, "packing": packing, **p.to_dict()}, indent=2))
    else:
        report.console.print(report.plan_table(p, f"{r.name} on {r.preset}", full=full))


def _packing(value: str | None) -> str | None:
    from qtoolkit.errors import ConfigError
    from qtoolkit.pack import PACKINGS

    if value is not None and value not in PACKINGS:
        raise ConfigError(f"--packing must be one of {', '.join(PACKINGS)}, got {value!r}")
    return value


@app.command()
@user_errors
def pack(
    ckpt: Annotated[Path, typer.Argument(help="Training checkpoint (or a run directory).")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output file [default: packed.safetensors beside CKPT].")] = None,
    packing: Annotated[str | None, typer.Option(help="Store ternary layers as 2bit or base3 (same codes).")] = None,
) -> None:
    """Write a deployment checkpoint whose bytes are the packed weights."""
    from qtoolkit.pack import pack_checkpoint

    src = ckpt if ckpt.is_file() else ckpt / "ckpt.pt"
    result = pack_checkpoint(ckpt, out or src.with_name("packed.safetensors"), _packing(packing))
    report.console.print(report.pack_summary(result))


@app.command()
@user_errors
def analyze(
    ckpt: Annotated[Path, typer.Argument(help="Training or packed checkpoint (or a run directory).")],
    full: Annotated[bool, typer.Option(help="Add the per-layer table.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON (schema: docs/analyze.md).")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the report as Markdown.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG figure: sparsity per block, alpha, bits per layer.")] = None,
    html: Annotated[Path | None, typer.Option(help="Write a one-file HTML report (tables + figure).")] = None,
    compare: Annotated[Path | None, typer.Option(help="A second checkpoint to set side by side.")] = None,
    as_: Annotated[str | None, typer.Option("--as", help="Analyse as if quantized: a quantizer spec (ternary, "
                                            "'{name: ternary, granularity: channel}') or a policy YAML file.")] = None,
    band: Annotated[float, typer.Option(help="Near-threshold band: | |W/alpha| - 0.5 | < band.")] = 0.05,
    middle: Annotated[str | None, typer.Option(help="Middle blocks as a range START:STOP [default: the paper's L5-L9 of 12, scaled].")] = None,
) -> None:
    """Per-layer sparsity and quantization report of a checkpoint."""
    import json

    from qtoolkit.checkpoint import atomic_write_text
    from qtoolkit.evaluate.analyze import analyze_checkpoint
    from qtoolkit.outputs import check_outputs
    from qtoolkit.yamlsafe import parse_yaml

    check_outputs([("--json", json_path, None), ("--markdown", markdown, None), ("--plot", plot, None),
                   ("--html", html, None)], [ckpt, compare, as_ if as_ and Path(as_).is_file() else None])
    as_policy = None
    if as_ is not None:
        as_policy = as_ if Path(as_).is_file() else parse_yaml(as_, "--as")
    a = analyze_checkpoint(ckpt, as_policy=as_policy, band=band, middle=_range(middle))
    b = analyze_checkpoint(compare, band=band, middle=_range(middle)) if compare else None
    for item in report.analysis_renderables(a, full=full):
        report.console.print(item)
    if b is not None:
        report.console.print(report.compare_table(a, b))
    if json_path:
        data = a.to_dict() | {"compare": b.to_dict() if b else None}
        atomic_write_text(json_path, json.dumps(data, indent=2))
    if markdown:
        atomic_write_text(markdown, report.analysis_markdown(a, b))
    if plot:
        report.save_analysis_plot(a, plot, b)
    if html:
        atomic_write_text(html, report.analysis_html(a, b))
    for label, path in (("json", json_path), ("markdown", markdown), ("plot", plot), ("html", html)):
        if path:
            report.console.print(f"wrote {label}: {path}", highlight=False)


def _range(text: str | None) -> tuple[int, int] | None:
    from qtoolkit.errors import ConfigError

    if text is None:
        return None
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--middle takes START:STOP block indices, e.g. 4:9; got {text!r}") from None
    return lo, hi


@app.command()
@user_errors
def probe(
    ckpt: Annotated[Path, typer.Argument(help="Training checkpoint (latent weights) or its run directory.")],
    data: Annotated[str | None, typer.Option(help="Local text for calibration (default: the checkpoint's data).")] = None,
    formats: Annotated[str, typer.Option(help="Candidate formats: ternary,int8,fp16 or a YAML list of specs.")] = "ternary,int8,fp16",
    units: Annotated[str, typer.Option(help="layer (each linear) or group (a block's attn / mlp).")] = "layer",
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens (fixed, seeded training windows).")] = 4096,
    seed: Annotated[int, typer.Option(help="Calibration seed.")] = 0,
    timeout: Annotated[float | None, typer.Option(help="Stop measuring after this many seconds (resumable).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the probe results as JSON.")] = None,
    full: Annotated[bool, typer.Option(help="Also show the one-pass estimates.")] = False,
) -> None:
    """Sparsity and sensitivity probes: loss increase per layer and format, and a one-pass estimate."""
    import json

    from qtoolkit.checkpoint import atomic_write_text
    from qtoolkit.outputs import check_outputs
    from qtoolkit.search.probes import parse_formats, run_probe

    check_outputs([("--json", json_path, None)], [ckpt, data])
    with report.StageProgress() as progress:
        result = run_probe(ckpt, parse_formats(formats), units, data, calib_tokens, seed, timeout, progress)
    report.console.print(report.probe_table(result, full=full))
    if json_path:
        atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2))
        report.console.print(f"wrote json: {json_path}", highlight=False)


@app.command()
@user_errors
def search(
    budget: Annotated[str, typer.Option(help="Packed bytes of the whole model: e.g. 400MB, 1.5GB, 64MiB.")],
    ckpt: Annotated[Path, typer.Option(help="Training checkpoint to allocate precision for.")],
    data: Annotated[str | None, typer.Option(help="Local text (default: the checkpoint's data).")] = None,
    formats: Annotated[str, typer.Option(help="Candidate formats: ternary,int8,fp16 or a YAML list of specs.")] = "ternary,int8,fp16",
    trials: Annotated[int, typer.Option(help="Completed trials to reach (over-budget ones do not count).")] = 30,
    timeout: Annotated[float | None, typer.Option(help="Wall-clock limit in seconds (probe included).")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL [default: sqlite:///OUT/search.db].")] = None,
    study: Annotated[str | None, typer.Option(help="Study name [default: derived from the arguments].")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("search_out"),
    units: Annotated[str, typer.Option(help="layer or group.")] = "layer",
    finetune_steps: Annotated[int, typer.Option(help="QAT steps per trial before evaluating.")] = 0,
    pareto: Annotated[bool, typer.Option(help="Bytes-vs-loss Pareto front over budgets up to --budget.")] = False,
    seed: Annotated[int, typer.Option(help="Sampler and calibration seed.")] = 0,
    calib_tokens: Annotated[int, typer.Option(help="Probe calibration tokens.")] = 4096,
    eval_batches: Annotated[int, typer.Option(help="Validation batches per trial.")] = 8,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG: trials and Pareto front, chosen formats per layer.")] = None,
) -> None:
    """Find a per-layer mixed-precision allocation that fits a memory budget."""
    from qtoolkit.outputs import check_outputs
    from qtoolkit.search.allocate import run_search
    from qtoolkit.search.probes import parse_formats

    check_outputs([("--plot", plot, None)], [ckpt, data])
    with report.StageProgress() as progress:
        result = run_search(ckpt, budget, parse_formats(formats), out, data, trials, timeout, storage, study, units,
                            finetune_steps, pareto, seed, calib_tokens, eval_batches, progress=progress)
    for item in report.search_renderables(result):
        report.console.print(item)
    if plot:
        report.save_search_plot(result, plot)
        report.console.print(f"wrote plot: {plot}", highlight=False)
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
@user_errors
def recipes() -> None:
    """List the shipped recipes."""
    rows = []
    for name in available_recipes():
        r = load_recipe(name)
        rows.append({"name": name, "preset": r.preset, "policy": r.policy, "description": r.description})
    report.console.print(report.recipes_table(rows))


@app.command("quantizers")
def list_quantizers() -> None:
    """List the registered quantizers and their default options."""
    rows = []
    for name in quantizers.available():
        q = quantizers.build(name)
        opts = ", ".join(f"{k}={v}" for k, v in q.spec().items() if k != "name") or "-"
        rows.append({"name": name, "options": opts, "bits": f"{float(q.bits_per_weight((768, 768))):.4f}"})
    report.console.print(report.quantizers_table(rows))


@app.command()
@user_errors
def generate(
    ckpt: Annotated[Path, typer.Argument(help="Packed checkpoint (or a training checkpoint / run directory).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample among the K most likely tokens (0 = all).")] = 40,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same text.")] = 0,
    kernels: Annotated[str | None, typer.Option(help="auto, reference, avx2 or avx512-vnni [default: $QTOOLKIT_KERNELS or auto].")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
) -> None:
    """Generate text from a packed checkpoint with the fast inference runtime, streaming tokens."""
    from qtoolkit.deploy.runtime import GenerationStats, generate_text, load_inference_model

    model = load_inference_model(ckpt, kernels=kernels, device=device)
    stats = GenerationStats()
    pieces = generate_text(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k or None, seed=seed, stats=stats)
    report.stream_generation(prompt, pieces)
    report.err_console.print(report.generation_summary(stats, model.backend), soft_wrap=True)


@app.command()
@user_errors
def bench(
    ckpt: Annotated[Path, typer.Argument(help="Packed checkpoint (or a training checkpoint / run directory).")],
    baselines: Annotated[str, typer.Option(help="Comma-separated: fp32, int8-dynamic ('' for none).")] = "fp32,int8-dynamic",
    threads: Annotated[int | None, typer.Option(help="CPU threads [default: torch's default].")] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens for the prefill measurement.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Decode steps per round.")] = 64,
    repeats: Annotated[int, typer.Option(help="Measured rounds (after one warm-up); the median is reported.")] = 3,
    kernels: Annotated[str | None, typer.Option(help="Kernel path of the packed model: auto, reference, avx2, avx512-vnni.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON.")] = None,
) -> None:
    """Prefill/decode speed, weight bytes and peak memory: packed vs FP32 and dynamic-INT8 PyTorch."""
    import json

    from qtoolkit.checkpoint import atomic_write_text
    from qtoolkit.deploy.bench import parse_baselines, run_bench
    from qtoolkit.outputs import check_outputs

    check_outputs([("--json", json_path, None)], [ckpt])
    names = parse_baselines(baselines)
    with report.BenchProgress() as progress:
        result = run_bench(ckpt, names, threads=threads, prompt_len=prompt_len, new_tokens=new_tokens,
                           repeats=repeats, kernels=kernels, progress=progress)
    report.console.print(report.bench_table(result))
    if json_path:
        atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2))
        report.console.print(f"wrote json: {json_path}", highlight=False)


@app.command()
@user_errors
def glue(
    ckpt: Annotated[Path, typer.Argument(help="Training or packed checkpoint (or a run directory).")],
    task: Annotated[str, typer.Option(help="mrpc, sst2, cola, a comma list, or all.")] = "all",
    data_dir: Annotated[Path | None, typer.Option(help="Local GLUE TSVs: the folder holding MRPC/, SST-2/, CoLA/ "
                                                  "[default: the Hub's nyu-mll/glue].")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training split [default: MRPC 2, SST-2 1, CoLA 3].")] = None,
    lr: Annotated[float, typer.Option(help="Backbone peak learning rate.")] = 3e-4,
    head_lr: Annotated[float, typer.Option(help="Classification head peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 32,
    max_len: Annotated[int, typer.Option(help="Tokens per example; longer ones are truncated and counted.")] = 128,
    max_train: Annotated[int | None, typer.Option(help="Use at most N training examples per task (one seeded subset); "
                                                  "0 = all [default: SST-2 20,000 of 67,349; MRPC, CoLA all].")] = None,
    pooling: Annotated[str, typer.Option(help="last (the closing token's state) or mean (over real tokens).")] = "last",
    policy: Annotated[str | None, typer.Option(help="Finetune under this policy: a policy YAML, a recipe name, or a "
                                               "quantizer spec [default: the checkpoint's own].")] = None,
    freeze: Annotated[bool, typer.Option(help="Train the head only (a linear probe).")] = False,
    seeds: Annotated[int, typer.Option(help="Number of seeds (runs) per task.")] = 3,
    seed: Annotated[int, typer.Option(help="First seed; runs use SEED, SEED+1, ...")] = 0,
    compare: Annotated[Path | None, typer.Option(help="A second checkpoint to run the same protocol on.")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder for glue.json and glue.md.")] = Path("glue_out"),
    json_path: Annotated[str | None, typer.Option("--json", metavar="[PATH|-]",
                                                  help="Also write the JSON here ('-' = stdout).")] = None,
    save_models: Annotated[bool, typer.Option(help="Also save every finetuned classifier in OUT as a training "
                                              "checkpoint (qtool pack/eval work on it).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Finetune on GLUE tasks (MRPC, SST-2, CoLA) and report dev metrics beside the majority baseline."""
    import json

    from qtoolkit.checkpoint import atomic_write_text
    from qtoolkit.errors import ConfigError
    from qtoolkit.evaluate.glue import GlueConfig, run_glue

    config = GlueConfig(tasks=task, data_dir=str(data_dir) if data_dir else None, epochs=epochs, lr=lr,
                        head_lr=head_lr, batch_size=batch_size, max_len=max_len, max_train=max_train,
                        pooling=pooling, freeze=freeze, policy=policy, seeds=seeds, seed=seed, device=device)
    outputs = {"json": out / "glue.json", "markdown": out / "glue.md"}
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing:
        raise ConfigError(f"--out {out} already holds {', '.join(existing)}; choose another --out or move them away")
    shown = report.err_console if json_path == "-" else report.console  # stdout carries only the JSON then
    with report.GlueProgress(shown) as progress:
        result = run_glue(ckpt, config, compare=compare, save_dir=out if save_models else None, callback=progress)
    shown.print(report.glue_table(result))
    data = json.dumps(result.to_dict(), indent=2)
    atomic_write_text(outputs["json"], data)
    atomic_write_text(outputs["markdown"], report.glue_markdown(result))
    if json_path == "-":
        typer.echo(data)
    elif json_path:
        atomic_write_text(json_path, data)
    for label, path in (*outputs.items(), ("json", json_path if json_path not in (None, "-") else None)):
        if path:
            shown.print(f"wrote {label}: {path}", highlight=False)


@app.command("import")
@user_errors
def import_(
    hf_dir: Annotated[Path, typer.Argument(help="Local Hugging Face model directory (config.json, safetensors, tokenizer.json).")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output run directory; default: runs/import-<HF_DIR name>.")] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write the result as JSON to PATH ('-': stdout).")] = None,
) -> None:
    """Import a Hugging Face Llama-architecture model as a qtoolkit training checkpoint (OUT/ckpt.pt)."""
    from qtoolkit.interop.hf_import import import_hf

    out = out or Path("runs") / f"import-{hf_dir.resolve().name}"
    with report.StageProgress(report.err_console) as progress:
        result = import_hf(hf_dir, out, progress)
    _print_result(report.import_summary(result), result.to_dict(), json_path)


@app.command()
@user_errors
def export(
    ckpt: Annotated[Path, typer.Argument(help="Training or packed checkpoint (or a run directory).")],
    format_: Annotated[str, typer.Option("--format", help="gguf (llama.cpp) or hf (transformers directory).")] = "gguf",
    type_: Annotated[str | None, typer.Option("--type", help="GGUF type of the ternary layers: tq2_0, tq1_0, q8_0 or "
                                              "f16 (gguf only; default tq2_0; see docs/interop.md).")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output file (gguf) or directory (hf); default: "
                                             "model-<type>.gguf or hf/ beside CKPT.")] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write the result as JSON to PATH ('-': stdout).")] = None,
) -> None:
    """Export a quantized checkpoint to GGUF (llama.cpp) or a transformers directory."""
    from qtoolkit.errors import ConfigError

    src = ckpt if ckpt.is_file() else ckpt / "ckpt.pt"
    with report.StageProgress(report.err_console) as progress:
        if format_ == "gguf":
            from qtoolkit.interop.gguf_export import export_gguf

            type_ = (type_ or "tq2_0").lower()
            path = out or src.with_name(f"model-{type_}.gguf")
            if path.exists():
                raise ConfigError(f"{path} already exists; choose another --out (nothing was overwritten)")
            result = export_gguf(ckpt, path, type_, progress=progress)
            table = report.gguf_export_table(result)
        elif format_ == "hf":
            from qtoolkit.interop.hf_export import export_hf

            if type_ is not None:
                raise ConfigError("--type applies to --format gguf only")
            result = export_hf(ckpt, out or src.with_name("hf"), progress=progress)
            table = report.hf_export_table(result)
        else:
            raise ConfigError(f"--format must be gguf or hf, got {format_!r}")
    _print_result(table, result.to_dict(), json_path)


def _print_result(renderable, data: dict, json_path: str | None) -> None:
    """The table (to stderr when the JSON goes to stdout), and the JSON when asked."""
    import json

    from qtoolkit.checkpoint import atomic_write_text

    if json_path == "-":
        report.err_console.print(renderable)
        typer.echo(json.dumps(data, indent=2))
        return
    report.console.print(renderable)
    if json_path:
        atomic_write_text(json_path, json.dumps(data, indent=2))
        report.console.print(f"wrote json: {json_path}", highlight=False)


def main() -> None:  # pragma: no cover - console entry point
    app()
