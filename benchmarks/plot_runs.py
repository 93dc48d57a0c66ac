"""Learning curves of training runs (bfn-train and the AR yardstick) in one plot.

    python -m benchmarks.plot_runs docs/recipe_curves.png runs/A:label runs/B:label ...

For BFN runs the curve is the total code length (n-step loss + reconstruction, key
val_totalN, or val_totalN_L1 where a run logs one-byte chunks beside its own), dashed the
continuous-time loss (not for _L1 curves: it is at the run's own chunk length); for AR runs
val_ar.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(folder):
    return [json.loads(line) for line in open(Path(folder) / "log.jsonl")]


def total_key(rec):
    """The total's key: at one-byte chunks where the run logged several chunk lengths."""
    keys = [k for k in rec if k.startswith("val_total")]
    return next((k for k in keys if k.endswith("_L1")), keys[0] if keys else None)


def table(specs):
    """Markdown: every evaluation of every run."""
    rows = ["| run | minutes | bytes seen | continuous-time | n-step | reconstruction | total |",
            "|---|---|---|---|---|---|---|"]
    for spec in specs:
        folder, _, label = spec.partition(":")
        for r in load(folder):
            key = total_key(r)
            if key:
                n = key[len("val_total"):]
                parts = ["" if key.endswith("_L1") else f"{r[k]:.3f}" for k in ("val_cont", "val_n" + n, "val_rec" + n)]
                rows.append(f"| {label or folder} | {r['minutes']:.1f} | {r['bytes'] / 1e6:.1f}M | "
                            + " | ".join(parts) + f" | {r[key]:.3f} |")
            else:
                rows.append(f"| {label or folder} | {r['minutes']:.1f} | {r['bytes'] / 1e6:.1f}M | | | | "
                            f"{r['val_ar']:.3f} (AR) |")
    return "\n".join(rows)


def main(out, specs):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for spec in specs:
        folder, _, label = spec.partition(":")
        log = load(folder)
        key = total_key(log[-1]) or "val_ar"
        for ax, xkey, scale in ((axes[0], "bytes", 1e6), (axes[1], "minutes", 1)):
            xs = [r[xkey] / scale for r in log if r.get(key) is not None]
            line, = ax.plot(xs, [r[key] for r in log if r.get(key) is not None], marker="o", ms=3,
                            label=f"{label or folder} ({key})")
            if key != "val_ar" and not key.endswith("_L1"):     # val_cont is at the run's own chunk length
                ax.plot(xs, [r["val_cont"] for r in log if r.get(key) is not None], ls="--",
                        color=line.get_color(), alpha=0.6)
    for ax, xlabel in zip(axes, ("training bytes (millions)", "training minutes")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per byte")
        ax.set_ylim(1.8, 8.2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Validation code length (solid: n-step + reconstruction; dashed: continuous-time loss)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    print(table(sys.argv[2:]))
