"""Yardstick for the training recipe: an autoregressive byte transformer of the same size as a
BFN config, trained on the same data with cross-entropy, logged like bfn-train (log.jsonl with
val bits per byte against bytes seen and minutes). Not part of the product.

    python -m benchmarks.ar_baseline runs/ar --d-model 128 --n-layers 4 --minutes 20
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bfn_codec.layers import Block
from bfn_codec.train import DATA, read_text, sequence_batch


class ARNet(nn.Module):
    def __init__(self, d, layers, heads, length):
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, x):
        T = x.shape[1]
        h = self.emb(x) + self.pos(torch.arange(T))
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for block in self.blocks:
            h = block.finish(h, *block.heads(h), causal)
        return self.head(self.ln(h))


def bits_per_byte(net, x):
    logits = net(x[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1)).item() / np.log(2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--eval-minutes", type=float, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = read_text(DATA / "train.txt.xz")
    val = read_text(DATA / "valid.txt.xz", 200_000 + 32768)[200_000:]
    S = args.length + 1
    val_x = torch.from_numpy(val[:len(val) // S * S].astype(np.int64)).reshape(-1, S)
    net = ARNet(args.d_model, args.n_layers, args.n_heads, args.length)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    print(f"{sum(p.numel() for p in net.parameters()):,} parameters", flush=True)
    start, last_eval, step, seen, train_s = time.time(), time.time(), 0, 0, 0.0
    while True:
        x = sequence_batch(train, rng, args.batch_size, S)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 200)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x[:, :-1]).float().reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step, seen = step + 1, seen + x[:, 1:].numel()
        now = time.time()
        done = now - start >= args.minutes * 60
        if done or now - last_eval >= args.eval_minutes * 60:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                val_bpb = bits_per_byte(net, val_x)
            rec = {"step": step, "bytes": seen, "minutes": (now - start) / 60, "val_ar": val_bpb}
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
            last_eval = time.time()
        if done:
            break


if __name__ == "__main__":
    main()
