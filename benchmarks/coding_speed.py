"""Network cost of coding, per model: what bounds bfn-codec's KB/s on one core.

    python -m benchmarks.coding_speed bfn_codec/weights/default.pt runs/H/ckpt.pt --steps 10,20

Times the coding-time network (float64, one thread) on English text: the context pass
once per chunk and one forward per step (n + 1 per chunk), and prints KB/s per core.
The coder itself adds a few percent on top.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bfn_codec.codec import Predictor
from bfn_codec.model import load_weights
from bfn_codec.train import DATA, read_text


def measure(path, steps, chunks=20):
    torch.set_num_threads(1)
    model, fp, _ = load_weights(path)
    pred = Predictor(model)
    L = model.cfg.chunk_len
    text = read_text(Path(DATA) / "valid.txt.xz", 4096 + chunks * L)
    s = np.random.default_rng(0).normal(0.0, 1.0, 8 * L)
    t0 = time.perf_counter()
    predicts = [pred.for_chunk(text[:4096 + k * L], L) for k in range(chunks)]
    t1 = time.perf_counter()
    for predict in predicts:
        predict(s, 0.5)
    t2 = time.perf_counter()
    context, forward = (t1 - t0) / chunks, (t2 - t1) / chunks
    return fp, model.num_params(), context, forward, {n: L / (context + (n + 1) * forward) / 1000 for n in steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", default="10,20")
    args = ap.parse_args()
    steps = [int(n) for n in args.steps.split(",")]
    print("| model | params | context pass ms | forward ms | " + " | ".join(f"KB/s at n={n}" for n in steps) + " |")
    print("|---|---|---|---|" + "---|" * len(steps))
    for path in args.models:
        fp, params, context, forward, speed = measure(path, steps)
        print(f"| {path} ({fp}) | {params:,} | {1000 * context:.1f} | {1000 * forward:.2f} | "
              + " | ".join(f"{speed[n]:.2f}" for n in steps) + " |")


if __name__ == "__main__":
    main()
