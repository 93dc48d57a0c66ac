"""Training: data stream, loss, AdamW, EMA, validation, checkpoints that carry their config.

A run lives in one folder: `ckpt.pt` (model + EMA + optimiser + RNG states: resuming
continues exactly where it stopped) and `log.jsonl` (one line per evaluation, for plots).

Beyond one CPU process: `device` puts the model, batches and loss on a GPU ("cuda"), and
under `torchrun` (WORLD_SIZE > 1 in the environment) every process is one rank of
DistributedDataParallel (gloo on the CPU, nccl on CUDA). Ranks draw their own batches and
noise (rank r from seed + r), DDP averages the gradients, so all ranks hold the same
weights; rank 0 alone evaluates, logs and saves. The checkpoint keeps rank 0's generators;
on resuming, with any number of ranks, rank 0 continues them and every other rank r starts
afresh from seed + r + 10^6 step (`rank_seed`). A run of one process continues exactly; a
resumed run of several continues the same way only on rank 0.
"""
import dataclasses
import json
import lzma
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import bfn, families
from .model import ModelConfig, build

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train"


def resumable(default):
    """A TrainConfig field that a resumed run may change (a budget, the curriculum, the device)."""
    return dataclasses.field(default=default, metadata={"resumable": True})


@dataclasses.dataclass
class TrainConfig:
    data_dir: str = resumable(str(DATA))
    code_fraction: float = resumable(0.0)  # share of sequences drawn from code.txt.xz
    loss: str = resumable("continuous")    # "continuous" (L^inf), "discrete" (L^n at n_steps, + L^r) or "ce" (t = 0 only)
    n_steps: int = 10              # n for the discrete loss and for validation
    kl_samples: int = resumable(8)         # sender samples per Monte Carlo KL (joint byte output)
    chunk_lens: str = resumable("")        # sar: chunk lengths drawn per batch, e.g. "1,2,4" ("": the model's chunk_len)
    aux_ce: float = resumable(0.0)         # weight of an extra cross-entropy of p_O at t = 0 (context only)
    batch_size: int = 32
    lr: float = resumable(1e-3)
    cooldown_minutes: float = resumable(0.0)   # lr falls linearly to 0 over the last this many minutes of this
                                           # invocation (a fork to export; the run it forked keeps its lr)
    init_from: str = ""            # a new run starts from this weights file or checkpoint: its model config, with
                                   # the model options given (fewer kv_heads: each new head the mean of the old)
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.999
    minutes: float = resumable(20.0)       # stop after this much training time (this invocation)
    max_steps: int = resumable(0)          # or after this many steps in total (0: no limit)
    eval_minutes: float = resumable(2.0)
    ckpt_minutes: float = resumable(3.0)
    val_bytes: int = 32768
    val_offset: int = 200_000      # the validation slice: valid.txt.xz[val_offset : val_offset + val_bytes]
    seed: int = 0
    threads: int = resumable(0)            # 0: torch default
    bf16: bool = True
    device: str = resumable("cpu")         # "cpu" or "cuda" (model, batches and loss there; the generators stay on the CPU)
    compile: bool = resumable(False)       # torch.compile the network (measured on the CPU at 1-3M parameters: 5-20 %
                                           # faster with bf16, slower without; about a minute of compiling per shape)

    @classmethod
    def resumable_fields(cls):
        return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable")}


def read_text(path, limit=None):
    with lzma.open(path, "rb") as f:
        return np.frombuffer(f.read(limit or -1), dtype=np.uint8)


def sequence_batch(data, rng, batch, length):
    starts = rng.integers(0, len(data) - length, batch)
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64))


def device_generator(generator, device):
    """The generator for draws made on `device`: `generator` itself on the CPU, elsewhere a
    generator there seeded by one draw from it, so the CPU generator alone still decides
    every draw (a resumed run continues the same way) and a CPU run is unchanged."""
    if device.type == "cpu":
        return generator
    return torch.Generator(device).manual_seed(int(torch.randint(2 ** 62, (), generator=generator)))


def rank_seed(seed, rank, step):
    """Seed of rank `rank`'s generators when a run (re)starts at `step`: seed + rank at step 0
    (rank 0 of a run is then a single process's run); a resumed rank > 0, whose generators
    the checkpoint does not keep, starts afresh at seed + rank + 10^6 step."""
    return seed + rank + 1_000_000 * step


def loss_per_byte(net, x, tcfg, generator, t=None, step=None, chunk_len=None):
    """Training loss in nats per byte for a batch x (B, seq_len); t or step may be given (tests).

    continuous: L^inf with stratified t (sec. 6.10); discrete: L^n + L^r at n = n_steps, one
    sampled step per chunk (sec. 6.9); ce: -log p_O(x) at t = 0 (the autoregressive reference,
    whose n-step code length is this cross-entropy at any n).
    generator: a CPU generator; times are drawn from it and moved to x's device, the noise is
    drawn there (`device_generator`)."""
    cfg, family = net.cfg, net.family
    if chunk_len is None and tcfg.chunk_lens:
        lens = [int(n) for n in tcfg.chunk_lens.split(",")]
        chunk_len = lens[int(torch.randint(len(lens), (), generator=generator))]
    noise = device_generator(generator, x.device)
    clean, v = net.split(x, chunk_len)
    B, C, L = v.shape[:3]
    context = net.context(clean, chunk_len)
    if tcfg.loss == "continuous":
        if t is None:   # stratified over the batch: lower variance than i.i.d. times
            u = torch.rand(B, C, generator=generator)
            t = ((torch.randperm(B * C, generator=generator).reshape(B, C) + u) / (B * C)).to(x.device)
        z = bfn.flow_sample(v, t, cfg.beta1, cfg.K, noise)
        loss = families.continuous_loss(family, net(z, t, context), v, t, cfg.beta1)
    elif tcfg.loss == "discrete":
        n = tcfg.n_steps
        if step is None:  # steps 1..n are the KL terms, n + 1 the reconstruction
            step = torch.randint(1, n + 2, (B, C), generator=generator).to(x.device)
        term = families.step_term(family, lambda z, t: net(z, t, context), v, step, n, cfg.beta1, noise,
                                  tcfg.kl_samples)
        loss = (n + 1) * term.flatten(1).sum(1)
    else:
        loss = _loss_at_start(net, v, context).flatten(1).sum(1)
    if tcfg.aux_ce:
        loss = loss + tcfg.aux_ce * _loss_at_start(net, v, context).flatten(1).sum(1)
    return loss.mean() / (C * L)


def _loss_at_start(net, v, context):
    """-log p_O(x | theta_0, t = 0) per byte: the prediction from the context alone."""
    B, C = v.shape[:2]
    z = torch.zeros(v.shape + (net.cfg.K,), device=v.device)
    return net.family.reconstruction(net(z, torch.zeros(B, C, device=v.device), context), v)


@torch.no_grad()
def evaluate(net, val, tcfg, n_list=None, chunk_len=None):
    """Validation in bits per byte: L^inf (stratified t), and for each n: L^n, L^r and their sum.
    chunk_len: the chunk length to evaluate a sar model at (default its chunk_len)."""
    cfg, family = net.cfg, net.family
    S = net.seq_len
    dev = next(net.parameters()).device
    x = torch.from_numpy(val[:len(val) // S * S].astype(np.int64)).reshape(-1, S).to(dev)
    g = torch.Generator().manual_seed(1234)
    noise = device_generator(g, dev)
    clean, v = net.split(x, chunk_len)
    B, C = v.shape[:2]
    context = net.context(clean, chunk_len)
    nbytes = v.shape[:3].numel()
    t = ((torch.arange(B * C).reshape(B, C).remainder(64) + torch.rand(B, C, generator=g)) / 64).to(dev)
    z = bfn.flow_sample(v, t, cfg.beta1, cfg.K, noise)
    cont = families.continuous_loss(family, net(z, t, context), v, t, cfg.beta1)
    out = {"val_cont": bfn.bits(cont.sum().item()) / nbytes}
    for n in n_list or [tcfg.n_steps]:
        kl, rec = families.n_step_loss(family, lambda z, t: net(z, t, context), v, n, cfg.beta1, noise,
                                       tcfg.kl_samples)
        out[f"val_n{n}"] = bfn.bits(kl) / nbytes
        out[f"val_rec{n}"] = bfn.bits(rec) / nbytes
        out[f"val_total{n}"] = out[f"val_n{n}"] + out[f"val_rec{n}"]
    return out


class _Loss(torch.nn.Module):
    """The training loss as one module call, so that DistributedDataParallel sees every use
    of the weights (the context pass and the per-step network) in its forward."""

    def __init__(self, net, tcfg):
        super().__init__()
        self.net, self.tcfg = net, tcfg

    def forward(self, x, generator):
        return loss_per_byte(self.net, x, self.tcfg, generator)


def learning_rate(tcfg, step, remaining_seconds):
    """Linear warm-up over the first `warmup` steps, then constant, and with `cooldown_minutes`
    falling linearly to 0 as the invocation's time runs out."""
    scale = min(1.0, (step + 1) / tcfg.warmup)
    if tcfg.cooldown_minutes > 0:
        scale *= min(1.0, max(0.0, remaining_seconds / (60 * tcfg.cooldown_minutes)))
    return tcfg.lr * scale


def _initial_state(path, mcfg, overrides):
    """(parameters, config) of a new run started from a weights file or checkpoint: the file's
    model config with the model options given explicitly (overrides; None: all of mcfg), its EMA
    weights, the context network's key/value heads averaged in groups where kv_heads falls
    (mean-pooled heads, as in grouped-query attention uptraining, Ainslie et al. 2023)."""
    from .model import load_weights, regroup_kv_heads
    model, _, _ = load_weights(path, dtype=torch.float32)
    given = {f.name for f in dataclasses.fields(ModelConfig)}
    if overrides is not None:
        given &= set(overrides)
    cfg = dataclasses.replace(model.cfg, **{k: getattr(mcfg, k) for k in given})
    state = model.state_dict()
    if cfg.kv_heads != model.cfg.kv_heads:
        state = regroup_kv_heads(state, model.cfg, cfg.kv_heads)
    return state, cfg


def _to_cpu(state):
    """A state dict (nested dicts and lists of tensors) with every tensor on the CPU."""
    if torch.is_tensor(state):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state


def _join(device):
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE > 1) it joins
    the process group: gloo on the CPU, nccl on CUDA, one GPU per process (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class Trainer:
    def __init__(self, out_dir, mcfg: ModelConfig, tcfg: TrainConfig, overrides=None):
        """overrides: the train settings given explicitly (None: all of tcfg's); on resuming, only
        budgets, the curriculum (aux_ce, lr) and where it runs may change, the rest comes from
        the checkpoint."""
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "ckpt.pt"
        if self.ckpt_path.exists():          # resume: the checkpoint's config wins
            blob = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            mcfg = ModelConfig(**blob["config"]["model"])
            saved = blob["config"]["train"]
            keep = TrainConfig.resumable_fields()
            given = keep if overrides is None else keep & set(overrides)
            tcfg = TrainConfig(**{**saved, **{k: getattr(tcfg, k) for k in given}})
        else:
            blob = None
        start = None
        if blob is None and tcfg.init_from:
            start, mcfg = _initial_state(tcfg.init_from, mcfg, overrides)
        self.mcfg, self.tcfg = mcfg, tcfg
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        self.rank, self.world, self.device = _join(tcfg.device)
        torch.manual_seed(tcfg.seed)
        self.net = build(mcfg)
        if start is not None:
            self.net.load_state_dict(start)
        self.ema = build(mcfg)
        self.ema.load_state_dict(self.net.state_dict())
        self.ema.requires_grad_(False)
        self.net.to(self.device)
        self.ema.to(self.device)
        decay = [p for n, p in self.net.named_parameters() if p.dim() >= 2 and "emb" not in n]
        other = [p for n, p in self.net.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                                      {"params": other, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, 0.98))
        self.step, self.bytes_seen, self.train_seconds = 0, 0, 0.0
        self.stop_requested = False      # set from a signal handler: stop after this step, evaluate, save
        if blob is not None:
            self.net.load_state_dict(blob["model"])
            self.ema.load_state_dict(blob["ema"])
            self.opt.load_state_dict(blob["opt"])
            self.step, self.bytes_seen, self.train_seconds = blob["step"], blob["bytes_seen"], blob["train_seconds"]
        seed = rank_seed(tcfg.seed, self.rank, self.step)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        if blob is not None and self.rank == 0:      # the checkpoint holds rank 0's generators: continue them
            self.rng.bit_generator.state = json.loads(blob["numpy_rng"])
            self.gen.set_state(blob["torch_rng"])
        net = torch.compile(self.net) if tcfg.compile else self.net
        self.loss = _Loss(net, tcfg)
        if self.world > 1:   # averages all ranks' gradients in backward (static: each step uses the same weights)
            self.loss = torch.nn.parallel.DistributedDataParallel(self.loss, static_graph=True)

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
        """Write the checkpoint (CPU tensors: it loads on any device) atomically; rank 0's generators."""
        blob = {"config": {"model": dataclasses.asdict(self.mcfg), "train": dataclasses.asdict(self.tcfg)},
                "model": _to_cpu(self.net.state_dict()), "ema": _to_cpu(self.ema.state_dict()),
                "opt": _to_cpu(self.opt.state_dict()),
                "numpy_rng": json.dumps(self.rng.bit_generator.state), "torch_rng": self.gen.get_state(),
                "step": self.step, "bytes_seen": self.bytes_seen, "train_seconds": self.train_seconds}
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.ckpt_path)

    def train_step(self, remaining_seconds=float("inf")):
        tcfg = self.tcfg
        lr = learning_rate(tcfg, self.step, remaining_seconds)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x = self.batch().to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tcfg.bf16):
            loss = self.loss(x, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        decay = min(tcfg.ema, (1 + self.step) / (10 + self.step))    # short memory early on
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(p, 1 - decay)
        self.step += 1
        self.bytes_seen += x.numel() * self.world
        return loss.item()

    def log(self, record):
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def agree(self, loss, done):
        """All ranks: (the mean of their losses, whether any of them is done), so that they
        stop at the same step."""
        both = torch.tensor([loss, float(done)], dtype=torch.float64, device=self.device)
        dist.all_reduce(both)
        return both[0].item() / self.world, both[1].item() > 0

    def run(self, progress=None):
        tcfg = self.tcfg
        self.load_data()
        start, last_eval, last_ckpt = time.time(), time.time(), time.time()
        base_seconds, losses = self.train_seconds, []
        if self.step == 0 and self.rank == 0:
            self.eval_and_log(losses, 0.0)
        while not (tcfg.max_steps and self.step >= tcfg.max_steps):
            loss = self.train_step(self.seconds_left(start))
            now = time.time()
            self.train_seconds = base_seconds + now - start
            done = bool(now - start >= tcfg.minutes * 60 or (tcfg.max_steps and self.step >= tcfg.max_steps)
                        or self.stop_requested)
            if self.world > 1:
                loss, done = self.agree(loss, done)
            losses.append(loss)
            if progress:
                progress(self.step, losses[-1])
            if self.rank == 0 and (done or now - last_eval >= tcfg.eval_minutes * 60):
                self.eval_and_log(losses, now - last_eval)
                losses, last_eval = [], time.time()
            if self.rank == 0 and (done or now - last_ckpt >= tcfg.ckpt_minutes * 60):
                self.save()
                last_ckpt = time.time()
            if done:
                if self.world > 1:           # no rank leaves before rank 0 has saved
                    dist.barrier()
                return

    def seconds_left(self, start):
        """Of this invocation's time; with several ranks and a cool-down, rank 0's clock for all."""
        left = self.tcfg.minutes * 60 - (time.time() - start)
        if self.world > 1 and self.tcfg.cooldown_minutes > 0:       # every rank the same learning rate
            left = torch.tensor([left], dtype=torch.float64, device=self.device)
            dist.broadcast(left, 0)
            left = left.item()
        return left

    def eval_and_log(self, losses, seconds):
        t0 = time.time()
        self.ema.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.tcfg.bf16):
            metrics = evaluate(self.ema, self.val_data, self.tcfg)
            for L in sorted({int(n) for n in self.tcfg.chunk_lens.split(",") if n} - {self.mcfg.chunk_len}):
                res = evaluate(self.ema, self.val_data, self.tcfg, chunk_len=L)    # each other trained length
                metrics[f"val_total{self.tcfg.n_steps}_L{L}"] = res[f"val_total{self.tcfg.n_steps}"]
        record = {"step": self.step, "bytes": self.bytes_seen, "minutes": self.train_seconds / 60,
                  "train_bpb": bfn.bits(float(np.mean(losses))) if losses else None,
                  "bytes_per_s": (len(losses) * self.world * self.tcfg.batch_size * self.net.seq_len / seconds)
                  if seconds else None,
                  **metrics, "eval_seconds": time.time() - t0}
        self.log(record)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}),
              file=sys.stderr, flush=True)
