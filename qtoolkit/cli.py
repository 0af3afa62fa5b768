"""`qtool`: each command is a thin call into a library function, rendered by `qtoolkit.report`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from qtoolkit import quantizers, report
from qtoolkit.errors import QToolkitError
from qtoolkit.recipe import available_recipes, load_recipe

app = typer.Typer(
    name="qtool",
    help="Mixed-precision (ternary-first) quantization for transformer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Errors a user can cause and fix: reported without a traceback, exit status 1. Anything else is
# a bug and keeps its traceback.
USER_ERRORS = (QToolkitError, FileNotFoundError)


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except USER_ERRORS as e:
            report.error(str(e))
            raise typer.Exit(1) from None

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
    from qtoolkit.train import train as run_train

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
    """Validation loss and perplexity of a checkpoint."""
    from qtoolkit.train import evaluate_checkpoint

    result = evaluate_checkpoint(ckpt, data_path=data, batches=batches, device=device)
    report.console.print(report.eval_summary(result))


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


def main() -> None:  # pragma: no cover - console entry point
    app()
