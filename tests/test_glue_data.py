from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from qtoolkit.errors import DataError, UnknownNameError
from qtoolkit.evaluate import glue_data
from qtoolkit.evaluate.glue_data import TASKS, encode_split, get_task, load_split, parse_tasks

from .conftest import SHARED_DATA

GLUE = SHARED_DATA / "glue"
BOM = "\ufeff"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def write(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((BOM if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


# Row counts and label counts from shared/data/README.md (MRPC train lacks one canonical row).
EXPECTED = {
    ("mrpc", "train"): (3667, {1: 2473, 0: 1194}),
    ("mrpc", "validation"): (408, {1: 279, 0: 129}),
    ("sst2", "train"): (67349, {1: 37569, 0: 29780}),
    ("sst2", "validation"): (872, {1: 444, 0: 428}),
    ("cola", "train"): (8551, {1: 6023, 0: 2528}),
    ("cola", "validation"): (1043, {1: 721, 0: 322}),
}


@pytest.mark.parametrize("task, split", list(EXPECTED))
def test_shared_glue_tsvs_row_and_label_counts(task, split):
    if not GLUE.is_dir():
        pytest.skip(f"shared GLUE data not found at {GLUE}")
    s = load_split(task, split, GLUE)
    rows, labels = EXPECTED[(task, split)]
    assert len(s) == rows
    assert Counter(s.labels) == labels
    assert all(len(t) == len(TASKS[task].text_fields) and all(x.strip() for x in t) for t in s.texts)


def test_shared_files_keep_quotes_and_the_first_mrpc_pair():
    if not GLUE.is_dir():
        pytest.skip(f"shared GLUE data not found at {GLUE}")
    s = load_split("mrpc", "train", GLUE)
    assert s.labels[0] == 1
    assert s.texts[0][0].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert s.texts[0][1].startswith('Referring to him as only " the witness "')
    cola = load_split("cola", "validation", GLUE / "CoLA")  # a task folder works as --data-dir too
    assert cola.texts[0] == ("The sailors rode the breeze clear of the rocks.",)


def test_local_layouts_and_values_read_as_strings(tmp_path):
    write(tmp_path / "MRPC" / "train.tsv", [MRPC_HEADER, "1\t1\t2\tA cat sat .\tA cat was sitting .",
                                            '0\t3\t4\tHe said " no " .\tnull'], bom=True)
    write(tmp_path / "SST-2" / "train.tsv", ["sentence\tlabel", "NA\t1", "123\t0"])
    write(tmp_path / "CoLA" / "train.tsv", ["src\t1\t\tGood sentence.", "src\t0\t*\tSentence bad the."])
    m = load_split("mrpc", "train", tmp_path)
    assert m.texts == [("A cat sat .", "A cat was sitting ."), ('He said " no " .', "null")] and m.labels == [1, 0]
    s = load_split("sst2", "train", tmp_path)
    assert s.texts == [("NA",), ("123",)] and s.labels == [1, 0]  # no NA guessing, no number parsing
    c = load_split("cola", "train", tmp_path)
    assert c.texts == [("Good sentence.",), ("Sentence bad the.",)] and c.labels == [1, 0]


@pytest.mark.parametrize("name, lines, message", [
    ("missing column", ["Quality\t#1 ID\t#2 ID\t#1 String", "1\t1\t2\tA"], "missing column(s) '#2 String'"),
    ("empty split", [MRPC_HEADER], "the train split of MRPC is empty"),
    ("label outside the set", [MRPC_HEADER, "1\t1\t2\ta\tb", "2\t1\t2\ta\tb"], "row 3: label '2' is not one of"),
    ("empty sentence", [MRPC_HEADER, "1\t1\t2\t \tb"], "row 2: empty sentence1"),
    ("extra field", [MRPC_HEADER, "1\t1\t2\ta\tb", "1\t1\t2\ta\tb\tc"], "cannot be read as a MRPC TSV"),
])
def test_bad_files_are_one_clear_error(tmp_path, name, lines, message):
    path = write(tmp_path / "MRPC" / "train.tsv", lines)
    with pytest.raises(DataError) as e:
        load_split("mrpc", "train", tmp_path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_bad_headerless_and_missing_files(tmp_path):
    write(tmp_path / "CoLA" / "train.tsv", ["src\t1\tGood sentence."])
    with pytest.raises(DataError, match="expected 4 tab-separated columns"):
        load_split("cola", "train", tmp_path)
    write(tmp_path / "CoLA" / "dev.tsv", [])
    with pytest.raises(DataError, match="empty file"):
        load_split("cola", "validation", tmp_path)
    with pytest.raises(DataError, match="no SST-2 folder"):
        load_split("sst2", "train", tmp_path)
    with pytest.raises(DataError, match="no such directory"):
        load_split("sst2", "train", tmp_path / "nope")


def test_hub_unreachable_names_data_dir(monkeypatch):
    monkeypatch.setattr(glue_data, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match="Hub is unreachable.*--data-dir"):
        load_split("sst2", "train")


def test_task_names():
    assert [t.name for t in parse_tasks("all")] == ["mrpc", "sst2", "cola"]
    assert [t.name for t in parse_tasks("cola, MRPC,cola")] == ["cola", "mrpc"]
    with pytest.raises(UnknownNameError, match="unknown GLUE task 'qnli'; available: mrpc, sst2, cola"):
        get_task("qnli")


class CharTokenizer:
    """One id per character; id 0 is <|endoftext|>."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def token_to_id(self, token):
        return 0 if token == glue_data.EOS else None

    def encode_batch(self, texts, add_special_tokens=False):
        return [self._Enc([ord(c) for c in t]) for t in texts]


def test_encoding_separators_and_longest_first_truncation():
    task = get_task("mrpc")
    split = glue_data.GlueSplit(task, "train", [("ab", "cde"), ("abcdef", "xy"), ("abcd", "wxyz")], [1, 0, 1], "t")
    enc = encode_split(split, CharTokenizer(), max_len=8)
    a, b, c, d, e, f, w, x, y, z = (ord(ch) for ch in "abcdefwxyz")
    assert enc.ids[0] == [a, b, 0, c, d, e, 0]  # fits: a <eos> b <eos>
    assert enc.ids[1] == [a, b, c, d, 0, x, y, 0]  # the longer sentence gives up tokens first
    assert enc.ids[2] == [a, b, c, 0, w, x, y, 0]
    assert enc.truncated == 2 and enc.labels == [1, 0, 1]
    assert enc.stats() == {"examples": 3, "truncated": 2, "max_len": 8, "mean_tokens": 7.7, "longest": 8}
    single = glue_data.GlueSplit(get_task("sst2"), "train", [("abc",)], [0], "t")
    assert encode_split(single, CharTokenizer(), max_len=3).ids == [[a, b, 0]]
    with pytest.raises(DataError, match="too short"):
        encode_split(split, CharTokenizer(), max_len=3)
