"""GLUE tasks (MRPC, SST-2, CoLA): definitions, loading through `datasets`, and token encoding.

Sources (both through the `datasets` library, both giving the same `GlueSplit`):
  * the Hugging Face Hub's `nyu-mll/glue` (configs `mrpc`, `sst2`, `cola`), when reachable;
  * local GLUE-distribution TSVs (`--data-dir DIR`), read with `datasets`' csv builder. DIR is the
    GLUE root (`DIR/MRPC/train.tsv`, `DIR/SST-2/...`, `DIR/CoLA/...`, as `download_glue_data.py`
    lays them out) or one task's folder. Layouts:

        MRPC   train.tsv / dev.tsv   header `Quality  #1 ID  #2 ID  #1 String  #2 String` (UTF-8 BOM)
        SST-2  train.tsv / dev.tsv   header `sentence  label`
        CoLA   train.tsv / dev.tsv   no header: `source  label  original-label  sentence`

    Fields are tab-separated with no quoting (sentences hold bare `"`), every column is read as a
    string (no NA guessing: a sentence "null" stays "null"), then checked: a missing column, an
    empty split, an empty sentence or a label outside the task's set is one `DataError` naming the
    file, and the row for per-row problems.

Splits are "train" and "validation" (GLUE's dev split, where results are reported; the test
splits have no public labels).

Encoding (`encode_split`): a sentence is `tokens <|endoftext|>`; a pair is
`tokens(a) <|endoftext|> tokens(b) <|endoftext|>`: the end-of-text token, which every qtoolkit
tokenizer has, separates the two sentences, and the final one gives last-token pooling the same
token to read the summary from in every example. Inputs longer than `max_len` are truncated,
longest sentence first (a pair keeps both sentences as long as possible), and counted.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtoolkit.errors import DataError, UnknownNameError
from qtoolkit.training.data import EOS, _quiet_datasets, eos_id, hub_reachable

HUB_GLUE = "nyu-mll/glue"
SPLITS = ("train", "validation")
_LOCAL_FILES = {"train": "train.tsv", "validation": "dev.tsv"}


@dataclass(frozen=True)
class GlueTask:
    name: str  # "mrpc": the --task value and the Hub config
    title: str  # "MRPC"
    text_fields: tuple[str, ...]  # ("sentence1", "sentence2") or ("sentence",)
    label_names: tuple[str, ...]  # index = label value
    metrics: tuple[str, ...]  # qtoolkit.evaluate.metrics names; the first is the task's headline metric
    dirnames: tuple[str, ...]  # folder names of the task under a GLUE root
    header: bool  # local TSV has a header line
    columns: dict[str, str | int] = field(default_factory=dict)  # field -> header name (or column index)
    n_columns: int = 0  # headerless files: the exact number of columns
    default_epochs: int = 3
    default_max_train: int | None = None  # training examples used by default (None: all)

    @property
    def pair(self) -> bool:
        return len(self.text_fields) == 2


TASKS: dict[str, GlueTask] = {
    "mrpc": GlueTask(
        "mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
        ("MRPC", "mrpc"), header=True,
        columns={"label": "Quality", "sentence1": "#1 String", "sentence2": "#2 String"},
        default_epochs=2,  # pairs of news sentences average 84 tokens of the TinyStories BPE: the costliest task
    ),
    "sst2": GlueTask(
        "sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",),
        ("SST-2", "sst2", "SST2", "sst-2"), header=True, columns={"sentence": "sentence", "label": "label"},
        # 67k training phrases, many of them sub-phrases of one another: one pass over a 20k subset
        # keeps a seed of `small` near a minute on 2 CPU cores (--max-train 0 uses all of them)
        default_epochs=1, default_max_train=20_000,
    ),
    "cola": GlueTask(
        "cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("mcc",),
        ("CoLA", "cola"), header=False, columns={"label": 1, "sentence": 3}, n_columns=4, default_epochs=3,
    ),
}


def get_task(name: str) -> GlueTask:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise UnknownNameError(f"unknown GLUE task {name!r}; available: {', '.join(TASKS)}") from None


def parse_tasks(text: str) -> list[GlueTask]:
    """`mrpc`, `mrpc,cola` or `all` -> tasks in that order."""
    names = list(TASKS) if text.strip().lower() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UnknownNameError(f"no GLUE task given; available: {', '.join(TASKS)} or all")
    return [get_task(n) for n in dict.fromkeys(names)]


@dataclass
class GlueSplit:
    task: GlueTask
    split: str  # "train" | "validation"
    texts: list[tuple[str, ...]]  # one tuple of sentences per example
    labels: list[int]
    source: str  # where it came from, for reports

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------ local TSVs


def task_dir(task: GlueTask, data_dir: str | Path) -> Path:
    """The task's folder under a GLUE root, or `data_dir` itself when it holds the task's files."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such directory")
    for name in task.dirnames:
        if (root / name).is_dir():
            return root / name
    if (root / _LOCAL_FILES["train"]).is_file() and root.name.lower().replace("-", "") == task.name:
        return root
    raise DataError(f"--data-dir {root}: no {task.title} folder in it (looked for {', '.join(task.dirnames)}); "
                    "point it at the GLUE root that holds MRPC/, SST-2/ and CoLA/")


def _first_lines(path: Path) -> tuple[list[str], bool]:
    """(fields of the first line, whether a non-blank line follows it)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = f.readline()
            more = any(line.strip() for line in f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not first.strip():
        raise DataError(f"{path}: empty file (no {'header' if first == '' else 'first'} line)")
    return first.rstrip("\r\n").split("\t"), more


def _file_columns(task: GlueTask, split: str, path: Path) -> tuple[list[str], dict[str, str]]:
    """(names to read the file's columns under, field -> column name), checked against the layout."""
    first, more = _first_lines(path)
    if task.header and not more:
        raise DataError(f"{path}: the {split} split of {task.title} is empty (a header and no rows)")
    if task.header:
        missing = [f"{name!r}" for name in task.columns.values() if name not in first]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} for {task.title}; the header "
                            f"has {', '.join(repr(c) for c in first)}")
        if len(set(first)) != len(first):
            raise DataError(f"{path}: duplicate column names in the header {first}")
        return first, {f: str(c) for f, c in task.columns.items()}
    if len(first) != task.n_columns:
        raise DataError(f"{path}: expected {task.n_columns} tab-separated columns for {task.title} "
                        f"(source, label, original label, sentence; no header), found {len(first)} in line 1")
    names = [f"column{i}" for i in range(task.n_columns)]
    return names, {f: names[int(c)] for f, c in task.columns.items()}


def _read_tsv(task: GlueTask, split: str, path: Path) -> dict[str, list[Any]]:
    """The task's fields of a local TSV, as strings, through `datasets`' csv builder."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (a GLUE task folder holds train.tsv and dev.tsv)")
    names, fields = _file_columns(task, split, path)
    with _quiet_datasets() as datasets:
        features = datasets.Features({n: datasets.Value("string") for n in names})
        try:
            ds = datasets.load_dataset(
                "csv", data_files={"rows": str(path)}, split="rows", delimiter="\t", quoting=csv.QUOTE_NONE,
                header=0 if task.header else None, column_names=None if task.header else names,
                encoding="utf-8-sig", keep_default_na=False, na_filter=False, features=features,
            )
        except Exception as e:  # pandas' ParserError (a row with extra fields), decode errors, ...
            cause = e.__cause__ or e.__context__ or e
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
            raise DataError(f"{path}: cannot be read as a {task.title} TSV ({reason})") from None
    return {f: ds[column] for f, column in fields.items()}


# ------------------------------------------------------------------------------ the Hub


def _hub_error(task: GlueTask, reason: str) -> DataError:
    return DataError(
        f"cannot load {HUB_GLUE!r} ({task.name}) from the Hugging Face Hub ({reason}). "
        "Use local GLUE TSVs instead with --data-dir DIR (the folder holding MRPC/, SST-2/ and CoLA/, "
        "e.g. --data-dir ../shared/data/glue); set HF_HUB_OFFLINE=1 to use a copy already in the "
        "datasets cache."
    )


def _read_hub(task: GlueTask, split: str) -> dict[str, list[Any]]:
    if not hub_reachable():
        raise _hub_error(task, "the Hub is unreachable from this machine")
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(HUB_GLUE, task.name, split=split)
        except Exception as e:  # network, auth, or a missing dataset: all end here
            raise _hub_error(task, f"{type(e).__name__}: {e}") from None
    missing = [f for f in (*task.text_fields, "label") if f not in ds.column_names]
    if missing:
        raise DataError(f"{HUB_GLUE} ({task.name}, {split}): missing column(s) {', '.join(missing)}")
    return {f: ds[f] for f in (*task.text_fields, "label")}


# ------------------------------------------------------------------------------ loading


def _checked(task: GlueTask, split: str, rows: dict[str, list[Any]], where: str, first_row: int) -> GlueSplit:
    """Validate raw string/int columns into a GlueSplit; `first_row` numbers rows as in the file."""
    labels_raw = rows["label"]
    if not labels_raw:
        raise DataError(f"{where}: the {split} split of {task.title} is empty")
    allowed = {str(i): i for i in range(len(task.label_names))}
    labels = []
    for i, value in enumerate(labels_raw):
        label = allowed.get(str(value).strip()) if value is not None else None
        if label is None:
            raise DataError(f"{where}: row {i + first_row}: label {value!r} is not one of {task.title}'s labels "
                            f"({', '.join(f'{k} = {n}' for k, n in zip(allowed, task.label_names, strict=True))})")
        labels.append(label)
    columns = [rows[f] for f in task.text_fields]
    texts = []
    for i, sentences in enumerate(zip(*columns, strict=True)):
        for name, s in zip(task.text_fields, sentences, strict=True):
            if s is None or not s.strip():
                raise DataError(f"{where}: row {i + first_row}: empty {name}")
        texts.append(tuple(s.strip() for s in sentences))
    return GlueSplit(task, split, texts, labels, where)


def load_split(task: GlueTask | str, split: str, data_dir: str | Path | None = None) -> GlueSplit:
    """One labelled split of a task: from the local TSVs under `data_dir`, else from the Hub."""
    task = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if data_dir is None:
        return _checked(task, split, _read_hub(task, split), f"hub {HUB_GLUE}/{task.name} {split}", 0)
    path = task_dir(task, data_dir) / _LOCAL_FILES[split]
    # rows are numbered as lines of the file (1-based, the header is line 1)
    return _checked(task, split, _read_tsv(task, split, path), str(path), 2 if task.header else 1)


# ------------------------------------------------------------------------------ encoding


@dataclass
class EncodedSplit:
    """Token ids of a split, ready for batching; statistics for the report."""

    ids: list[list[int]]
    labels: list[int]
    max_len: int
    truncated: int  # examples longer than max_len before truncation

    def __len__(self) -> int:
        return len(self.labels)

    def stats(self) -> dict[str, Any]:
        lengths = [len(x) for x in self.ids]
        return {"examples": len(self), "truncated": self.truncated, "max_len": self.max_len,
                "mean_tokens": round(sum(lengths) / len(lengths), 1), "longest": max(lengths)}


def _fit(parts: list[list[int]], budget: int) -> list[list[int]]:
    """Trim the longest part one token at a time until the parts fit in `budget` tokens."""
    lengths = [len(p) for p in parts]
    while sum(lengths) > budget:
        longest = max(range(len(lengths)), key=lambda i: lengths[i])
        lengths[longest] -= 1
    return [p[:n] for p, n in zip(parts, lengths, strict=True)]


def encode_split(split: GlueSplit, tokenizer, max_len: int) -> EncodedSplit:
    """`a <eos>` or `a <eos> b <eos>` per example, truncated to `max_len` tokens (see module doc)."""
    n_sep = len(split.task.text_fields)
    if max_len < 2 * n_sep:
        raise DataError(f"max_len {max_len} is too short for {split.task.title} (needs at least {2 * n_sep})")
    eos = eos_id(tokenizer)
    columns = [tokenizer.encode_batch([t[j] for t in split.texts], add_special_tokens=False)
               for j in range(n_sep)]
    ids, truncated = [], 0
    for encodings in zip(*columns, strict=True):
        parts = [e.ids for e in encodings]
        if sum(len(p) for p in parts) + n_sep > max_len:
            truncated += 1
            parts = _fit(parts, max_len - n_sep)
        ids.append([t for p in parts for t in (*p, eos)])
    return EncodedSplit(ids, list(split.labels), max_len, truncated)


__all__ = ["EOS", "HUB_GLUE", "SPLITS", "TASKS", "EncodedSplit", "GlueSplit", "GlueTask", "encode_split",
           "get_task", "load_split", "parse_tasks", "task_dir"]
