"""qtoolkit's runtime beside llama.cpp on the same checkpoint: speed (GGUF TQ2_0 / TQ1_0 / Q8_0) and perplexity.

    flock /work/heavy.lock python benchmarks/llamacpp.py --llama-bench PATH [--ckpt CKPT] [--ppl-ckpt CKPT]
        [--types tq2_0,tq1_0,q8_0] [--rounds 5] [--threads 2] [--prompt-len 128] [--new-tokens 64]
        [--text FILE] [--ctx 256] [--chunks 40] [--out-dir DIR] [--before SRC_TREE] [--json PATH]

Needs a llama.cpp build (`--llama-bench` = the llama-bench binary or its directory; llama-perplexity is
taken from beside it). Without one it prints {"skipped": ...} and exits 0. Build llama.cpp's CPU tools
once with `../shared/tools/build-llama-cpp.sh DEST` (~10 min on 2 cores; see docs/interop.md).

Speed. One checkpoint (default: a randomly initialised `ternary_all` ternarylm-132m with a BPE trained
on the TinyStories text, built once into --out-dir; speed does not depend on the weights' values) is
exported to each GGUF type and packed (2-bit). Each round measures, in an order that rotates from
round to round (so slow drifts of a shared machine hit every engine alike):

    llama.cpp <TYPE>   llama-bench -t THREADS -r 1: prefill = pp PROMPT_LEN; decode = tg NEW_TOKENS at
                       depth PROMPT_LEN (generation after a prompt of that length)
    qtoolkit packed    `qtool bench`'s measurement (qtoolkit.deploy.bench.run_bench, own process, one
                       warm-up + one measured round): prefill of PROMPT_LEN tokens, then NEW_TOKENS
                       decode steps

and the JSON gives min / median / max over the rounds per engine and format, and median ratios.

Perplexity, on the same text and the same tokens. A trained checkpoint (--ppl-ckpt) is exported to each
type; llama-perplexity scores the text (chunks of CTX tokens, the second half of each chunk, no BOS),
and its token ids are read back from its --kl-divergence-base file so that qtoolkit's runtime
(`load_inference_model`, the packed model with its kernels) scores exactly those tokens by exactly
that protocol. `qtool eval` of the checkpoint (its own protocol: stories separated by <|endoftext|>,
windows of the recipe's seq_len, every position) is reported beside, as users would run it.

The JSON is meant for reuse (e.g. kernel work): `speed[engine]` holds per-round values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "tinystories"
TYPES = ("tq2_0", "tq1_0", "q8_0")


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "rounds": values}


# ------------------------------------------------------------------------------ checkpoints


def random_132m(out_dir: Path, text: Path) -> Path:
    """A randomly initialised ternary_all ternarylm-132m training checkpoint with a 30522-token BPE."""
    from qtoolkit.checkpoint import save_checkpoint
    from qtoolkit.policy import build_model
    from qtoolkit.training.data import train_tokenizer
    from qtoolkit.training.recipe import load_recipe

    path = out_dir / "random-ternarylm-132m-ternary_all.pt"
    if path.is_file():
        return path
    r = load_recipe("ternary_all", ["model.preset=ternarylm-132m"]).resolved()
    cfg = r.model_config()
    stories = [s for s in text.read_text().split("<|endoftext|>") if s.strip()]
    tok = train_tokenizer(stories, cfg.vocab_size)
    torch.manual_seed(0)
    model, coverage = build_model(cfg, r.policy)
    save_checkpoint({"kind": "train", "model_config": cfg.to_dict(), "recipe": r.to_dict(), "policy": r.policy,
                     "coverage": coverage.to_dict(), "tokenizer": tok.to_str(), "model": model.state_dict(),
                     "step": 0}, path)
    return path


def export_all(ckpt: Path, types: list[str], out_dir: Path, tag: str) -> tuple[dict, Path]:
    """GGUF files of every type and the 2-bit packed checkpoint; their bytes and fallbacks."""
    from qtoolkit.interop.gguf_export import export_gguf
    from qtoolkit.pack import pack_checkpoint

    files = {}
    for t in types:
        path = out_dir / f"{tag}-{t}.gguf"
        path.unlink(missing_ok=True)
        r = export_gguf(ckpt, path, t)
        files[t.upper()] = {"path": str(path), "file_bytes": r.file_bytes, "types": r.types(),
                            "fallbacks": [f"{x.name} -> {x.ggml_type}" for x in r.fallbacks],
                            "max_scale_rel_err": r.to_dict()["max_scale_rel_err"]}
    packed = out_dir / f"{tag}-packed-2bit.safetensors"
    p = pack_checkpoint(ckpt, packed, "2bit", overwrite=True)  # the benchmark's own file, rebuilt each run
    files["qtoolkit packed 2bit"] = {"path": str(packed), "file_bytes": p.file_bytes, "tensor_bytes": p.tensor_bytes}
    return files, packed


# ------------------------------------------------------------------------------ speed


NO_REPACK: set[str] = set()  # models llama-bench crashed on with its CPU weight repacking (then run without)


def llama_bench(binary: Path, model: str, threads: int, args: list[str]) -> tuple[float, str]:
    """tokens/s of one llama-bench test. Some builds crash (SIGSEGV) in the repacked Q8_0 GEMM on some
    shapes, whoever wrote the file (llama-quantize's own Q8_0 too); such a model is rerun with
    --repack 0 and listed in the JSON."""
    cmd = [str(binary), "-m", model, "-t", str(threads), "-r", "1", "-o", "json", *args]
    run = subprocess.run(cmd + (["--repack", "0"] if model in NO_REPACK else []), capture_output=True, text=True)
    if run.returncode < 0 and model not in NO_REPACK:
        NO_REPACK.add(model)
        return llama_bench(binary, model, threads, args)
    if run.returncode:
        raise RuntimeError(f"llama-bench failed ({run.returncode}): {run.stderr[-2000:]}")
    rec = json.loads(run.stdout)[0]
    return float(rec["samples_ts"][0]), rec.get("build_commit", "?")


def bench_other_source(src: Path, packed: Path, threads: int, P: int, N: int) -> tuple[float, float]:
    """`qtool bench`'s measurement of the packed file by another qtoolkit source tree (e.g. an older
    commit's `git archive`), in its own process: (prefill, decode) tokens/s."""
    code = ("import json, sys; from qtoolkit.deploy.bench import run_bench; "
            f"r = run_bench({str(packed)!r}, (), threads={threads}, prompt_len={P}, new_tokens={N}, repeats=1).results[0]; "
            "print(json.dumps([r.prefill_tok_s, r.decode_tok_s]))")
    env = {**os.environ, "PYTHONPATH": str(src)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(src))
    if run.returncode:
        raise RuntimeError(f"qtoolkit from {src} failed: {run.stderr[-2000:]}")
    pre, dec = json.loads(run.stdout.strip().splitlines()[-1])
    return pre, dec


def measure_speed(bench: Path, files: dict, packed: Path, rounds: int, threads: int, P: int, N: int,
                  before: Path | None = None) -> tuple[dict, str]:
    from qtoolkit.deploy.bench import run_bench

    engines = [f"llama.cpp {t}" for t in files if t.startswith("T") or t == "Q8_0"] + ["qtoolkit packed"]
    if before:
        engines.append("qtoolkit packed (before)")
    results = {e: {"prefill_tok_s": [], "decode_tok_s": []} for e in engines}
    build = "?"
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for engine in order:
            if engine == "qtoolkit packed (before)":
                pre, dec = bench_other_source(before, packed, threads, P, N)
            elif engine == "qtoolkit packed":
                res = run_bench(packed, (), threads=threads, prompt_len=P, new_tokens=N, repeats=1).results[0]
                pre, dec = res.prefill_tok_s, res.decode_tok_s
            else:
                model = files[engine.split()[-1]]["path"]
                pre, build = llama_bench(bench, model, threads, ["-p", str(P), "-n", "0"])
                dec, _ = llama_bench(bench, model, threads, ["-p", "0", "-n", str(N), "-d", str(P)])
            results[engine]["prefill_tok_s"].append(pre)
            results[engine]["decode_tok_s"].append(dec)
            print(f"round {r + 1}/{rounds} {engine}: prefill {pre:,.0f} decode {dec:,.1f} tok/s", file=sys.stderr)
    return {e: {k: stats(v) for k, v in d.items()} for e, d in results.items()}, build


# ------------------------------------------------------------------------------ perplexity


def plain_text(src: Path, out: Path, max_chars: int) -> Path:
    """The stories of `src` joined by blank lines (llama-perplexity reads `<|endoftext|>` as plain text)."""
    stories = [s.strip() for s in src.read_text()[: max_chars].split("<|endoftext|>") if s.strip()]
    out.write_text("\n\n".join(stories) + "\n")
    return out


def read_logits_file(path: Path, ctx: int) -> tuple[list[int], float | None]:
    """(token ids, PPL) from a llama-perplexity --kl-divergence-base file: "_logits_", n_ctx, n_vocab,
    n_chunk (int32), the n_chunk * n_ctx token ids (int32), then per chunk and scored position
    nv = 2 * ((n_vocab + 1) // 2) + 4 uint16: float32 scale and min log-prob, then each token's
    log-prob quantized as min + scale * q (16 bits over at most 16 nats: within 1.3e-4 nats). The PPL
    is None when the file stops short."""
    import numpy as np

    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack("<iii", raw[8:20])
    assert n_ctx == ctx, (n_ctx, ctx)
    tokens = np.frombuffer(raw, dtype=np.int32, count=n_chunk * n_ctx, offset=20)
    nv, first = 2 * ((n_vocab + 1) // 2) + 4, n_ctx // 2
    rows = n_chunk * (n_ctx - 1 - first)
    body = np.frombuffer(raw, dtype=np.uint16, offset=20 + 4 * n_chunk * n_ctx)
    if body.size < rows * nv:
        return tokens.tolist(), None
    body = body[: rows * nv].reshape(n_chunk, n_ctx - 1 - first, nv)
    head = body[..., :4].copy().view(np.float32)  # (chunks, positions, 2): scale, min log-prob
    targets = tokens.reshape(n_chunk, n_ctx)[:, first + 1:]
    q = np.take_along_axis(body[..., 4:], targets[..., None].astype(np.int64), axis=-1)[..., 0]
    logp = head[..., 1].astype(np.float64) + head[..., 0].astype(np.float64) * q
    return tokens.tolist(), float(np.exp(-logp.mean()))


def llama_perplexity(binary: Path, model: str, text: Path, ctx: int, chunks: int, threads: int,
                     logits_file: Path) -> dict:
    """llama-perplexity on `text`: its printed PPL, the PPL recomputed from its logits file, and the
    token ids it scored. Some runs end before the log is flushed (or crash on exit, after the logits
    file is complete); the file is what counts. A run that crashed is retried once without weight
    repacking (see `llama_bench`)."""
    for _attempt in range(2):
        logits_file.unlink(missing_ok=True)
        log = logits_file.with_suffix(".log")
        no_repack = ["--no-repack"] if model in NO_REPACK else []
        with open(log, "w") as f:
            run = subprocess.run([str(binary), "-m", model, "-f", str(text), "-c", str(ctx), "-b", str(ctx), "-t",
                                  str(threads), "--chunks", str(chunks), "--kl-divergence-base", str(logits_file),
                                  *no_repack], stdout=f, stderr=subprocess.STDOUT)
        if run.returncode < 0:
            NO_REPACK.add(model)
        output = log.read_text()
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
        if logits_file.is_file():
            tokens, ppl = read_logits_file(logits_file, ctx)
            if ppl is not None:
                logits_file.unlink()
                return {"ppl": ppl, "printed_ppl": float(m.group(1)) if m else None, "returncode": run.returncode,
                        "tokens": tokens}
    raise RuntimeError(f"llama-perplexity failed ({run.returncode}): {output[-2000:]}")


def runtime(packed: Path, fp16_scales: bool = False):
    """qtoolkit's inference model of a packed checkpoint; with `fp16_scales` every ternary/int8 scale is
    first rounded to fp16, as the GGUF blocks store it (isolates that rounding from llama.cpp's kernels)."""
    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.deploy.runtime import InferenceModel

    ckpt = load_checkpoint(packed)
    if fp16_scales:
        for layer in ckpt["layers"]:
            if layer["spec"]["name"] in ("ternary", "int8") and "scales" in layer["tensors"]:
                key = layer["tensors"]["scales"]
                ckpt["tensors"][key] = ckpt["tensors"][key].half().float()
    return InferenceModel.from_packed(ckpt)


@torch.no_grad()
def qtoolkit_perplexity(packed: Path, tokens: list[int], ctx: int) -> dict:
    """llama-perplexity's protocol on qtoolkit's runtime (the packed model with its kernels): per chunk
    of ctx tokens, the mean NLL of tokens first+1 .. ctx-1 (first = ctx/2) given the chunk before
    them; the same with the scales rounded to fp16, and how far that moves the logits."""
    models = {"ppl": runtime(packed), "ppl_fp16_scales": runtime(packed, fp16_scales=True)}
    first = ctx // 2
    nll = dict.fromkeys(models, 0.0)
    count, max_diff, sum_diff, n_diff, scale = 0, 0.0, 0.0, 0, 0.0
    for c in range(len(tokens) // ctx):
        ids = torch.tensor([tokens[c * ctx:(c + 1) * ctx]])
        targets = ids[0, first + 1:, None]
        logits = {}
        for key, model in models.items():
            logits[key] = model(ids)[0]
            logp = torch.log_softmax(logits[key].double(), dim=-1)
            nll[key] -= float(logp[first:ctx - 1].gather(1, targets).sum())
        diff = (logits["ppl"] - logits["ppl_fp16_scales"]).abs()
        max_diff, sum_diff, n_diff = max(max_diff, float(diff.max())), sum_diff + float(diff.sum()), n_diff + diff.numel()
        scale = max(scale, float(logits["ppl"].abs().max()))
        count += ctx - 1 - first
    out = {k: float(torch.exp(torch.tensor(v / count))) for k, v in nll.items()}
    out["fp16_scales_logit_diff"] = {"max": max_diff, "mean": sum_diff / n_diff, "max_abs_logit": scale}
    return out


def measure_perplexity(args, perplexity_bin: Path, out_dir: Path) -> dict:
    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.training.data import tokenizer_from_json
    from qtoolkit.training.trainer import evaluate_checkpoint

    files, packed = export_all(args.ppl_ckpt, args.types, out_dir, "ppl")
    text = plain_text(args.text, out_dir / "ppl-text.txt", args.max_chars)
    out = {"checkpoint": str(args.ppl_ckpt), "text": str(args.text), "ctx": args.ctx, "files": files}
    tokens = None
    for t in args.types:
        t0 = time.perf_counter()
        res = llama_perplexity(perplexity_bin, files[t.upper()]["path"], text, args.ctx, args.chunks,
                               args.threads, out_dir / "logits.bin")
        toks = res.pop("tokens")
        out[f"llama.cpp {t.upper()}"] = {**res, "seconds": time.perf_counter() - t0}
        assert tokens is None or toks == tokens  # one tokenizer in every file
        tokens = toks
    t0 = time.perf_counter()
    out["qtoolkit packed"] = {**qtoolkit_perplexity(packed, tokens, args.ctx), "seconds": time.perf_counter() - t0}
    ckpt = load_checkpoint(args.ppl_ckpt)
    ours = tokenizer_from_json(ckpt["tokenizer"]).encode(text.read_text(), add_special_tokens=False).ids
    out["tokens_scored"] = (len(tokens) // args.ctx) * (args.ctx - 1 - args.ctx // 2)
    out["chunks"] = len(tokens) // args.ctx
    out["tokenization_identical"] = ours[:len(tokens)] == tokens
    ev = evaluate_checkpoint(args.ppl_ckpt, data_path=str(args.data), batches=args.eval_batches)
    out["qtool eval"] = {"ppl": ev.val_ppl, "loss": ev.val_loss, "tokens": ev.val_tokens, "data": ev.data,
                         "protocol": "qtool eval: validation split, <|endoftext|> between stories, windows of the "
                                     "recipe's seq_len, every position, fake-quantized training model"}
    return out


# ------------------------------------------------------------------------------ main


def find_tools(arg: str | None, perplexity: str | None) -> tuple[Path, Path] | str:
    if not arg:
        return "no llama.cpp build given (--llama-bench PATH); build one with ../shared/tools/build-llama-cpp.sh"
    p = Path(arg)
    bench = p / "llama-bench" if p.is_dir() else p
    ppl = Path(perplexity) if perplexity else bench.with_name("llama-perplexity")
    for tool in (bench, ppl):
        if not (tool.is_file() and os.access(tool, os.X_OK)):
            return f"{tool}: not an executable llama.cpp tool"
    return bench, ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", help="llama-bench binary or the directory holding the llama.cpp tools")
    ap.add_argument("--llama-perplexity", help="llama-perplexity binary (default: beside llama-bench)")
    ap.add_argument("--ckpt", type=Path, help="speed checkpoint (default: random-init ternary_all ternarylm-132m)")
    ap.add_argument("--ppl-ckpt", type=Path, help="trained checkpoint for the perplexity comparison (none: skipped)")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--data", type=Path, default=SHARED, help="TinyStories directory (tokenizer training, qtool eval)")
    ap.add_argument("--text", type=Path, help="text to score (default: DATA/tinystories_validation_head.txt)")
    ap.add_argument("--max-chars", type=int, default=400_000, help="characters of --text to use")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "qtoolkit-llamacpp")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--before", type=Path, help="another qtoolkit source tree (e.g. `git archive` of an older commit) "
                    "measured as the engine 'qtoolkit packed (before)' in the same rounds")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    args.text = args.text or args.data / "tinystories_validation_head.txt"

    tools = find_tools(args.llama_bench, args.llama_perplexity)
    if isinstance(tools, str):
        print(json.dumps({"skipped": tools}))
        return
    bench, perplexity_bin = tools
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "threads": args.threads, "llama_bench": str(bench)}
    if not args.skip_speed:
        ckpt = args.ckpt or random_132m(args.out_dir, args.data / "tinystories_train_first2MiB.txt")
        files, packed = export_all(ckpt, args.types, args.out_dir, "speed")
        speed, build = measure_speed(bench, files, packed, args.rounds, args.threads, args.prompt_len, args.new_tokens,
                                     args.before)
        q = speed["qtoolkit packed"]
        if args.before:
            b = speed["qtoolkit packed (before)"]
            report["qtoolkit_over_before"] = {k: q[k]["median"] / b[k]["median"] for k in ("prefill_tok_s", "decode_tok_s")}
            report["before_over_llama_cpp"] = {
                e: {k: b[k]["median"] / v[k]["median"] for k in ("prefill_tok_s", "decode_tok_s")}
                for e, v in speed.items() if e.startswith("llama.cpp")}
        report.update({
            "llama_cpp_build": build,
            "speed_checkpoint": str(ckpt) + ("" if args.ckpt else " (random init: speed does not depend on the values)"),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds, "files": files,
            "speed": speed, "llama_bench_without_repack": sorted(NO_REPACK),
            "qtoolkit_over_llama_cpp": {e: {k: q[k]["median"] / v[k]["median"] for k in ("prefill_tok_s", "decode_tok_s")}
                                        for e, v in speed.items() if e.startswith("llama.cpp")},
        })
    if args.ppl_ckpt:
        report["perplexity"] = measure_perplexity(args, perplexity_bin, args.out_dir)
        report["perplexity"]["llama_cpp_without_repack"] = sorted(NO_REPACK)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
