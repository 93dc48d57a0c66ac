"""Run the benchmark: `python -m benchmarks.run FILES_OR_DIRS [--out DIR] [--codecs LIST] ...`.

Each (codec, file) is measured in a fresh Python process, once to compress and once to
decompress, so peak memory is the codec's own and not what earlier runs left behind. The
parent checks that the decompressed bytes equal the original, then writes RESULTS.md,
results.csv and two plots.
"""
import argparse
import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time

from . import codecs as cx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KB = 1000
MIB = 1 << 20


# ---- one measurement, in a child process ----

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak():
    """RSS in bytes now, with the kernel's peak RSS reset to it (Linux); None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        return None


def probe(argv=None):
    """Child: run one codec on one file `repeats` times; print the best time and first run's peak memory."""
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["compress", "decompress"])
    p.add_argument("codec")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--model")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    codec = cx.make(a.codec, a.model, a.workers)
    with open(a.src, "rb") as f:
        data = f.read()
    fn = getattr(codec, a.op)
    best, peak = math.inf, None
    for k in range(a.repeats):
        rss0 = _reset_peak() if k == 0 else None
        t = time.perf_counter()
        out = fn(data)
        best = min(best, time.perf_counter() - t)
        if rss0 is not None:
            peak = _status_kb("VmHWM") * 1024 - rss0
            worker_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # bfn worker processes, if any
            peak += worker_kb * 1024
    with open(a.dst, "wb") as f:
        f.write(out)
    print(json.dumps({"seconds": best, "peak_bytes": peak, "bfn": getattr(codec, "stats", None)}))


def run_child(op, codec, src, dst, repeats, model, workers):
    cmd = [sys.executable, "-c", "import sys, benchmarks.run as r; r.probe(sys.argv[1:])",
           op, codec.name, src, dst, "--repeats", str(repeats), "--workers", str(workers)]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{codec.name} {op} failed: {res.stderr.strip().splitlines()[-1:] or res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(codec, path, data, repeats, model, workers, tmp):
    """One CSV row: sizes, best times, peak memory, round trip checked."""
    n = repeats if codec.fast else 1
    blob_path, out_path = os.path.join(tmp, "blob"), os.path.join(tmp, "out")
    row = {"codec": codec.name, "bytes": len(data), "runs": n}
    try:
        c = run_child("compress", codec, path, blob_path, n, model, workers)
        d = run_child("decompress", codec, blob_path, out_path, n, model, workers)
        with open(blob_path, "rb") as f:
            size = len(f.read())
        with open(out_path, "rb") as f:
            ok = f.read() == data
        if not ok:
            raise RuntimeError("round trip mismatch")
    except Exception as e:  # record it, carry on with the other codecs, fail at the end
        row.update(roundtrip_ok=False, error=str(e))
        return row
    row.update(compressed_bytes=size, bits_per_byte=8 * size / len(data), roundtrip_ok=True,
               compress_s=c["seconds"], decompress_s=d["seconds"],
               compress_kb_s=len(data) / KB / c["seconds"], decompress_kb_s=len(data) / KB / d["seconds"],
               compress_peak_mib=_mib(c["peak_bytes"]), decompress_peak_mib=_mib(d["peak_bytes"]))
    if c["bfn"] is not None:
        exp, excess, model = c["bfn"]["expected_bits"] / 8, c["bfn"]["excess_bits"] / 8, c["bfn"]["model_bits"] / 8
        row.update(expected_bytes=exp, overhead_bytes=size - exp,
                   overhead_pct=100 * (size - exp) / exp if exp else math.nan,
                   coder_pct=100 * excess / model if model else math.nan, fixed_bytes=size - exp - excess)
    return row


def _mib(b):
    return None if b is None else b / MIB


# ---- inputs and machine ----

def collect_files(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            for d, dirs, names in os.walk(p):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                files += [(os.path.relpath(os.path.join(d, x), p), os.path.join(d, x))
                          for x in sorted(names) if not x.startswith(".")]
        elif os.path.isfile(p):
            files.append((os.path.basename(p), p))
        else:
            raise SystemExit(f"no such file or directory: {p}")
    names = [n for n, _ in files]
    return [(n if names.count(n) == 1 else f, f) for n, f in files]


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torch
        torch_info = f"{torch.__version__} ({torch.get_num_threads()} threads by default)"
    except ImportError:
        torch_info = "not installed"
    import zlib
    return {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores ({usable} usable by this process)",
        "OS": platform.platform(),
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg())
        if hasattr(os, "getloadavg") else "unknown",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "torch": torch_info,
        "numpy / constriction": f"{_version('numpy')} / {_version('constriction')}",
        "baseline libraries": f"zlib {zlib.ZLIB_RUNTIME_VERSION}, zstandard {_version('zstandard')}, "
                              f"brotli {_version('brotli')}, pyppmd {_version('pyppmd')}",
    }


# ---- reports ----

FIELDS = ["file", "bytes", "codec", "compressed_bytes", "bits_per_byte", "compress_s", "decompress_s",
          "compress_kb_s", "decompress_kb_s", "compress_peak_mib", "decompress_peak_mib", "runs",
          "roundtrip_ok", "expected_bytes", "overhead_bytes", "overhead_pct", "coder_pct", "fixed_bytes", "error"]


def totals(rows, codecs):
    """Per codec over all files: total compressed bits / total bytes, total bytes / total time."""
    out = {}
    for c in codecs:
        rs = [r for r in rows if r["codec"] == c.name]
        if not rs or not all(r["roundtrip_ok"] for r in rs):
            continue
        n = sum(r["bytes"] for r in rs)
        size = sum(r["compressed_bytes"] for r in rs)
        t = {"bytes": n, "compressed_bytes": size, "bits_per_byte": 8 * size / n,
             "compress_kb_s": n / KB / sum(r["compress_s"] for r in rs),
             "decompress_kb_s": n / KB / sum(r["decompress_s"] for r in rs)}
        for k in ("compress_peak_mib", "decompress_peak_mib"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            t[k] = max(vals) if vals else None
        if all("expected_bytes" in r for r in rs):
            t["expected_bytes"] = sum(r["expected_bytes"] for r in rs)
        out[c.name] = t
    return out


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in r.items()})


def _fmt(v, spec):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _speed(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _table(header, body, left=1):
    """Markdown table; the first `left` columns are text (left-aligned), the rest numbers."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i >= left else "---"
                                                              for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in body]


def write_markdown(path, command, info, setup, notes, files, codecs, rows, tot):
    get = {(r["file"], r["codec"]): r for r in rows}
    md = ["# bfn-codec benchmark", "", "Produced by:", "", "```", command, "```", "",
          f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"]
    md += [f"- {k}: {v}" for k, v in {**info, **setup}.items()]
    md += [f"- Note: {n}" for n in notes]

    md += ["", "## Bits per byte (8 × compressed / original size; lower is better)", ""]
    body = []
    for name, _ in files:
        rs = [get.get((name, c.name)) for c in codecs]
        body.append([name, rs[0]["bytes"] if rs else ""] +
                    [_fmt(r.get("bits_per_byte"), ".3f") if r["roundtrip_ok"] else "FAILED" for r in rs])
    body.append(["**total**", sum(r["bytes"] for r in rows if r["codec"] == codecs[0].name) if codecs else ""] +
                [f"**{tot[c.name]['bits_per_byte']:.3f}**" if c.name in tot else "—" for c in codecs])
    md += _table(["file", "bytes"] + [c.name for c in codecs], body)

    md += ["", "## Totals per codec", "",
           "Speed = total original bytes / total time over all files (1 KB = 1000 bytes). "
           "Peak memory = the largest over files.", ""]
    body = [[c.name, c.label, _fmt(t["compressed_bytes"], "d"), f"{t['bits_per_byte']:.3f}",
             _speed(t["compress_kb_s"]), _speed(t["decompress_kb_s"]),
             _fmt(t["compress_peak_mib"], ".1f"), _fmt(t["decompress_peak_mib"], ".1f")]
            for c in codecs if (t := tot.get(c.name))]
    md += _table(["codec", "settings", "compressed bytes", "bits per byte", "compress KB/s", "decompress KB/s",
                  "compress peak MiB", "decompress peak MiB"], body, left=2)

    bfn = [c for c in codecs if "expected_bytes" in tot.get(c.name, {})]
    if bfn:
        md += ["", "## bfn-codec: actual size against the model's expected code length", "",
               "Expected = the model's n-step loss on the frames it coded (its rate on the bits-back "
               "chunks, applied to the directly coded tail too); overhead = actual − expected. "
               "It splits into the coder's excess on the bits-back chunks over the model's loss on "
               "the trajectories they popped (coder %) and a fixed cost (container, frame headers, ANS "
               "flush, and the tail's direct code against the model's rate).", ""]
        body = []
        for c in bfn:
            for name, _ in files:
                r = get[(name, c.name)]
                body.append([name, c.name, r["compressed_bytes"], f"{r['expected_bytes']:.1f}",
                             f"{r['overhead_bytes']:+.1f}", _fmt(r["overhead_pct"], "+.2f"),
                             _fmt(r["coder_pct"], "+.2f"), f"{r['fixed_bytes']:+.0f}"])
            t = tot[c.name]
            ov = t["compressed_bytes"] - t["expected_bytes"]
            body.append(["**total**", c.name, t["compressed_bytes"], f"{t['expected_bytes']:.1f}", f"{ov:+.1f}",
                         _fmt(100 * ov / t["expected_bytes"] if t["expected_bytes"] else math.nan, "+.2f"), "", ""])
        md += _table(["file", "codec", "actual bytes", "expected bytes", "overhead bytes", "overhead %", "coder %",
                      "fixed bytes"], body, left=2)

    failed = [r for r in rows if not r["roundtrip_ok"]]
    if failed:
        md += ["", "## Failures", ""] + [f"- {r['file']} / {r['codec']}: {r['error']}" for r in failed]
    md += ["", "## Plots", "", "![bits per byte per file](bpb_per_file.png)", "",
           "![bits per byte against speed](bpb_vs_speed.png)", "",
           "Per-file times, speeds and memory: [results.csv](results.csv).", ""]
    with open(path, "w") as f:
        f.write("\n".join(md))


def _styles(codecs):
    """Colour and marker per codec: tab10 (without red and pink) for baselines, shades of red for bfn-codec."""
    import matplotlib.pyplot as plt
    base = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 4, 5, 7, 8, 9)]
    bfn = [c for c in codecs if c.name.startswith("bfn-")]
    reds = [plt.get_cmap("Reds")(0.45 + 0.5 * i / max(len(bfn) - 1, 1)) for i in range(len(bfn))]
    markers, bfn_markers = "osD^vP*X<>", "hpdH8"
    out, b = {}, 0
    for c in codecs:
        if c in bfn:
            i = bfn.index(c)
            out[c.name] = (reds[i], bfn_markers[i % len(bfn_markers)])
        else:
            out[c.name] = (base[b % len(base)], markers[b % len(markers)])
            b += 1
    return out


def plot(out, files, codecs, rows, tot):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    style = _styles(codecs)
    get = {(r["file"], r["codec"]): r for r in rows}
    groups = [n for n, _ in files] + ["all files"]
    k = len(codecs)
    width = 0.8 / max(k, 1)

    fig, ax = plt.subplots(figsize=(max(8, 1.2 + 0.11 * k * len(groups)), 5))
    for i, c in enumerate(codecs):
        ys = [get[(n, c.name)].get("bits_per_byte", math.nan) for n, _ in files]
        ys.append(tot[c.name]["bits_per_byte"] if c.name in tot else math.nan)
        ax.bar([g + (i - (k - 1) / 2) * width for g in range(len(groups))], ys, width, label=c.name,
               color=style[c.name][0])
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.axvline(len(groups) - 1.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("file (last group: all files together)")
    ax.set_ylabel("bits per byte")
    ax.set_title("Compressed size per file (8 × compressed / original bytes; lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="codec", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bpb_per_file.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, key, what in zip(axes, ("compress_kb_s", "decompress_kb_s"), ("compression", "decompression")):
        for c in codecs:
            if c.name in tot:
                color, marker = style[c.name]
                ax.scatter(tot[c.name][key], tot[c.name]["bits_per_byte"], s=70, color=color, marker=marker,
                           label=c.name, edgecolor="black", linewidth=0.5, alpha=0.85, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} speed (KB/s, 1 KB = 1000 bytes; log scale)")
        ax.set_title(f"Size against {what} speed, all files (lower right is better)")
        ax.grid(which="major", alpha=0.4)
        ax.grid(which="minor", alpha=0.1)
    axes[0].set_ylabel("bits per byte (total compressed bits / total bytes)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="codec", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bpb_vs_speed.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---- main ----

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="files or directories (read recursively)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    p.add_argument("--codecs", help="comma list of codecs or families, e.g. gzip-9,zstd,ppmd,bfn (default: all)")
    p.add_argument("--bfn-steps", default="5,10,20", help="comma list of bfn-codec step counts")
    p.add_argument("--model", help="bfn-codec weights (default: the package's shipped model)")
    p.add_argument("--workers", type=int, help="bfn-codec worker processes (default: codec.default_workers())")
    p.add_argument("--repeats", type=int, default=3, help="runs per file for the fast codecs; the best counts")
    p.add_argument("--quick", action="store_true", help="one run per file (same as --repeats 1)")
    a = p.parse_args(argv)
    command = "python -m benchmarks.run " + shlex.join(argv)
    repeats = 1 if a.quick else max(1, a.repeats)
    steps = [int(s) for s in a.bfn_steps.split(",") if s.strip()]
    try:
        codecs, notes = cx.select(a.codecs, steps, a.model, 1)
    except ValueError as e:
        p.error(str(e))
    if not codecs:
        p.error("no codec to run: " + " ".join(notes))
    files = collect_files(a.paths)
    empty = [n for n, f in files if os.path.getsize(f) == 0]
    if empty:
        notes.append(f"empty files left out: {', '.join(empty)}")
        files = [(n, f) for n, f in files if os.path.getsize(f)]
    if not files:
        p.error("no non-empty input files")

    runs = f"best of {repeats} runs" if repeats > 1 else "1 run"
    setup = {"Timing": f"{runs} per file (bfn-codec: 1 run), wall clock of the compress or "
                       "decompress call alone, each codec and file in a fresh Python process",
             "Memory": "peak RSS increase during the first call in that process (Linux VmHWM after resetting "
                       "it via /proc/self/clear_refs, minus VmRSS before the call), plus the peak RSS of the "
                       "largest bfn worker process when frames are coded in workers; — where unsupported"}
    bfn_used = [c for c in codecs if isinstance(c, cx.Bfn)]
    workers = 1
    model = None
    if bfn_used:
        from bfn_codec import codec as bfn
        workers = a.workers or bfn.default_workers()
        model = os.path.abspath(a.model or bfn.DEFAULT_MODEL)
        setup["bfn-codec"] = (f"model {model}, steps {', '.join(str(c.steps) for c in bfn_used)}, "
                              f"bins {bfn.DEFAULT_BINS}, frame size {bfn.FRAME_SIZE} bytes, workers {workers} "
                              "(frames run in parallel only in files of more than one frame); the network runs "
                              "on 1 torch thread per worker")
    info = machine_info()

    os.makedirs(a.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in files:
            with open(path, "rb") as f:
                data = f.read()
            for c in codecs:
                t0 = time.perf_counter()
                if not c.fast:
                    print(f"{name:>16} {c.name:>10}: running ...", file=sys.stderr)
                row = {"file": name, **measure(c, path, data, repeats, model, workers, tmp)}
                rows.append(row)
                msg = (f"{row['bits_per_byte']:.3f} bpb, {_speed(row['compress_kb_s'])} / "
                       f"{_speed(row['decompress_kb_s'])} KB/s" if row["roundtrip_ok"] else "FAILED: " + row["error"])
                print(f"{name:>16} {c.name:>10}: {msg}  [{time.perf_counter() - t0:.1f} s]", file=sys.stderr)

    tot = totals(rows, codecs)
    write_csv(os.path.join(a.out, "results.csv"), rows)
    write_markdown(os.path.join(a.out, "RESULTS.md"), command, info, setup, notes, files, codecs, rows, tot)
    plot(a.out, files, codecs, rows, tot)
    for n in notes:
        print("note:", n, file=sys.stderr)
    print(f"wrote {os.path.join(a.out, 'RESULTS.md')}, results.csv, bpb_per_file.png, bpb_vs_speed.png",
          file=sys.stderr)
    failed = sum(not r["roundtrip_ok"] for r in rows)
    if failed:
        print(f"{failed} round trip(s) FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
