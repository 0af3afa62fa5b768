"""GPU figures of issue 14 in one JSON: training tokens/s and MFU, probe time, batch-1 decode tokens/s.

    python benchmarks/gpu.py [--presets small,ternarylm-132m] [--compile off,on] [--rounds 10]
    python benchmarks/gpu.py --device cpu        # a smoke version on `tiny` (what the tests run)

  * train: `fp32_baseline` and `ternary_all` on each preset, random tokens at the preset's batch and
    sequence length, through the trainer's own step (`benchmarks/train_step.measure`: TrainStep,
    fused AdamW, bf16 autocast, torch.compile off and on): step time min/median/max, tokens/s, MFU
    (`training.throughput`) and the ratio ternary / fp32 (target <= 1.05; `ternarylm-132m`
    ternary_all >= 350k tokens/s on one H100);
  * probe: the per-layer probe (`search.probes.run_probe`, formats ternary,int8,fp16, 4096 calibration
    tokens, fresh cache) of an untrained fp32 checkpoint of the last preset, on the device (target:
    under a minute for `ternarylm-132m`). The checkpoint comes from a one-step `train` run on a
    synthetic corpus, so it holds a real tokenizer and data reference;
  * decode: a packed (2-bit) `ternary_all` checkpoint of each preset with random weights, loaded with
    the public runtime API (`load_inference_model(..., device=...)`) and decoded at batch 1
    (`generate`, greedy, `--new-tokens` after a `--prompt-len` prompt; best of `--repeats`).

Without a CUDA device it stops with a message unless `--device cpu` is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import measure  # noqa: E402

from qtoolkit.config import TRAIN_DEFAULTS  # noqa: E402
from qtoolkit.device import resolve_device  # noqa: E402

WORDS = ("the cat dog sun tree little big happy sad ran jumped saw played with under over a an and then "
         "girl boy mom dad ball park red blue green house friend said liked wanted went home day night").split()


def synthetic_corpus(path: Path, n_words: int = 60_000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    stories = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) + "." for _ in range(n_words // 80)]
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    return path


def train_rows(device: torch.device, presets: list[str], compiles: list[bool], rounds: int, warmup: int,
               steps_per_round: int, batch_size: int | None) -> list[dict]:
    rows = []
    for preset in presets:
        d = TRAIN_DEFAULTS[preset]
        B, T = batch_size or d["batch_size"], d["seq_len"]
        for c in compiles:
            row = measure(device, preset, c, B, T, rounds, warmup, steps_per_round)
            rows.append({"preset": preset, "batch_size": B, "seq_len": T, **row})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def probe_time(device: torch.device, preset: str, work: Path, calib_tokens: int) -> dict:
    """Seconds of a fresh per-layer probe of an untrained fp32 `preset` checkpoint (module docstring)."""
    from qtoolkit import load_recipe, train
    from qtoolkit.search.probes import parse_formats, run_probe

    corpus = synthetic_corpus(work / "corpus.txt")
    seq = min(TRAIN_DEFAULTS[preset]["seq_len"], 256)
    recipe = load_recipe("fp32_baseline", [f"model.preset={preset}", f"data.path={corpus}", "train.steps=1",
                                           "train.batch_size=2", f"train.seq_len={seq}", "train.eval_batches=1",
                                           f"train.device={device.type}", "train.compile=false"])
    res = train(recipe, work / f"probe-{preset}")
    t0 = time.perf_counter()
    out = run_probe(res.checkpoint, parse_formats("ternary,int8,fp16"), "layer", str(corpus),
                    calib_tokens=calib_tokens, use_cache=False, device=str(device))
    seconds = time.perf_counter() - t0
    return {"preset": preset, "seconds": round(seconds, 2), "calib_tokens": out.calibration["tokens"],
            "pairs_measured": sum(len(v) for v in out.measured.values()), "target_s_max": 60}


def decode_rate(device: torch.device, preset: str, work: Path, prompt_len: int, new_tokens: int,
                repeats: int) -> dict:
    from inference import random_packed

    from qtoolkit.deploy.runtime import GenerationStats, generate, load_inference_model

    path = random_packed(preset, work)
    model = load_inference_model(path, device=str(device))
    vocab = model.config.vocab_size if hasattr(model, "config") else 512
    prompt = [int(t) for t in torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0))]
    best = None
    for _ in range(repeats):
        stats = GenerationStats()
        for _ in generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0, stats=stats):
            pass
        if best is None or stats.decode_tok_s > best.decode_tok_s:
            best = stats
    return {"preset": preset, "prompt_tokens": best.prompt_tokens, "new_tokens": best.new_tokens,
            "decode_tokens_per_s": round(best.decode_tok_s, 1), "prefill_tokens_per_s": round(best.prefill_tok_s, 1),
            "packed_file_bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run on tiny)")
    ap.add_argument("--presets", default=None, help="default: small,ternarylm-132m (cuda) or tiny (cpu)")
    ap.add_argument("--compile", default="off,on")
    ap.add_argument("--rounds", type=int, default=None, help="default: 10 (cuda), 2 (cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="default: 3 (cuda), 1 (cpu)")
    ap.add_argument("--steps-per-round", type=int, default=None, help="default: 5 (cuda), 1 (cpu)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--calib-tokens", type=int, default=None, help="probe calibration tokens; default 4096 (cuda), 256 (cpu)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (cuda), 16 (cpu)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (cuda), 8 (cpu)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: train, probe, decode")
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch files (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: PyTorch sees no CUDA device on this machine; run it on a GPU, or pass "
              "--device cpu for a smoke run on the tiny preset", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    presets = (args.presets or ("small,ternarylm-132m" if cuda else "tiny")).split(",")
    compiles = [c.strip() == "on" for c in args.compile.split(",")]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out: dict = {"benchmark": "gpu", "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                 "torch": torch.__version__, "machine": platform.machine(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "train" not in skip:
            rows = train_rows(device, presets, compiles, args.rounds or (10 if cuda else 2),
                              args.warmup if args.warmup is not None else (3 if cuda else 1),
                              args.steps_per_round or (5 if cuda else 1), args.batch_size)
            out["train"] = rows
            out["ratio_ternary_over_fp32"] = {f"{r['preset']}/compile={'on' if r['compile'] else 'off'}":
                                              r.get("ratio_ternary_over_fp32") for r in rows}
        if "probe" not in skip:
            out["probe"] = probe_time(device, presets[-1], work, args.calib_tokens or (4096 if cuda else 256))
        if "decode" not in skip:
            out["decode"] = [decode_rate(device, p, work, args.prompt_len or (128 if cuda else 16),
                                         args.new_tokens or (128 if cuda else 8), args.repeats) for p in presets]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
