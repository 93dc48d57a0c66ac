"""The network Psi(theta, t | context): a transformer over the byte positions of a chunk.

A chunk of L positions (V variables of K classes each; bytes are V = 8 bits, K = 2) is
seen through its logits z and the time t. It may also see the clean symbols that precede
it (the context), which the decoder already knows. The context tokens attend causally
among themselves only, so their keys and values do not depend on z or t: `context()`
computes them once per chunk and `forward()` reuses them at every step.

In training one sequence of W + L symbols holds C = W / L + 1 chunks; chunk j sees the
first j L context symbols, exactly as it would in a file. The output distribution is
p_O = softmax(log theta + delta): the network only adds what the variable's own evidence
does not already say (delta = 0 is the exact posterior under a uniform prior).
"""
import dataclasses
import hashlib
import io
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT = 1


@dataclasses.dataclass
class ModelConfig:
    K: int = 2                # classes per variable
    V: int = 8                # variables per position (8 bits per byte)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    chunk_len: int = 64       # L: positions per chunk
    context_len: int = 192    # W: clean symbols before a chunk (a multiple of chunk_len, or 0)
    beta1: float = 3.0
    residual: bool = True     # p_O = softmax(log theta + delta) instead of softmax(delta)
    rope: bool = False        # rotary (relative) positions in attention instead of learned absolute ones

    @property
    def n_symbols(self):
        return self.K ** self.V


def to_vars(symbols, cfg):
    """Symbols in [0, K^V) -> (..., V) variables, most significant first (bytes -> bits)."""
    powers = cfg.K ** torch.arange(cfg.V - 1, -1, -1, device=symbols.device)
    return (symbols.long().unsqueeze(-1) // powers) % cfg.K


def to_symbols(variables, cfg):
    powers = cfg.K ** torch.arange(cfg.V - 1, -1, -1, device=variables.device)
    return (variables.long() * powers).sum(-1)


def rotary_tables(pos, head_dim, dtype):
    """cos and sin of the rotary angles (RoPE) for positions pos, in float64 for float64
    networks and float32 otherwise: computed once per forward, cast to q/k's dtype in rotary."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    half = head_dim // 2
    angle = pos.to(wide)[:, None] * 10000.0 ** (-torch.arange(half, dtype=wide, device=pos.device) / half)
    return angle.cos(), angle.sin()


def rotary(x, tables):
    """Rotate query/key channel pairs by angles proportional to the position."""
    cos, sin = (table.to(x.dtype) for table in tables)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(nn.Module):
    def __init__(self, d, n_heads, rope=False):
        super().__init__()
        self.n_heads, self.rope = n_heads, rope
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def heads(self, h, tables=None):
        B, T, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).reshape(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotary(q, tables), rotary(k, tables)
        return q, k, v

    def finish(self, h, q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.proj(a.transpose(1, 2).reshape(h.shape))
        return h + self.mlp(self.ln2(h))


class BFNNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.n_in = cfg.V if cfg.K == 2 else cfg.V * cfg.K
        self.n_out = cfg.V if cfg.K == 2 else cfg.V * cfg.K
        self.symbol_emb = nn.Embedding(cfg.n_symbols, d)
        self.theta_in = nn.Linear(self.n_in, d)
        self.pos_emb = None if cfg.rope else nn.Embedding(cfg.context_len + cfg.chunk_len, d)
        self.time_mlp = nn.Sequential(nn.Linear(32, d), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.rope) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.n_out)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(16.0) / 16, persistent=False)

    def rotary_tables(self, pos, dtype):
        return rotary_tables(pos, self.cfg.d_model // self.cfg.n_heads, dtype) if self.cfg.rope else None

    def context(self, ctx):
        """Keys and values of the clean context symbols ctx (B, W), one pair per layer."""
        B, W = ctx.shape
        pos = torch.arange(W, device=ctx.device)
        h = self.symbol_emb(ctx) + (0 if self.pos_emb is None else self.pos_emb(pos))
        causal = torch.ones(W, W, dtype=torch.bool, device=ctx.device).tril()
        tables = self.rotary_tables(pos, h.dtype)
        cache = []
        for block in self.blocks:
            q, k, v = block.heads(h, tables)
            cache.append((k, v))
            h = block.finish(h, q, k, v, causal)
        return cache

    def forward(self, z, t, cache=None):
        """log p_O(. | theta, t) for C chunks: z (B, C, L, V, K), t (B, C) -> (B, C, L, V, K).

        cache: `context(ctx)` for the W clean symbols before the last chunk; chunk j sees
        the first W - (C - 1 - j) L of them (C = 1 when coding: the chunk sees them all).
        """
        cfg = self.cfg
        B, C, L, V, K = z.shape
        W = 0 if cache is None else cache[0][0].shape[2]
        dev = z.device
        theta = z.softmax(-1)
        feats = (2 * theta[..., 1] - 1) if K == 2 else (2 * theta - 1).flatten(-2)
        start = W - (C - 1 - torch.arange(C, device=dev)) * L          # visible context per chunk
        pos = (start[:, None] + torch.arange(L, device=dev)).reshape(-1)
        tf = t.to(z.dtype)[..., None] * self.freqs.to(z.dtype)
        temb = self.time_mlp(torch.cat([tf.sin(), tf.cos()], -1))          # (B, C, d)
        h = self.theta_in(feats) + temb[:, :, None]
        h = h.reshape(B, C * L, -1) + (0 if self.pos_emb is None else self.pos_emb(pos))
        chunk_of = torch.arange(C, device=dev).repeat_interleave(L)
        mask = chunk_of[:, None] == chunk_of[None, :]
        if W:
            see_ctx = torch.arange(W, device=dev)[None, :] < start[chunk_of][:, None]
            mask = torch.cat([see_ctx, mask], 1)
        tables = self.rotary_tables(pos, h.dtype)
        for li, block in enumerate(self.blocks):
            q, k, v = block.heads(h, tables)
            if W:
                k = torch.cat([cache[li][0], k], 2)
                v = torch.cat([cache[li][1], v], 2)
            h = block.finish(h, q, k, v, mask)
        delta = self.head(self.ln_out(h)).reshape(B, C, L, V, -1)
        if K == 2:
            delta = torch.cat([torch.zeros_like(delta), delta], -1)
        return (z + delta if cfg.residual else delta).log_softmax(-1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# ---- weights files: config + tensors, loaded without executing pickled code ----

def save_weights(path, model, dtype=torch.float16, extra=None):
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "config": dataclasses.asdict(model.cfg), "state": state,
                "extra": extra or {}}, path)


def fingerprint(config, state):
    """A short hash of the config and the exact stored tensors: names the model a file needs."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        buf = io.BytesIO()
        tensor = state[name].contiguous().cpu()
        buf.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        h.update(buf.getvalue())
    return h.hexdigest()[:16]


class ModelError(ValueError):
    """A weights file that is missing or cannot be loaded."""


def load_weights(path, dtype=torch.float64):
    """-> (model in eval mode, fingerprint, extra). Accepts shipped weights or a training checkpoint."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if "ema" in blob:                       # a training checkpoint: use its EMA weights
            blob = {"config": blob["config"]["model"], "state": blob["ema"], "extra": {}}
        cfg = ModelConfig(**blob["config"])
        model = BFNNet(cfg)
        model.load_state_dict(blob["state"])
    except FileNotFoundError:
        raise ModelError(f"no model at {path}") from None
    except Exception as e:
        raise ModelError(f"{path}: not a bfn-codec weights file ({type(e).__name__})") from None
    model.to(dtype).eval()
    return model, fingerprint(blob["config"], blob["state"]), blob.get("extra", {})


@torch.no_grad()
def generate(model, length, steps, generator=None, prompt=b""):
    """Bytes from n-step sampling (bfn.sample), chunk by chunk, each seeing the bytes before it."""
    from . import bfn
    cfg = model.cfg
    out = torch.tensor(list(prompt), dtype=torch.long)
    while len(out) < len(prompt) + length:
        ctx = out[max(0, len(out) - cfg.context_len):] if cfg.context_len else out[:0]
        cache = model.context(ctx[None]) if len(ctx) else None
        net = lambda z, t: model(z[:, None].to(model.head.weight.dtype), t[:, None].to(model.head.weight.dtype), cache)[:, 0]
        chunk = bfn.sample(net, (1, cfg.chunk_len, cfg.V), steps, cfg.beta1, cfg.K, generator)
        out = torch.cat([out, to_symbols(chunk[0], cfg)])
    return bytes(out[len(prompt):len(prompt) + length].tolist())
