"""Semi-autoregressive BFN network: a causal context network over the clean bytes, run
once per chunk, and a small per-step network over the chunk's noisy beliefs.

The context network is a causal transformer (rotary positions) over [BOS, x_0, x_1, ...];
its state after token a summarises the clean bytes x_{<a}: the chunk that starts at byte a
reads it. At coding time its keys and values are cached (`ContextCache`), so each chunk
adds only the bytes of the chunk before it, over a window of `context_len` tokens.

The per-step network sees one chunk of L bytes: each byte's beliefs (the bits' logits as
2 theta - 1, and the soft byte embedding sum_b p(b | theta) e_b of the 256-way distribution
of the independent beliefs), its position in the chunk, the time t (sec. 6.6) and the
context state; `step_layers` transformer blocks attend within the chunk. It runs n times
per chunk. Its output `delta` goes through the output family (families.py): delta is a
prior for each position of the chunk, read from the context state alone (the t = 0
prediction, which the exact Bayesian update would keep), plus the per-step network's
correction.

`step_layers = 0` with L = 1 is the autoregressive reference: delta comes from the context
state alone, p_O is the exact Bayesian posterior of a once-per-byte prediction, and the
n-step code length equals that prediction's cross-entropy at any n.

In training one sequence of `context_len` bytes holds C = context_len / L chunks, each with
its own t; the context network runs once over the clean sequence. `cfg.chunk_len` is the
longest chunk the per-step network knows; a model trained on several chunk lengths
(`TrainConfig.chunk_lens`) codes files at any of them (`bfn-compress --chunk-len`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .families import family_of, to_vars
from .layers import Block, Gelu, rotary_tables, time_features

BOS = 256


class SARNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.context_len % cfg.chunk_len:
            raise ValueError("context_len must be a multiple of chunk_len")
        self.chunk_lens = range(1, cfg.chunk_len + 1)      # what it can code with
        if cfg.local_layers and not (cfg.local_layers <= cfg.n_layers and cfg.local_window >= 1):
            raise ValueError("local_layers must be at most n_layers, with a local_window of at least 1")
        if cfg.step_layers == 0 and cfg.chunk_len != 1:
            raise ValueError("step_layers = 0 (the autoregressive reference) needs chunk_len 1")
        self.cfg = cfg
        self.family = family_of(cfg)
        d, ds = cfg.d_model, cfg.step_d_model
        self.byte_emb = nn.Embedding(257, d)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, rope=True, kv_heads=cfg.kv_heads)
                                    for _ in range(cfg.n_layers))
        self.ln_ctx = nn.LayerNorm(d)
        self.ctx_out = nn.Linear(d, ds)
        if cfg.step_layers:
            self.bits_in = nn.Linear(cfg.V, ds)
            self.soft_emb = nn.Linear(2 ** cfg.V, ds, bias=False)
            self.pos_emb = nn.Embedding(cfg.chunk_len, ds)
            self.time_mlp = nn.Sequential(nn.Linear(32, ds), Gelu(), nn.Linear(ds, ds))
            self.step_blocks = nn.ModuleList(Block(ds, cfg.step_heads) for _ in range(cfg.step_layers))
            self.prior = nn.Linear(ds, cfg.chunk_len * self.family.n_out)     # the chunk's t = 0 prediction
            nn.init.zeros_(self.prior.weight)
            nn.init.zeros_(self.prior.bias)
        self.ln_out = nn.LayerNorm(ds)
        self.head = nn.Linear(ds, self.family.n_out)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def seq_len(self):
        return self.cfg.context_len

    def split(self, x, chunk_len=None):
        """(B, T) training bytes -> (the clean bytes, variables (B, C, L, V)); L: chunk_len,
        at most cfg.chunk_len (the chunk positions the per-step network knows)."""
        B, T = x.shape
        L = chunk_len or self.cfg.chunk_len
        return x, to_vars(x.reshape(B, T // L, L), self.cfg)

    def context(self, x, chunk_len=None):
        """Context states of all chunks of length chunk_len of a clean sequence x (B, T) -> (B, C, ds)."""
        B, T = x.shape
        tokens = torch.cat([torch.full((B, 1), BOS, dtype=x.dtype, device=x.device), x[:, :-1]], 1)
        h = self.byte_emb(tokens)
        tables = rotary_tables(torch.arange(T, device=x.device), self.cfg.d_model // self.cfg.n_heads, h.dtype)
        local = self.visible(torch.arange(T, device=x.device), torch.arange(T, device=x.device), True) \
            if self.cfg.local_layers else None
        for i, block in enumerate(self.blocks):
            q, k, v = block.heads(h, tables)
            h = block.finish(h, q, k, v, local) if self.is_local(i) else block.finish(h, q, k, v, causal=True)
        return self.ctx_out(self.ln_ctx(h[:, ::chunk_len or self.cfg.chunk_len]))

    def is_local(self, layer):
        return layer < self.cfg.local_layers       # the config check ensures a local_window of at least 1

    def visible(self, queries, keys, local):
        """Which keys each query sees (token numbers (T,) and (S,) -> (T, S) bools): those not after
        it, and in a local layer only the last local_window of them."""
        ago = queries[:, None] - keys[None, :]
        return (ago >= 0) & (ago < self.cfg.local_window) if local else ago >= 0

    def forward(self, z, t, state):
        """log p_O for chunks: z (B, C, L, V, 2), t (B, C) (or (1, 1): the same for all), state
        (B, C, ds) from `context`."""
        B, C, L = z.shape[:3]
        if not self.cfg.step_layers:
            return self.family.log_probs(z, self.head(self.ln_out(state))[:, :, None])
        theta1 = z.softmax(-1)[..., 1]
        evidence = self.family.evidence(z)                  # (B, C, L, 256): the soft embedding's and the output's
        h = (self.bits_in(2 * theta1 - 1) + self.soft_emb(evidence.softmax(-1).to(theta1.dtype))
             + self.pos_emb.weight[:L].to(z.dtype) + (state + self.time_mlp(time_features(t.to(z.dtype))))[:, :, None])
        h = h.reshape(B * C, L, -1)
        for block in self.step_blocks:
            if L == 1:                  # one-byte chunks: attention returns the byte's value
                h = block.alone(h)
            else:
                q, k, v = block.heads(h)
                h = block.finish(h, q, k, v)
        rows = L * self.family.n_out                 # the prior of the chunk's L positions
        prior = F.linear(state, self.prior.weight[:rows], self.prior.bias[:rows]).reshape(B, C, L, -1)
        delta = self.head(self.ln_out(h)).reshape(B, C, L, -1) + prior
        return self.family.log_probs(z, delta, evidence)

    def coding_context(self, integer=False, compiled=False):
        """The coding-time context network (`ContextCache`); integer: its products on int8 grids
        (exact.py); compiled: all of it in the compiled kernel (context.py)."""
        if compiled:
            from .context import CompiledContext
            return CompiledContext(self)
        return ContextCache(self, integer)

    def prepare(self, state):
        return state

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


class ContextCache:
    """The context network at coding time, for a batch of lanes: keys and values of the last
    `context_len` tokens of every lane, extended by each chunk's bytes once they are known.
    `advance(previous_chunks)` takes the previous chunk of each lane still going (equal
    lengths; the lanes that stopped are the last ones) and returns the next chunk's context
    states (lanes, 1, ds); the first call puts the BOS token first. Encoder and decoder call
    it with the same shapes in the same order, so both compute identical states. integer:
    the blocks' products run on int8 grids (exact.IntBlock), the same bits on every machine."""

    SLACK = 256            # tokens written past the window before the buffers are compacted

    def __init__(self, net, integer=False):
        self.net = net
        if integer:
            from .exact import IntBlock, IntLinear
            self.blocks, self.ctx_out = [IntBlock(block) for block in net.blocks], IntLinear(net.ctx_out)
        else:
            self.blocks, self.ctx_out = list(net.blocks), net.ctx_out
        self.rows = None                    # per layer: what the block keeps per token, (lanes, kv_heads, W + SLACK, ...)
        self.base = self.pos = 0            # token number of buffer row 0; tokens so far

    @torch.no_grad()
    def advance(self, previous_chunks):
        net, W = self.net, self.net.cfg.context_len
        dtype = net.head.weight.dtype
        rows = [([] if self.pos else [BOS]) + [int(b) for b in chunk] for chunk in previous_chunks]
        tokens = torch.tensor(rows, dtype=torch.long)
        lanes, m = tokens.shape
        h = net.byte_emb(tokens).to(dtype)
        tables = rotary_tables(torch.arange(self.pos, self.pos + m), net.cfg.d_model // net.cfg.n_heads, dtype)
        if self.rows is not None and self.pos + m - self.base > self.rows[0][0].shape[2]:   # compact: keep the last W
            keep = min(W, self.pos - self.base)
            for buf in (buf for layer in self.rows for buf in layer):
                buf[:, :, :keep] = buf[:, :, self.pos - self.base - keep:self.pos - self.base].clone()
            self.base = self.pos - keep
        at = self.pos - self.base                                  # the new tokens' first row
        views = {}               # global or local layers: (the first row they read, mask; one new token sees all)
        for local in {net.is_local(i) for i in range(len(self.blocks))}:
            lo = max(0, at - (min(W, net.cfg.local_window - 1) if local else W))
            views[local] = lo, (net.visible(torch.arange(at, at + m), torch.arange(lo, at + m), local) if m > 1
                                else None)
        if self.rows is None:
            self.rows = [None] * len(self.blocks)
        for i, block in enumerate(self.blocks):
            q, k, v = block.heads(h, tables)
            new = block.cache_rows(k, v)
            if self.rows[i] is None:      # the longest call: BOS and a chunk
                size = W + max(self.SLACK, net.cfg.chunk_len + 1)
                self.rows[i] = [torch.zeros((lanes, a.shape[1], size) + a.shape[3:], dtype=a.dtype) for a in new]
            for buf, a in zip(self.rows[i], new):
                buf[:lanes, :, at:at + m] = a
            lo, mask = views[net.is_local(i)]
            h = block.finish(h, q, *block.from_cache(*(buf[:lanes, :, lo:at + m] for buf in self.rows[i])), mask)
        self.pos += m
        return self.ctx_out(net.ln_ctx(h[:, -1:]))
