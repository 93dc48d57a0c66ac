"""The ratio/speed frontier of a model over chunk length L and step count n.

    python -m benchmarks.frontier runs/X/ckpt.pt --lens 1,2,4 --steps 5,10,20 --code-kb 8

For every L the model can code with and every n: the validation total (n-step loss +
reconstruction, bits per byte, on the training code's validation slice), and, with
--code-kb, the coding speed (KB/s, compress and decompress of that much validation text
in this process on one thread, round trip checked) and the actual size in bits per byte.
Prints a Markdown table; --plot FILE draws bits per byte against coding KB/s.
"""
import argparse
import time
from pathlib import Path

import torch

from bfn_codec import codec
from bfn_codec.model import load_weights
from bfn_codec.train import DATA, TrainConfig, evaluate, read_text


def validation(model, lens, steps):
    tcfg = TrainConfig()
    val = read_text(Path(DATA) / "valid.txt.xz", tcfg.val_offset + tcfg.val_bytes)[tcfg.val_offset:]
    out = {}
    with torch.no_grad():
        for L in lens:
            res = evaluate(model, val, tcfg, steps, chunk_len=L)
            out[L] = {n: res[f"val_total{n}"] for n in steps} | {"cont": res["val_cont"]}
    return out


def coding(path, L, n, kb, offset=100_000):
    torch.set_num_threads(1)
    data = read_text(Path(DATA) / "valid.txt.xz", offset + kb * 1024)[offset:].tobytes()
    t0 = time.perf_counter()
    blob, _ = codec.compress(data, path, n, frame_size=len(data), fallback=False, chunk_len=L)
    t1 = time.perf_counter()
    assert codec.decompress(blob, path) == data
    t2 = time.perf_counter()
    return 8 * len(blob) / len(data), kb / (t1 - t0), kb / (t2 - t1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--lens", default="")
    ap.add_argument("--steps", default="5,10,20")
    ap.add_argument("--code-kb", type=int, default=0)
    ap.add_argument("--code-steps", type=int, default=10)
    ap.add_argument("--plot")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, fp, _ = load_weights(args.model, dtype=torch.float32)
    lens = [int(x) for x in args.lens.split(",")] if args.lens else list(model.chunk_lens)
    steps = [int(x) for x in args.steps.split(",")]
    val = validation(model, lens, steps)
    print(f"model {args.model} ({fp}), {model.num_params():,} parameters")
    print("| L | continuous | " + " | ".join(f"total n={n}" for n in steps)
          + (f" | actual bits/byte n={args.code_steps} | compress KB/s | decompress KB/s" if args.code_kb else "") + " |")
    print("|---|---|" + "---|" * len(steps) + ("---|---|---|" if args.code_kb else ""))
    points = []
    for L in lens:
        row = f"| {L} | {val[L]['cont']:.3f} | " + " | ".join(f"{val[L][n]:.3f}" for n in steps)
        if args.code_kb:
            bpb, enc, dec = coding(args.model, L, args.code_steps, args.code_kb)
            row += f" | {bpb:.3f} | {enc:.2f} | {dec:.2f}"
            points.append((L, bpb, min(enc, dec)))
        print(row + " |")
    if args.plot and points:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p[2] for p in points], [p[1] for p in points], "o-")
        for L, bpb, speed in points:
            ax.annotate(f"L={L}", (speed, bpb), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("coding KB/s (one core, slower direction)")
        ax.set_ylabel(f"bits per byte (n = {args.code_steps})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
