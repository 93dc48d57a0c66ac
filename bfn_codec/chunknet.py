"""The chunk network (arch "chunk"): one transformer over a chunk's noisy positions and the
clean bytes before it.

A chunk of L positions is seen through its logits z and the time t. It may also see the
clean bytes that precede it (the context), which the decoder already knows. The context
tokens attend causally among themselves only, so their keys and values do not depend on z
or t: `context()` computes them once per chunk and `forward()` reuses them at every step.

In training one sequence of W + L bytes holds C = W / L + 1 chunks; chunk j sees the
first j L context bytes, exactly as it would in a file. The output goes through the output
family (families.py): delta = 0 is the exact posterior under a uniform prior.
"""
import torch
import torch.nn as nn

from .families import family_of, to_vars
from .layers import Block, Gelu, rotary_tables, time_features


class ChunkNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.family = family_of(cfg)
        self.chunk_lens = (cfg.chunk_len,)                  # what it can code with
        d = cfg.d_model
        self.symbol_emb = nn.Embedding(cfg.n_symbols, d)
        self.theta_in = nn.Linear(cfg.V, d)
        self.pos_emb = None if cfg.rope else nn.Embedding(cfg.context_len + cfg.chunk_len, d)
        self.time_mlp = nn.Sequential(nn.Linear(32, d), Gelu(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.rope) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.family.n_out)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def seq_len(self):
        return self.cfg.context_len + self.cfg.chunk_len

    def split(self, x, chunk_len=None):
        """(B, W + L) training bytes -> clean context (B, W) and variables of C chunks (B, C, L, V)."""
        C = self.cfg.context_len // self.cfg.chunk_len + 1
        return x[:, :self.cfg.context_len], to_vars(x.reshape(len(x), C, self.cfg.chunk_len), self.cfg)

    def rotary_tables(self, pos, dtype):
        return rotary_tables(pos, self.cfg.d_model // self.cfg.n_heads, dtype) if self.cfg.rope else None

    def context(self, ctx, chunk_len=None):
        """Keys and values of the clean context bytes ctx (B, W), one pair per layer (None if W = 0)."""
        B, W = ctx.shape
        if not W:
            return None
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
        """log p_O(. | theta, t) for C chunks: z (B, C, L, V, 2), t (B, C).

        cache: `context(ctx)` for the W clean bytes before the last chunk; chunk j sees
        the first W - (C - 1 - j) L of them (C = 1 when coding: the chunk sees them all).
        """
        B, C, L, V, K = z.shape
        W = 0 if cache is None else cache[0][0].shape[2]
        dev = z.device
        theta = z.softmax(-1)
        start = W - (C - 1 - torch.arange(C, device=dev)) * L          # visible context per chunk
        pos = (start[:, None] + torch.arange(L, device=dev)).reshape(-1)
        temb = self.time_mlp(time_features(t.to(z.dtype)))              # (B, C, d)
        h = self.theta_in(2 * theta[..., 1] - 1) + temb[:, :, None]
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
        delta = self.head(self.ln_out(h)).reshape(B, C, L, -1)
        return self.family.log_probs(z, delta)

    def coding_context(self, integer=False, compiled=False):
        if integer or compiled:
            raise ValueError("the chunk design codes in float64 only")
        return WindowContext(self)

    @torch.no_grad()
    def prepare(self, window):
        """A chunk's context for `forward`: the keys and values of its window."""
        return self.context(window)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


class WindowContext:
    """The chunk network at coding time, for a batch of lanes: the last `context_len` clean
    bytes of each. `advance(previous_chunks)` takes the previous chunk of each lane still
    going (equal lengths) and returns the next chunks' windows (lanes, <= W); `ChunkNet.prepare`
    turns windows into their keys and values, afresh for every chunk."""

    def __init__(self, net):
        self.W = net.cfg.context_len
        self.window = None

    def advance(self, previous_chunks):
        new = torch.tensor([[int(b) for b in chunk] for chunk in previous_chunks], dtype=torch.long)
        new = new.reshape(len(previous_chunks), -1)
        window = new if self.window is None else torch.cat([self.window[:len(new)], new], 1)
        self.window = window[:, max(0, window.shape[1] - self.W):]
        return self.window
