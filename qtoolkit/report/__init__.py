"""The report layer: the only code that renders (rich terminal output, figures, documents).

Library modules return data or emit progress events; the CLI hands them to these functions.

    text        the consoles, `error`, and the number/spec formatters every renderer shares
    progress    live displays: training, staged library work, benchmarks, streamed generation
    tables      the tables and summaries printed after a command
    figures     matplotlib PNGs (analysis, search)
    documents   Markdown and one-file HTML reports
    glue        GLUE results (`qtool glue`): progress, table, Markdown

Everything is re-exported here, so callers write `report.train_summary(...)`.
"""

from qtoolkit.report.documents import analysis_html, analysis_markdown
from qtoolkit.report.figures import analysis_figure, save_analysis_plot, save_search_plot
from qtoolkit.report.glue import GlueProgress, glue_markdown, glue_table
from qtoolkit.report.progress import (
    BenchProgress,
    KernelBuildNotice,
    StageProgress,
    TrainProgress,
    stream_generation,
)
from qtoolkit.report.tables import (
    analysis_renderables,
    bench_table,
    compare_table,
    coverage_table,
    eval_summary,
    generation_summary,
    gguf_export_table,
    hf_export_table,
    import_summary,
    memory_summary,
    pack_summary,
    plan_table,
    probe_table,
    quantize_summary,
    quantizers_table,
    recipes_table,
    search_renderables,
    train_memory_table,
    train_summary,
)
from qtoolkit.report.text import (
    console,
    display_path,
    err_console,
    error,
    fmt_bytes,
    human_count,
    outputs_text,
    print_outputs,
    print_renderables,
    spec_text,
    stdout_to_stderr,
    warn,
)

__all__ = [
    "BenchProgress", "StageProgress", "TrainProgress", "analysis_figure", "analysis_html", "analysis_markdown",
    "KernelBuildNotice", "analysis_renderables", "bench_table", "compare_table", "console", "coverage_table",
    "display_path", "err_console", "error", "eval_summary", "memory_summary", "train_memory_table", "fmt_bytes", "generation_summary", "gguf_export_table",
    "hf_export_table", "human_count", "import_summary", "outputs_text", "pack_summary", "plan_table",
    "print_outputs", "print_renderables", "probe_table", "quantize_summary", "quantizers_table", "recipes_table", "save_analysis_plot",
    "save_search_plot", "search_renderables", "spec_text", "stdout_to_stderr", "stream_generation", "train_summary",
    "warn",
    "GlueProgress", "glue_markdown", "glue_table",
]
