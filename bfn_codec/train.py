"""Training: data stream, loss, AdamW, EMA, validation, checkpoints that carry their config.

A run lives in one folder: `ckpt.pt` (model + EMA + optimiser + RNG states: resuming
continues exactly where it stopped) and `log.jsonl` (one line per evaluation, for plots).
"""
import dataclasses
import json
import lzma
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import bfn, families
from .model import ModelConfig, build

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train"


@dataclasses.dataclass
class TrainConfig:
    data_dir: str = str(DATA)
    code_fraction: float = 0.0     # share of sequences drawn from code.txt.xz
    loss: str = "continuous"       # "continuous" (L^inf), "discrete" (L^n at n_steps, + L^r) or "ce" (t = 0 only)
    n_steps: int = 10              # n for the discrete loss and for validation
    kl_samples: int = 8            # sender samples per Monte Carlo KL (joint byte output)
    chunk_lens: str = ""           # sar: chunk lengths drawn per batch, e.g. "1,2,4" ("": the model's chunk_len)
    aux_ce: float = 0.0            # weight of an extra cross-entropy of p_O at t = 0 (context only)
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.999
    minutes: float = 20.0          # stop after this much training time (this invocation)
    max_steps: int = 0             # or after this many steps in total (0: no limit)
    eval_minutes: float = 2.0
    ckpt_minutes: float = 3.0
    val_bytes: int = 32768
    val_offset: int = 200_000      # the validation slice: valid.txt.xz[val_offset : val_offset + val_bytes]
    seed: int = 0
    threads: int = 0               # 0: torch default
    bf16: bool = True


def read_text(path, limit=None):
    with lzma.open(path, "rb") as f:
        return np.frombuffer(f.read(limit or -1), dtype=np.uint8)


def sequence_batch(data, rng, batch, length):
    starts = rng.integers(0, len(data) - length, batch)
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64))


def step_times(step, n):
    """Steps i = 1..n + 1 of the discrete-time loss -> the time t_{i-1} their input is taken at."""
    return ((step - 1) / n).clamp(max=1.0)


def loss_per_byte(net, x, tcfg, generator, t=None, step=None, chunk_len=None):
    """Training loss in nats per byte for a batch x (B, seq_len); t or step may be given (tests).

    continuous: L^inf with stratified t (sec. 6.10); discrete: L^n + L^r at n = n_steps, one
    sampled step per chunk (sec. 6.9); ce: -log p_O(x) at t = 0 (the autoregressive reference,
    whose n-step code length is this cross-entropy at any n)."""
    cfg, family = net.cfg, net.family
    if chunk_len is None and tcfg.chunk_lens:
        lens = [int(n) for n in tcfg.chunk_lens.split(",")]
        chunk_len = lens[int(torch.randint(len(lens), (), generator=generator))]
    clean, v = net.split(x, chunk_len)
    B, C, L = v.shape[:3]
    context = net.context(clean, chunk_len)
    if tcfg.loss == "continuous":
        if t is None:   # stratified over the batch: lower variance than i.i.d. times
            u = torch.rand(B, C, generator=generator)
            t = (torch.randperm(B * C, generator=generator).reshape(B, C) + u) / (B * C)
        z = bfn.flow_sample(v, t, cfg.beta1, cfg.K, generator)
        loss = families.continuous_loss(family, net(z, t, context), v, t, cfg.beta1)
    elif tcfg.loss == "discrete":
        n = tcfg.n_steps
        if step is None:  # steps 1..n are the KL terms, n + 1 the reconstruction
            step = torch.randint(1, n + 2, (B, C), generator=generator)
        t = step_times(step, n)
        z = bfn.flow_sample(v, t, cfg.beta1, cfg.K, generator)
        log_p = net(z, t, context)
        kl = family.step_kl(log_p, v, bfn.alpha(step.float(), n, cfg.beta1), generator, tcfg.kl_samples)
        per_byte = torch.where((step > n)[..., None], family.reconstruction(log_p, v), kl)
        loss = (n + 1) * per_byte.flatten(1).sum(1)
    else:
        loss = _loss_at_start(net, v, context).flatten(1).sum(1)
    if tcfg.aux_ce:
        loss = loss + tcfg.aux_ce * _loss_at_start(net, v, context).flatten(1).sum(1)
    return loss.mean() / (C * L)


def _loss_at_start(net, v, context):
    """-log p_O(x | theta_0, t = 0) per byte: the prediction from the context alone."""
    B, C = v.shape[:2]
    z = torch.zeros(v.shape + (net.cfg.K,))
    return net.family.reconstruction(net(z, torch.zeros(B, C), context), v)


@torch.no_grad()
def evaluate(net, val, tcfg, n_list=None, chunk_len=None):
    """Validation in bits per byte: L^inf (stratified t), and for each n: L^n, L^r and their sum.
    chunk_len: the chunk length to evaluate a sar model at (default its chunk_len)."""
    cfg, family = net.cfg, net.family
    S = net.seq_len
    x = torch.from_numpy(val[:len(val) // S * S].astype(np.int64)).reshape(-1, S)
    g = torch.Generator().manual_seed(1234)
    clean, v = net.split(x, chunk_len)
    B, C = v.shape[:2]
    context = net.context(clean, chunk_len)
    nbytes = v.shape[:3].numel()
    t = (torch.arange(B * C).reshape(B, C).remainder(64) + torch.rand(B, C, generator=g)) / 64
    z = bfn.flow_sample(v, t, cfg.beta1, cfg.K, g)
    cont = families.continuous_loss(family, net(z, t, context), v, t, cfg.beta1)
    out = {"val_cont": bfn.bits(cont.sum().item()) / nbytes}
    for n in n_list or [tcfg.n_steps]:
        total = 0.0
        for i in range(1, n + 1):
            t = torch.full((B, C), (i - 1) / n)
            z = bfn.flow_sample(v, t, cfg.beta1, cfg.K, g)
            total += family.step_kl(net(z, t, context), v, bfn.alpha(i, n, cfg.beta1), g, tcfg.kl_samples).sum().item()
        z = bfn.flow_sample(v, torch.ones(B, C), cfg.beta1, cfg.K, g)
        rec = family.reconstruction(net(z, torch.ones(B, C), context), v).sum().item()
        out[f"val_n{n}"] = bfn.bits(total) / nbytes
        out[f"val_rec{n}"] = bfn.bits(rec) / nbytes
        out[f"val_total{n}"] = out[f"val_n{n}"] + out[f"val_rec{n}"]
    return out


class Trainer:
    def __init__(self, out_dir, mcfg: ModelConfig, tcfg: TrainConfig, overrides=None):
        """overrides: the train settings given explicitly (None: all of tcfg's); on resuming, only
        budgets and the curriculum (aux_ce, lr) may change, the rest comes from the checkpoint."""
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "ckpt.pt"
        if self.ckpt_path.exists():          # resume: the checkpoint's config wins
            blob = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            mcfg = ModelConfig(**blob["config"]["model"])
            saved = blob["config"]["train"]
            keep = {"minutes", "max_steps", "threads", "eval_minutes", "ckpt_minutes", "data_dir",
                    "aux_ce", "lr", "loss", "code_fraction", "kl_samples", "chunk_lens"}  # budgets, curriculum
            given = keep if overrides is None else keep & set(overrides)
            tcfg = TrainConfig(**{**saved, **{k: getattr(tcfg, k) for k in given}})
        else:
            blob = None
        self.mcfg, self.tcfg = mcfg, tcfg
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        torch.manual_seed(tcfg.seed)
        self.net = build(mcfg)
        self.ema = build(mcfg)
        self.ema.load_state_dict(self.net.state_dict())
        self.ema.requires_grad_(False)
        decay = [p for n, p in self.net.named_parameters() if p.dim() >= 2 and "emb" not in n]
        other = [p for n, p in self.net.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                                      {"params": other, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, 0.98))
        self.rng = np.random.default_rng(tcfg.seed)
        self.gen = torch.Generator().manual_seed(tcfg.seed)
        self.step, self.bytes_seen, self.train_seconds = 0, 0, 0.0
        self.stop_requested = False      # set from a signal handler: stop after this step, evaluate, save
        if blob is not None:
            self.net.load_state_dict(blob["model"])
            self.ema.load_state_dict(blob["ema"])
            self.opt.load_state_dict(blob["opt"])
            self.rng.bit_generator.state = json.loads(blob["numpy_rng"])
            self.gen.set_state(blob["torch_rng"])
            self.step, self.bytes_seen, self.train_seconds = blob["step"], blob["bytes_seen"], blob["train_seconds"]

    def load_data(self):
        d = Path(self.tcfg.data_dir)
        self.train_data = read_text(d / "train.txt.xz")
        self.code_data = read_text(d / "code.txt.xz") if self.tcfg.code_fraction > 0 else None
        off = self.tcfg.val_offset
        self.val_data = read_text(d / "valid.txt.xz", off + self.tcfg.val_bytes)[off:]

    def batch(self):
        S = self.net.seq_len
        B = self.tcfg.batch_size
        n_code = int(self.rng.binomial(B, self.tcfg.code_fraction)) if self.code_data is not None else 0
        parts = [sequence_batch(self.train_data, self.rng, B - n_code, S)]
        if n_code:
            parts.append(sequence_batch(self.code_data, self.rng, n_code, S))
        return torch.cat(parts)

    def save(self):
        blob = {"config": {"model": dataclasses.asdict(self.mcfg), "train": dataclasses.asdict(self.tcfg)},
                "model": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "numpy_rng": json.dumps(self.rng.bit_generator.state), "torch_rng": self.gen.get_state(),
                "step": self.step, "bytes_seen": self.bytes_seen, "train_seconds": self.train_seconds}
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.ckpt_path)

    def train_step(self):
        tcfg = self.tcfg
        lr = tcfg.lr * min(1.0, (self.step + 1) / tcfg.warmup)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = self.batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tcfg.bf16):
            loss = loss_per_byte(self.net, x, tcfg, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        decay = min(tcfg.ema, (1 + self.step) / (10 + self.step))    # short memory early on
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(p, 1 - decay)
        self.step += 1
        self.bytes_seen += x.numel()
        return loss.item()

    def log(self, record):
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, progress=None):
        tcfg = self.tcfg
        self.load_data()
        start, last_eval, last_ckpt = time.time(), time.time(), time.time()
        base_seconds, losses = self.train_seconds, []
        if self.step == 0:
            self.eval_and_log(losses, 0.0)
        while not (tcfg.max_steps and self.step >= tcfg.max_steps):
            losses.append(self.train_step())
            now = time.time()
            self.train_seconds = base_seconds + now - start
            done = (now - start >= tcfg.minutes * 60 or (tcfg.max_steps and self.step >= tcfg.max_steps)
                    or self.stop_requested)
            if progress:
                progress(self.step, losses[-1])
            if done or now - last_eval >= tcfg.eval_minutes * 60:
                self.eval_and_log(losses, now - last_eval)
                losses, last_eval = [], time.time()
            if done or now - last_ckpt >= tcfg.ckpt_minutes * 60:
                self.save()
                last_ckpt = time.time()
            if done:
                return

    def eval_and_log(self, losses, seconds):
        t0 = time.time()
        self.ema.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.tcfg.bf16):
            metrics = evaluate(self.ema, self.val_data, self.tcfg)
        record = {"step": self.step, "bytes": self.bytes_seen, "minutes": self.train_seconds / 60,
                  "train_bpb": bfn.bits(float(np.mean(losses))) if losses else None,
                  "bytes_per_s": (len(losses) * self.tcfg.batch_size * self.net.seq_len / seconds)
                  if seconds else None,
                  **metrics, "eval_seconds": time.time() - t0}
        self.log(record)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}),
              file=sys.stderr, flush=True)
