"""Text data -> tokenizer -> cached token arrays -> deterministic batches.

Sources (both through the `datasets` library):
  * the Hugging Face Hub (default `roneneldan/TinyStories`, streamed; train/validation splits);
  * local text (`--data PATH`): a file, or a directory of `*.txt` files whose names assign them to
    splits (a name with a `val`/`valid`/`validation`/`dev` part -> validation, `test` -> ignored,
    anything else -> train). Files are read with the `text` builder paragraph by paragraph, and
    every paragraph is split on `<|endoftext|>`, so both TinyStories layouts work: stories between
    `<|endoftext|>` lines, or stories separated by blank lines.
With no validation split, a deterministic fraction of stories (chosen by a hash of the text, so
independent of order) is held out.

Tokenizer: a byte-level BPE trained on the training text with the model's vocab size (with
`<|endoftext|>` as its only special token), or a tokenizer file (`tokenizer.json`, or a directory
holding GPT-2 style `vocab.json` + `merges.txt`). Trained tokenizers are cached.

Token cache: each split is tokenized once into a flat uint16/uint32 array (stories joined by
`<|endoftext|>`) under `$QTOOLKIT_CACHE` (default ~/.cache/qtoolkit), keyed by the data's content
fingerprint, the split, the limits and the tokenizer, and memory-mapped on later runs.

Batches: training batch `step` is drawn from a generator seeded with (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would. Evaluation uses fixed consecutive windows.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
import socket
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from qtoolkit.checkpoint import atomic_write_text
from qtoolkit.errors import DataError
from qtoolkit.training.recipe import DataConfig

EOS = "<|endoftext|>"
TOKENIZER_TRAIN_CHARS = 64 * 2**20  # BPE is trained on at most this much text
_VAL_NAME = re.compile(r"(^|[^a-z])(val|valid|validation|dev)([^a-z]|$)")
_TEST_NAME = re.compile(r"(^|[^a-z])test([^a-z]|$)")

Progress = Callable[[str, int, int | None], None]  # (stage, done, total)
CALIBRATION_STEP = 10**9  # calibration windows are drawn like training steps no run reaches


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("QTOOLKIT_CACHE") or Path.home() / ".cache" / "qtoolkit")


@contextlib.contextmanager
def _quiet_datasets():
    """Library code never prints: silence `datasets`' own progress bars and logs."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()


# ------------------------------------------------------------------------------ sources


@dataclass
class TextSource:
    """Stories of one source, split into train/validation, with a content fingerprint."""

    description: str
    fingerprint: str
    train: Callable[[], Iterator[str]]
    val: Callable[[], Iterator[str]]
    streaming: bool = False


def split_stories(text: str) -> list[str]:
    return [s.strip() for s in text.split(EOS) if s.strip()]


def _held_out(story: str, fraction: float) -> bool:
    return zlib.crc32(story.encode()) % 1_000_000 < fraction * 1_000_000


def local_files(path: str | Path) -> dict[str, list[Path]]:
    """Assign text files to splits by name (see module docstring)."""
    path = Path(path)
    if path.is_file():
        return {"train": [path], "validation": []}
    if not path.is_dir():
        raise DataError(f"--data {path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"--data {path}: no .txt files in this directory")
    splits: dict[str, list[Path]] = {"train": [], "validation": []}
    for f in files:
        name = f.name.lower()
        if _VAL_NAME.search(name):
            splits["validation"].append(f)
        elif not _TEST_NAME.search(name):
            splits["train"].append(f)
    if not splits["train"]:
        raise DataError(f"--data {path}: no training files (every .txt file looks like val/test)")
    return splits


def _file_digest(paths: Iterable[Path], split: str = "") -> str:
    """Content fingerprint of text files, checking in the same single pass that each is UTF-8 text
    (binary or mis-encoded files are named here, not deep inside `datasets`) and that the split
    holds some text."""
    h = hashlib.sha256()
    paths = list(paths)
    has_text = False
    for p in paths:
        h.update(p.name.encode())
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        try:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    nul = chunk.find(b"\0")
                    if nul >= 0:
                        raise DataError(f"--data {p}: a binary file, not text (NUL byte at offset "
                                        f"{offset + nul}); remove it or pass only text files")
                    try:
                        text = decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        raise DataError(f"--data {p}: not UTF-8 text (byte 0x{chunk[e.start]:02x} at offset "
                                        f"{offset + e.start}); convert it to UTF-8") from None
                    has_text = has_text or bool(text.strip())
                    offset += len(chunk)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"--data {p}: not UTF-8 text (it ends inside a multi-byte character)") from None
    if paths and not has_text:
        names = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        raise DataError(f"--data: the {split or 'data'} files hold no text ({names} empty)")
    return h.hexdigest()[:16]


def _iter_local(files: list[Path]) -> Iterator[str]:
    """Stories of local text files, read through `datasets`' text builder."""
    if not files:
        return
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(
                "text", data_files=[str(f) for f in files], split="train", sample_by="paragraph"
            )
        except OSError:
            raise
        except Exception as e:  # datasets wraps every reading problem in its own 70-line errors
            cause = e.__cause__ or e
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
            names = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
            raise DataError(f"--data {files[0].parent}: cannot read {names} ({reason})") from None
    for row in ds:
        yield from split_stories(row["text"])


def local_source(cfg: DataConfig) -> TextSource:
    splits = local_files(cfg.path)
    train_files, val_files = splits["train"], splits["validation"]
    frac = cfg.val_fraction
    if val_files:
        train = lambda: _iter_local(train_files)  # noqa: E731
        val = lambda: _iter_local(val_files)  # noqa: E731
        held = ""
    else:
        train = lambda: (s for s in _iter_local(train_files) if not _held_out(s, frac))  # noqa: E731
        val = lambda: (s for s in _iter_local(train_files) if _held_out(s, frac))  # noqa: E731
        held = f", {frac:.0%} held out for validation"
    names = lambda fs: ", ".join(f.name for f in fs) or "-"  # noqa: E731
    return TextSource(
        description=f"local {cfg.path} (train: {names(train_files)}; validation: "
        f"{names(val_files) if val_files else 'none'}{held})",
        fingerprint=(f"local:{_file_digest(train_files, 'training')}:{_file_digest(val_files, 'validation')}:"
                     f"{frac if not val_files else ''}"),
        train=train,
        val=val,
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """A fast connectivity check, so an offline machine fails in seconds instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True  # offline mode: datasets serves from its local cache
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_error(name: str, reason: str) -> DataError:
    return DataError(
        f"cannot load {name!r} from the Hugging Face Hub ({reason}). "
        "Train on local text instead with --data PATH (a .txt file or a directory of them, "
        "e.g. --data ../shared/data/tinystories); set HF_HUB_OFFLINE=1 to use a copy already in "
        "the datasets cache."
    )


def hub_source(cfg: DataConfig) -> TextSource:
    name = cfg.dataset
    if not hub_reachable():
        raise _hub_error(name, "the Hub is unreachable from this machine")
    with _quiet_datasets() as datasets:
        try:
            available = datasets.get_dataset_split_names(name)
        except Exception as e:  # network, auth, or missing dataset: all end here
            raise _hub_error(name, f"{type(e).__name__}: {e}") from None

    def stream(split: str) -> Iterator[str]:
        with _quiet_datasets() as datasets:
            try:
                ds = datasets.load_dataset(name, split=split, streaming=True)
            except Exception as e:
                raise _hub_error(name, f"{type(e).__name__}: {e}") from None
        for row in ds:
            yield from split_stories(row[cfg.text_field])

    frac = cfg.val_fraction
    if cfg.train_split not in available:
        raise DataError(f"{name}: no split {cfg.train_split!r} (available: {', '.join(available)})")
    if cfg.val_split in available:
        train = lambda: stream(cfg.train_split)  # noqa: E731
        val = lambda: stream(cfg.val_split)  # noqa: E731
    else:
        train = lambda: (s for s in stream(cfg.train_split) if not _held_out(s, frac))  # noqa: E731
        val = lambda: (s for s in stream(cfg.train_split) if _held_out(s, frac))  # noqa: E731
    return TextSource(
        description=f"hub {name} ({cfg.train_split}/{cfg.val_split if cfg.val_split in available else 'held-out'})",
        fingerprint=f"hub:{name}:{cfg.train_split}:{cfg.val_split}:{cfg.text_field}:{frac}",
        train=train,
        val=val,
        streaming=True,
    )


def text_source(cfg: DataConfig) -> TextSource:
    return local_source(cfg) if cfg.path else hub_source(cfg)


# ------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE with `vocab_size` entries (256 byte symbols + <|endoftext|> + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise DataError(f"a byte-level BPE needs vocab_size >= 258, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path):
    """A `tokenizer.json`, or a directory with GPT-2 style vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    try:
        if path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        if path.is_file():
            tok = Tokenizer.from_file(str(path))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            raise DataError(f"tokenizer {path}: expected tokenizer.json or a dir with vocab.json + merges.txt")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"tokenizer {path}: cannot load: {e}") from None
    if tok.token_to_id(EOS) is None:
        tok.add_special_tokens([EOS])
    return tok


def tokenizer_from_json(text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def eos_id(tokenizer) -> int:
    i = tokenizer.token_to_id(EOS)
    if i is None:
        raise DataError(f"tokenizer has no {EOS} token")
    return i


def _take_chars(texts: Iterable[str], limit: int) -> Iterator[str]:
    n = 0
    for t in texts:
        yield t
        n += len(t)
        if n >= limit:
            return


def _cached_tokenizer(path: Path):
    """A cached tokenizer, or None when absent or damaged (then it is trained again)."""
    if not path.is_file():
        return None
    try:
        return tokenizer_from_json(path.read_text())
    except Exception:  # a truncated or damaged cache entry: the cache is rebuilt, never trusted
        return None


def get_tokenizer(cfg: DataConfig, source: TextSource, vocab_size: int, progress: Progress = _noop):
    """Load `cfg.tokenizer`, or train (and cache) a BPE on the training text."""
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        key = hashlib.sha256(f"{source.fingerprint}|bpe|{vocab_size}".encode()).hexdigest()[:20]
        path = cache_dir() / "tokenizers" / f"{key}.json"
        tok = _cached_tokenizer(path)
        if tok is None:
            progress("training tokenizer", 0, None)
            tok = train_tokenizer(_take_chars(source.train(), TOKENIZER_TRAIN_CHARS), vocab_size)
            atomic_write_text(path, tok.to_str())
            progress("training tokenizer", 1, 1)
    if tok.get_vocab_size() > vocab_size:
        raise DataError(
            f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is {vocab_size}; "
            f"pass --set model.vocab_size={tok.get_vocab_size()}"
        )
    return tok


# ------------------------------------------------------------------------------ token cache


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _remove_dead_temps(root: Path) -> None:
    """Token arrays being written are `<key>.<pid>.tmp`; those of processes that no longer run were
    left by a crash (the cache is shared by concurrent runs, so only dead writers' files go)."""
    for p in root.glob("*.tmp"):
        pid = p.suffixes[-2][1:] if len(p.suffixes) >= 2 else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except (PermissionError, OverflowError):
            pass  # alive (another user's) or not a pid


def tokenize_to_cache(
    texts: Iterable[str],
    tokenizer,
    key: str,
    max_tokens: int | None,
    stage: str,
    progress: Progress = _noop,
    batch: int = 1024,
) -> np.ndarray:
    """Tokenize stories (joined by EOS) into a memory-mapped array cached under `key`."""
    root = cache_dir() / "tokens"
    bin_path, meta_path = root / f"{key}.bin", root / f"{key}.json"
    dtype = _token_dtype(tokenizer.get_vocab_size())
    if meta_path.is_file() and bin_path.is_file():
        try:
            n_cached = int(json.loads(meta_path.read_text())["n_tokens"])
        except (ValueError, KeyError, TypeError):  # damaged cache metadata: tokenize again
            n_cached = 0
        if n_cached > 0 and bin_path.stat().st_size == n_cached * dtype.itemsize:
            return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_cached,))
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(root)
    eos = eos_id(tokenizer)
    tmp = bin_path.with_suffix(f".{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            pending: list[str] = []

            def flush() -> bool:
                nonlocal n
                ids = []
                for enc in tokenizer.encode_batch(pending, add_special_tokens=False):
                    ids.extend(enc.ids)
                    ids.append(eos)
                pending.clear()
                if max_tokens is not None:
                    ids = ids[: max_tokens - n]
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
                progress(stage, n, max_tokens)
                return max_tokens is not None and n >= max_tokens

            for text in texts:
                pending.append(text)
                if len(pending) >= batch and flush():
                    break
            else:
                if pending:
                    flush()
        if n == 0:
            raise DataError(f"{stage}: no text found")
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(meta_path, json.dumps({"n_tokens": n, "dtype": dtype.name, "key": key}))
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))


# ------------------------------------------------------------------------------ batches


@dataclass
class TokenStream:
    tokens: np.ndarray  # 1-D token ids
    name: str = "train"

    def __len__(self) -> int:
        return len(self.tokens)

    def require_window(self, seq_len: int) -> None:
        """DataError unless the split holds at least one window of `seq_len` + 1 tokens."""
        if len(self.tokens) < seq_len + 1:
            raise DataError(
                f"{self.name} split has {len(self.tokens)} tokens, fewer than one sequence "
                f"of {seq_len + 1}; use more text or a smaller train.seq_len"
            )

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows for training step `step`; a pure function of (seed, step)."""
        self.require_window(seq_len)
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.tokens) - seq_len, size=batch_size)
        chunk = np.stack([self.tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1], chunk[:, 1:]

    def eval_windows(self, batch_size: int, seq_len: int, max_batches: int | None) -> tuple[int, int]:
        """(batches, tokens scored) of `eval_batches` with the same arguments."""
        if max_batches is None:
            full = (len(self.tokens) - 1) // seq_len
            tail = len(self.tokens) - 1 - full * seq_len
            return -(-full // batch_size) + (tail > 0), len(self.tokens) - 1
        self.require_window(seq_len)
        n_windows = min(max_batches * batch_size, (len(self.tokens) - 1) // seq_len)
        return -(-n_windows // batch_size), n_windows * seq_len

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, consecutive, non-overlapping windows from the start of the split: the first
        `max_batches` batches of full windows, or with `max_batches=None` the whole split (the tokens
        after the last full window as one shorter sequence, so every token but the first is scored)."""
        if max_batches is None:
            if len(self.tokens) < 2:
                raise DataError(f"{self.name} split has {len(self.tokens)} tokens; nothing to evaluate")
            n_windows = (len(self.tokens) - 1) // seq_len
        else:
            self.require_window(seq_len)
            n_windows = min(max_batches * batch_size, (len(self.tokens) - 1) // seq_len)
        for b in range(0, n_windows, batch_size):
            starts = range(b * seq_len, min(b + batch_size, n_windows) * seq_len, seq_len)
            chunk = np.stack([self.tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
            chunk = torch.from_numpy(chunk)
            yield chunk[:, :-1], chunk[:, 1:]
        start = n_windows * seq_len
        if max_batches is None and start < len(self.tokens) - 1:
            chunk = torch.from_numpy(np.asarray(self.tokens[start:], dtype=np.int64)).unsqueeze(0)
            yield chunk[:, :-1], chunk[:, 1:]


def calibration_batches(train: TokenStream, n_tokens: int, seq_len: int, seed: int, batch_size: int = 8
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ceil(n_tokens / seq_len) seeded training windows, in batches of at most `batch_size`: the
    calibration data of probes, search and `qtool quantize`. They are drawn like training batch
    number 10^9 + i (a step no run reaches). The split must hold at least `n_tokens` tokens."""
    if n_tokens < 1:
        raise DataError(f"calibration needs at least 1 token, got --calib-tokens {n_tokens}")
    if len(train) < max(n_tokens, seq_len + 1):
        raise DataError(
            f"calibration data too short: the {train.name} split has {len(train):,} tokens, fewer than the "
            f"{max(n_tokens, seq_len + 1):,} asked for (--calib-tokens {n_tokens:,}, windows of {seq_len}); "
            "pass more text with --data or a smaller --calib-tokens"
        )
    n_seqs = max(1, -(-n_tokens // seq_len))
    return [train.batch(CALIBRATION_STEP + i, min(batch_size, n_seqs - start), seq_len, seed)
            for i, start in enumerate(range(0, n_seqs, batch_size))]


@dataclass
class PreparedData:
    tokenizer: Any
    train: TokenStream | None
    val: TokenStream
    description: str
    info: dict[str, Any] = field(default_factory=dict)


def evaluation_files(path: str | Path) -> list[Path]:
    """The text files a user names for evaluation: the file itself; in a directory its validation
    files (names as in `local_files`), or, if it has none, every .txt file that is not test data."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--data {path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"--data {path}: no .txt files in this directory")
    val = [f for f in files if _VAL_NAME.search(f.name.lower())]
    return val or [f for f in files if not _TEST_NAME.search(f.name.lower())] or files


def prepare_eval_data(path: str | Path, tokenizer, progress: Progress = _noop) -> PreparedData:
    """All the text of `evaluation_files(path)` as one token stream (cached like the splits): the
    data a user names with `qtool eval --data` is evaluated as it is, not split."""
    files = evaluation_files(path)
    fingerprint = f"eval:{_file_digest(files)}"
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    key = hashlib.sha256(f"{fingerprint}|{tok_hash}".encode()).hexdigest()[:24]
    tokens = tokenize_to_cache(_iter_local(files), tokenizer, key, None, "tokenizing", progress)
    description = f"local {path} ({', '.join(f.name for f in files)}; all of it)"
    return PreparedData(tokenizer, None, TokenStream(tokens, "evaluation"), description,
                        {"source": fingerprint, "val_tokens": len(tokens)})


def _cache_key(source: TextSource, split: str, tokenizer, limit: int | None) -> str:
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    return hashlib.sha256(f"{source.fingerprint}|{split}|{limit}|{tok_hash}".encode()).hexdigest()[:24]


def prepare_data(
    cfg: DataConfig,
    vocab_size: int,
    train_tokens_needed: int | None = None,
    tokenizer=None,
    need_train: bool = True,
    progress: Progress = _noop,
) -> PreparedData:
    """Load the source, get the tokenizer (trained unless given), and the cached token arrays."""
    source = text_source(cfg)
    if tokenizer is None:
        tokenizer = get_tokenizer(cfg, source, vocab_size, progress)
    train = None
    info: dict[str, Any] = {"source": source.fingerprint}
    if need_train:
        limit = cfg.max_train_tokens
        if limit is None and source.streaming and train_tokens_needed:
            limit = max(train_tokens_needed, 1_000_000)  # streamed: tokenize what the run consumes
        key = _cache_key(source, "train", tokenizer, limit)
        train = TokenStream(tokenize_to_cache(source.train(), tokenizer, key, limit, "tokenizing train", progress), "train")
        info["train_tokens"] = len(train)
    key = _cache_key(source, "validation", tokenizer, cfg.max_val_tokens)
    val = TokenStream(
        tokenize_to_cache(source.val(), tokenizer, key, cfg.max_val_tokens, "tokenizing validation", progress),
        "validation",
    )
    info["val_tokens"] = len(val)
    return PreparedData(tokenizer, train, val, source.description, info)
