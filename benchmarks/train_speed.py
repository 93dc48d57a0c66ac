"""Training throughput on this machine: loss-bearing bytes per second for a few model sizes,
bf16 autocast on or off, torch.compile on or off, and thread counts.

    python -m benchmarks.train_speed [--steps 6] [--sizes 64x2,128x4,256x4]
"""
import argparse
import dataclasses
import time

import torch

from bfn_codec.model import ModelConfig, build
from bfn_codec.train import TrainConfig, loss_per_byte


def measure(cfg, tcfg, steps, threads, bf16, compile_):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build(cfg)
    fwd = torch.compile(net) if compile_ else net
    if compile_:
        fwd.context = net.context
        fwd.cfg = net.cfg
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (tcfg.batch_size, cfg.context_len + cfg.chunk_len))
    times = []
    for k in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_per_byte(fwd, x, tcfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if k >= 2:                       # the first steps warm up (and compile)
            times.append(time.perf_counter() - t0)
    per_step = sorted(times)[len(times) // 2]
    return x.numel() / per_step, net.num_params()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sizes", default="64x2,128x4,256x4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile")
    args = ap.parse_args()
    tcfg = TrainConfig()
    print(f"torch {torch.__version__}, batch {tcfg.batch_size}, sequence 256 bytes (192 context + 64 chunk)")
    print("| d_model x layers | params | threads | bf16 | compile | bytes/s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        d, layers = map(int, size.split("x"))
        cfg = ModelConfig(d_model=d, n_layers=layers, n_heads=4)
        for threads in map(int, args.threads.split(",")):
            for bf16 in (False, True):
                for compile_ in ((False, True) if args.compile else (False,)):
                    try:
                        rate, params = measure(cfg, tcfg, args.steps, threads, bf16, compile_)
                        print(f"| {d} x {layers} | {params / 1e6:.2f}M | {threads} | {bf16} | {compile_} | {rate:,.0f} |",
                              flush=True)
                    except Exception as e:      # torch.compile may be unavailable
                        print(f"| {d} x {layers} | | {threads} | {bf16} | {compile_} | failed: {type(e).__name__} |")


if __name__ == "__main__":
    main()
