"""GPTQ against round-to-nearest per layer, by calibration size and damping, on held-out tokens.

    python benchmarks/gptq_calibration.py --ckpt /work/runs/fp32-small-600/ckpt.pt [--data ../shared/data/tinystories]
        [--layers blocks.3.attn.q_proj,blocks.3.mlp.down_proj,...] [--bits 2,3,4] [--tokens 1024,4096,16384]
        [--damps 0.01,0.1] [--held-out 4096]

GPTQ minimises one layer's output error on its calibration inputs; what matters is the error on
inputs it has not seen. For each layer this captures its fp32 inputs on calibration windows
(`checkpoint_calibration`, seed 0) and on held-out windows (seed 7), fits `intn` with
`rounding: gptq` on the first N calibration tokens for every N and damping, and prints JSON: the
relative output error ||X'(W_q - W)^T||^2 / ||X' W^T||^2 on the held-out inputs X', for RTN and each
GPTQ setting. A GPTQ fit from fewer tokens than a few times the layer's input width overfits (its
held-out error can exceed RTN's at 2 bits); the damping `damp` regularises it.
"""

from __future__ import annotations

import argparse
import json

import torch

LAYERS = "blocks.3.attn.q_proj,blocks.3.mlp.down_proj,blocks.0.mlp.up_proj,blocks.6.attn.o_proj"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data")
    ap.add_argument("--layers", default=LAYERS)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--damps", default="0.01,0.1")
    ap.add_argument("--held-out", type=int, default=4096)
    args = ap.parse_args()
    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.quantizers import build
    from qtoolkit.search.probes import float_model
    from qtoolkit.training.ptq import checkpoint_calibration

    tokens = [int(t) for t in args.tokens.split(",")]
    damps = [float(d) for d in args.damps.split(",")]
    names = args.layers.split(",")
    ckpt = load_checkpoint(args.ckpt)
    model = float_model(ckpt).eval()
    calib, _ = checkpoint_calibration(ckpt, args.data, calib_tokens=max(tokens), seed=0)
    held, _ = checkpoint_calibration(ckpt, args.data, calib_tokens=args.held_out, seed=7)
    modules = dict(model.named_modules())
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [modules[n].register_forward_hook(
        lambda mod, inp, out, n=n: acts[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for x in calib + held:
            model(x)
    for h in hooks:
        h.remove()
    n_calib = sum(int(x.numel()) for x in calib)
    out = {"benchmark": "gptq_calibration", "checkpoint": args.ckpt, "held_out_tokens": args.held_out, "layers": {}}
    for name in names:
        x = torch.cat(acts[name])
        x_fit, x_test = x[:n_calib], x[n_calib:].double()
        w = modules[name].weight.detach()
        ref = x_test @ w.double().T

        def err(wq: torch.Tensor, x_test: torch.Tensor = x_test, ref: torch.Tensor = ref) -> float:
            return float(((x_test @ wq.double().T - ref) ** 2).mean() / (ref ** 2).mean())

        row: dict[str, float] = {"inputs": w.shape[1]}
        for bits in (int(b) for b in args.bits.split(",")):
            row[f"rtn{bits}"] = err(build({"name": "intn", "bits": bits})(w))
            for n in tokens:
                for damp in damps:
                    q = build({"name": "intn", "bits": bits, "rounding": "gptq", "damp": damp})
                    q.init_from_weight(w)
                    q.observe(x_fit[:n])
                    row[f"gptq{bits} tokens={n} damp={damp}"] = err(q(q.calibrate(w)))
        out["layers"][name] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
