from __future__ import annotations

import numpy as np
import pytest

from qtoolkit.errors import DataError
from qtoolkit.training import data as qdata
from qtoolkit.training.data import EOS, TokenStream, local_files, prepare_data, split_stories
from qtoolkit.training.recipe import DataConfig

from .conftest import write_corpus


def test_split_stories_on_eos_and_blank_lines():
    assert split_stories(f"one\ntwo\n{EOS}\nthree{EOS}four") == ["one\ntwo", "three", "four"]


def test_local_file_goes_through_datasets(tmp_path, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    f = tmp_path / "a.txt"
    f.write_text(f"Story one.\n{EOS}\nStory two\nsecond line.\n\nStory three.\n")
    src = qdata.local_source(DataConfig(path=str(f), val_fraction=0.5))
    stories = sorted(list(src.train()) + list(src.val()))
    assert stories == ["Story one.", "Story three.", "Story two\nsecond line."]
    assert calls and calls[0][0][0] == "text"


def test_directory_splits_by_file_name(tmp_path):
    for name in ("tinystories_train.txt", "tinystories_validation_head.txt", "x_val.txt", "test.txt", "more.txt"):
        (tmp_path / name).write_text("hello\n")
    splits = local_files(tmp_path)
    assert [p.name for p in splits["train"]] == ["more.txt", "tinystories_train.txt"]
    assert [p.name for p in splits["validation"]] == ["tinystories_validation_head.txt", "x_val.txt"]


def test_held_out_fraction_is_deterministic_and_disjoint(tmp_path):
    f = write_corpus(tmp_path / "all.txt", 400)
    cfg = DataConfig(path=str(f), val_fraction=0.1)
    a, b = qdata.local_source(cfg), qdata.local_source(cfg)
    val = list(a.val())
    assert val == list(b.val()) and 0 < len(val) < 100
    assert not set(val) & set(a.train())


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        local_files(tmp_path / "nope")
    with pytest.raises(DataError, match="no .txt files"):
        local_files(tmp_path)


def test_prepare_trains_tokenizer_and_caches_tokens(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOLKIT_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(path=str(corpus_dir))
    d1 = prepare_data(cfg, vocab_size=300)
    assert d1.tokenizer.get_vocab_size() == 300
    assert d1.tokenizer.token_to_id(EOS) is not None
    assert len(d1.train) > 1000 and len(d1.val) > 100
    assert isinstance(d1.train.tokens, np.memmap) and d1.train.tokens.dtype == np.uint16

    def boom(*a, **k):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(qdata, "train_tokenizer", boom)
    monkeypatch.setattr(type(d1.tokenizer), "encode_batch", boom, raising=False)
    d2 = prepare_data(cfg, vocab_size=300)  # cached tokenizer and token arrays
    assert np.array_equal(np.asarray(d1.train.tokens), np.asarray(d2.train.tokens))
    text = d2.tokenizer.decode(np.asarray(d2.val.tokens[:40]).tolist())
    assert "Once upon a time" in text


def test_cache_key_depends_on_content(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOLKIT_CACHE", str(tmp_path / "cache"))
    f = write_corpus(tmp_path / "c_train.txt", 300, seed=3)
    write_corpus(tmp_path / "c_val.txt", 50, seed=4)
    a = prepare_data(DataConfig(path=str(tmp_path)), vocab_size=300)
    write_corpus(f, 300, seed=5)
    b = prepare_data(DataConfig(path=str(tmp_path)), vocab_size=300)
    assert not np.array_equal(np.asarray(a.train.tokens[:500]), np.asarray(b.train.tokens[:500]))


def test_tokenizer_file_and_gpt2_vocab_dir(tmp_path, corpus_dir):
    tok = qdata.train_tokenizer(qdata.local_source(DataConfig(path=str(corpus_dir))).train(), 280)
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    loaded = qdata.load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode("Lily saw a cat").ids == tok.encode("Lily saw a cat").ids
    with pytest.raises(DataError, match="vocab_size"):
        qdata.get_tokenizer(DataConfig(tokenizer=str(tmp_path / "tokenizer.json")), None, 100)


def test_gpt2_vocab_and_merges(shared_tinystories):
    tok = qdata.load_tokenizer(shared_tinystories.parent / "tokenizers" / "gpt2")
    assert tok.get_vocab_size() == 50257
    assert tok.encode("Hello world").ids == [15496, 995]  # GPT-2's ids
    assert qdata.eos_id(tok) == 50256


def test_hub_unreachable_names_the_way_out(monkeypatch):
    monkeypatch.setattr(qdata, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="--data PATH") as e:
        prepare_data(DataConfig(), vocab_size=300)
    assert "roneneldan/TinyStories" in str(e.value) and "unreachable" in str(e.value)


def test_hub_source_streams_through_datasets(monkeypatch):
    """The Hub route itself, with `datasets` answering as the Hub would (no network here)."""
    import datasets

    monkeypatch.setattr(qdata, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name: ["train", "validation"])
    seen = []

    def fake_load(name, split=None, streaming=False):
        seen.append((name, split, streaming))
        return [{"text": f"{split} story {i}"} for i in range(3)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = qdata.hub_source(DataConfig())
    assert list(src.val()) == ["validation story 0", "validation story 1", "validation story 2"]
    assert seen == [("roneneldan/TinyStories", "validation", True)]
    assert src.streaming


def test_batches_are_a_pure_function_of_seed_and_step():
    s = TokenStream(np.arange(1000, dtype=np.uint16))
    x1, y1 = s.batch(7, 4, 16, seed=0)
    x2, y2 = s.batch(7, 4, 16, seed=0)
    x3, _ = s.batch(8, 4, 16, seed=0)
    assert x1.shape == (4, 16) and x1.dtype.is_floating_point is False
    assert (x1 == x2).all() and (y1 == y2).all() and not (x1 == x3).all()
    assert (y1 == x1 + 1).all()  # targets are the next tokens


def test_eval_windows_are_fixed_and_consecutive():
    s = TokenStream(np.arange(100, dtype=np.uint16), "validation")
    batches = list(s.eval_batches(batch_size=2, seq_len=10, max_batches=3))
    assert len(batches) == 3
    assert batches[0][0][1, 0] == 10 and batches[2][0][1, -1] == 59
    with pytest.raises(DataError, match="fewer than one sequence"):
        list(TokenStream(np.arange(5, dtype=np.uint16)).eval_batches(1, 10, 1))
