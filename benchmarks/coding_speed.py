"""Where coding time goes, per model: context network, per-step network, coder, other;
and what a user gets: the commands' speed on whole files.

    python -m benchmarks.coding_speed bfn_codec/weights/default.pt runs/X/ckpt.pt --kb 76 --steps 10
    python -m benchmarks.coding_speed bfn_codec/weights/default.pt --formats 4,5
    python -m benchmarks.coding_speed --files ../shared/data/bench/canterbury/alice29.txt --valid-kb 100

Codes KB of the validation books as one frame (in this process, one thread, bits-back
forced; 76 KB: the 38 lanes of each of alice29.txt's two frames) in each format version
asked for (default: the one written now; 4 runs the context network in float64, 5 and 6 on
int8 grids in torch, 7 in the compiled kernel), checks the round trip, and prints KB/s each way with the milliseconds per KB spent
in the context network (`advance` and `prepare`: once per stripe), the per-step network
(`forward`, or from format 7 the kernel's `prior` and `log_probs`: n + 1 calls per chunk) and
the rest (the coder, chunking).
"""
import argparse
import time
from contextlib import ExitStack, contextmanager
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


def measure(path, kb, steps, version=None, offset=200_000):
    torch.set_num_threads(1)
    data = read_text(Path(DATA) / "valid.txt.xz", offset + kb * 1024)[offset:].tobytes()
    setup = codec.load_setup(path, steps, codec.DEFAULT_BINS, None, version)
    model = setup.predictor.model
    context_class = type(setup.predictor.contexts())      # the format's: torch or compiled
    timers = [(context_class, "advance"), (type(model), "prepare"), (type(model), "forward")]
    if setup.predictor.step is not None:          # the compiled per-step network (format 7 on)
        timers += [(type(setup.predictor.step), "prior"), (type(setup.predictor.step), "log_probs")]
    rows = {}
    for direction in ("compress", "decompress"):
        spent = {}
        with ExitStack() as stack:
            for obj, name in timers:
                stack.enter_context(timed(obj, name, spent))
            t0 = time.perf_counter()
            if direction == "compress":
                frame = codec.encode_frame(data, setup.predictor, setup.schedule, setup.lane_rule, fallback=False)
            else:
                assert codec.decode_frame(frame, setup.predictor, setup.schedule, setup.lane_rule) == data
            total = time.perf_counter() - t0
        rows[direction] = (total, spent)
    lanes = len(codec.lanes(len(data), setup.predictor.chunk_len, setup.lane_rule))
    return setup.fingerprint, model.num_params(), lanes, 8 * len(frame.payload) / len(data), rows


def end_to_end(paths, workers=(1, 2)):
    """bfn-compress and bfn-decompress (default settings, each a fresh process) on every file
    with each -T: wall seconds each way, the outputs of all -T checked identical and every
    decoded file against its original. Prints a Markdown table."""
    import os
    import shutil
    import subprocess
    import tempfile
    print("| file | KB | bits/byte | -T | compress s | KB/s | decompress s | KB/s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            size, blobs = os.path.getsize(path), set()
            for T in workers:
                src = os.path.join(tmp, f"T{T}-{Path(path).name}")
                shutil.copyfile(path, src)
                t0 = time.perf_counter()
                subprocess.run(["bfn-compress", "-q", "-T", str(T), src], check=True)
                t1 = time.perf_counter()
                os.remove(src)
                subprocess.run(["bfn-decompress", "-q", "-T", str(T), src + ".bfn"], check=True)
                t2 = time.perf_counter()
                assert Path(src).read_bytes() == Path(path).read_bytes(), "round trip"
                blob = Path(src + ".bfn").read_bytes()
                blobs.add(blob)
                kb = size / 1024
                print(f"| {Path(path).name} | {kb:.0f} | {8 * len(blob) / size:.3f} | {T} | {t1 - t0:.1f} | "
                      f"{kb / (t1 - t0):.2f} | {t2 - t1:.1f} | {kb / (t2 - t1):.2f} |")
            assert len(blobs) == 1, f"{path}: the output depends on -T"


def valid_text(kb, offset=300_000):
    """kb KB of the validation books (after the slice training validates on), as a file
    (valid<kb>k.txt in a new temporary folder)."""
    import tempfile
    path = Path(tempfile.mkdtemp()) / f"valid{kb}k.txt"
    path.write_bytes(read_text(Path(DATA) / "valid.txt.xz", offset + kb * 1024)[offset:].tobytes())
    return str(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--files", nargs="*", default=[], help="end to end: the commands on these files")
    ap.add_argument("--valid-kb", type=int, default=0, help="end to end: also this many KB of validation text")
    ap.add_argument("--kb", type=int, default=76)
    ap.add_argument("--formats", default="", help="format versions to code in (default: the one written now)")
    ap.add_argument("--steps", type=int, default=None, help="n (default: each model's own)")
    args = ap.parse_args()
    if args.files or args.valid_kb:
        end_to_end(args.files + ([valid_text(args.valid_kb)] if args.valid_kb else []))
        if not args.models:
            return
    print("| model | params | format | lanes | bits/byte | direction | KB/s | context ms/KB | per-step ms/KB "
          "| coder+other ms/KB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.models:
        for version in [int(v) for v in args.formats.split(",") if v] or [None]:
            steps = args.steps or codec.default_steps(load_weights(path)[0])
            fp, params, lanes, bpb, rows = measure(path, args.kb, steps, version)
            for direction, (total, spent) in rows.items():
                ctx = spent.get("advance", 0.0) + spent.get("prepare", 0.0)
                step = spent.get("forward", 0.0) + spent.get("prior", 0.0) + spent.get("log_probs", 0.0)
                print(f"| {Path(path).name} ({fp}) | {params:,} | {version or 'now'} | {lanes} | {bpb:.3f} | "
                      f"{direction} | {args.kb / total:.2f} | {1000 * ctx / args.kb:.0f} | "
                      f"{1000 * step / args.kb:.0f} | {1000 * (total - ctx - step) / args.kb:.0f} |")


if __name__ == "__main__":
    main()
