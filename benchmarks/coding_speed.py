"""Where coding time goes, per model: context network, per-step network, coder, other.

    python -m benchmarks.coding_speed bfn_codec/weights/default.pt runs/X/ckpt.pt --kb 32 --steps 10

Compresses and decompresses the first KB of the validation books (one frame, in this
process, one thread, bits-back forced), checks the round trip, and prints KB/s each way
with the milliseconds per KB spent in the context network (`advance` and `prepare`: once per
stripe),
the per-step network (`forward`: n + 1 calls per chunk) and the rest (the coder, chunking).
"""
import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bfn_codec import codec
from bfn_codec.model import load_weights
from bfn_codec.train import DATA, read_text


@contextmanager
def timed(obj, name, into):
    """Add the time spent in obj.name (a method) to into[name] while the block runs."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + time.perf_counter() - t0
    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, original)


def measure(path, kb, steps, offset=200_000):
    torch.set_num_threads(1)
    data = read_text(Path(DATA) / "valid.txt.xz", offset + kb * 1024)[offset:].tobytes()
    setup = codec.load_setup(path, steps, codec.DEFAULT_BINS)
    model = setup.predictor.model
    context_class = type(model.coding_context())
    rows = {}
    for direction in ("compress", "decompress"):
        spent = {}
        with timed(context_class, "advance", spent), timed(type(model), "prepare", spent), \
                timed(type(model), "forward", spent):
            t0 = time.perf_counter()
            if direction == "compress":
                blob, stats = codec.compress(data, path, steps, frame_size=len(data), fallback=False)
            else:
                assert codec.decompress(blob, path) == data
            total = time.perf_counter() - t0
        rows[direction] = (total, spent)
    return setup.fingerprint, model.num_params(), 8 * len(blob) / len(data), rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--kb", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="n (default: each model's own)")
    args = ap.parse_args()
    print("| model | params | bits/byte | direction | KB/s | context ms/KB | per-step ms/KB | coder+other ms/KB |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.models:
        fp, params, bpb, rows = measure(path, args.kb, args.steps or codec.default_steps(load_weights(path)[0]))
        for direction, (total, spent) in rows.items():
            ctx, step = spent.get("advance", 0.0) + spent.get("prepare", 0.0), spent.get("forward", 0.0)
            print(f"| {Path(path).name} ({fp}) | {params:,} | {bpb:.3f} | {direction} | {args.kb / total:.2f} | "
                  f"{1000 * ctx / args.kb:.0f} | {1000 * step / args.kb:.0f} | "
                  f"{1000 * (total - ctx - step) / args.kb:.0f} |")


if __name__ == "__main__":
    main()
