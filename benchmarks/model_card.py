"""Figures for the model card: validation at several step counts, and the Bayesian flow.

    python -m benchmarks.model_card --model bfn_codec/weights/default.pt --out docs

Prints a Markdown table of validation bits per byte (continuous-time, and n-step +
reconstruction for several n) on the training code's validation slice, and writes
`model_card_steps.png` (those losses against n) and `model_card_flow.png`: for one sentence, the receiver's belief in each byte along one sender
trajectory (the chain the coder transmits), step by step. `--texts FILE...` adds the
loss on the first 64 KB of each file (the offset of, say, the Canterbury
texts from the validation books), at the model's coding n.
"""
import argparse
import math
from pathlib import Path

import matplotlib
import numpy as np
import torch

from bfn_codec import bfn
from bfn_codec.codec import DEFAULT_MODEL, default_chunk_len, default_steps
from bfn_codec.model import load_weights, to_vars
from bfn_codec.train import DATA, TrainConfig, evaluate, read_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONTEXT = b"Bayesian flow networks send data as noisy evidence, step by step. "
SENTENCE = b"The receiver's belief in each byte sharpens as the evidence grows."


def validation(model, steps):
    tcfg = TrainConfig()
    val = read_text(Path(DATA) / "valid.txt.xz", tcfg.val_offset + tcfg.val_bytes)[tcfg.val_offset:]
    return evaluate(model.float(), val, tcfg, steps, chunk_len=default_chunk_len(model))


TEXT_BYTES = 65536


def on_texts(model, paths, n):
    """The same losses on the first TEXT_BYTES of other files: {name: (total at n, continuous)}."""
    out = {}
    for path in paths:
        data = np.frombuffer(Path(path).read_bytes()[:TEXT_BYTES], dtype=np.uint8)
        res = evaluate(model.float(), data, TrainConfig(), [n], chunk_len=default_chunk_len(model))
        out[Path(path).name] = (res[f"val_total{n}"], res["val_cont"])
    return out


@torch.no_grad()
def flow(model, n, seed=0):
    """p(true byte) and the most likely byte at t_i = i / n along one sender trajectory."""
    cfg = model.cfg
    L = max(model.chunk_lens)
    x = torch.tensor(list(SENTENCE[:L].ljust(L)), dtype=torch.long)
    coding = model.coding_context()
    context = model.prepare(coding.advance([CONTEXT[-cfg.context_len:]]))
    v = to_vars(x, cfg)[None, None]                       # (1, 1, L, V)
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(v.shape + (cfg.K,), dtype=torch.float64)
    probs, best = [], []
    for i in range(n + 1):
        if i:
            z = z + bfn.sender_sample(v, bfn.alpha(i, n, cfg.beta1), cfg.K, g).double()
        log_p = model.family.byte_log_probs(model(z, torch.full((1, 1), i / n, dtype=torch.float64), context))[0, 0]
        probs.append(log_p.gather(-1, x[:, None]).squeeze(-1).exp().numpy())
        best.append(bytes(log_p.argmax(-1).tolist()))
    return x, np.array(probs), best


def plot_flow(model, n, out):
    x, probs, best = flow(model, n)
    L = len(x)
    fig, ax = plt.subplots(figsize=(max(8, L * 0.22), 0.42 * (n + 1) + 1.6))
    im = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for i, row in enumerate(best):
        for j, b in enumerate(row):
            ch = chr(b) if 32 <= b < 127 else "·"
            ax.text(j, i, ch, ha="center", va="center", fontsize=8, family="monospace",
                    color="black" if probs[i, j] > 0.6 else "white")
    ax.set_xticks(range(L))
    ax.set_xticklabels([chr(b) if 32 < b < 127 else "␣" for b in x.tolist()], fontsize=7, family="monospace")
    ax.set_yticks(range(n + 1))
    ax.set_yticklabels([f"t={i / n:.2f}" for i in range(n + 1)], fontsize=7)
    ax.set_xlabel("byte of the sentence (the true byte)")
    ax.set_ylabel("step i (accuracy beta(t) grows downwards)")
    ax.set_title(f"Bayesian flow of one sentence, n = {n}: the receiver's most likely byte (letters) "
                 f"and its probability of the true byte (colour)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="p(true byte)")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_steps(res, steps, out):
    """L^n + L^r and L^n against n, with L^inf: the n-step loss falls toward it as n grows."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [res[f"val_total{n}"] for n in steps], "o-", label="n-step + reconstruction (what the codec pays)")
    ax.plot(steps, [res[f"val_n{n}"] for n in steps], "s--", label="n-step loss")
    ax.axhline(res["val_cont"], color="gray", ls=":", label="continuous-time loss")
    ax.set_xscale("log")
    ax.set_xlabel("steps n (log scale)")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--steps", default="1,2,5,10,20,50,100", help="n for the validation table")
    ap.add_argument("--flow-steps", type=int, default=10)
    ap.add_argument("--texts", nargs="*", default=[],
                    help=f"also the loss at the model's coding n on the first {TEXT_BYTES} bytes of these files")
    args = ap.parse_args()
    model, fp, _ = load_weights(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_flow(model, args.flow_steps, out / "model_card_flow.png")
    steps = [int(s) for s in args.steps.split(",")]
    res = validation(model, steps)
    plot_steps(res, steps, out / "model_card_steps.png")
    print(f"model {fp}: {model.num_params():,} parameters\n")
    print("| n | n-step loss | reconstruction | total |\n|---|---|---|---|")
    for n in steps:
        print(f"| {n} | {res[f'val_n{n}']:.3f} | {res[f'val_rec{n}']:.3f} | {res[f'val_total{n}']:.3f} |")
    print(f"| continuous time | {res['val_cont']:.3f} | | |")
    assert math.isfinite(res["val_cont"])
    if args.texts:
        n = default_steps(model)
        print(f"\n| file | total at n = {n} | continuous time |\n|---|---|---|")
        for name, (total, cont) in on_texts(model, args.texts, n).items():
            print(f"| {name} | {total:.3f} | {cont:.3f} |")


if __name__ == "__main__":
    main()
