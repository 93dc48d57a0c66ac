"""Transformer pieces shared by the networks: blocks, rotary positions, time features."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_FREQS = math.pi * 2.0 ** torch.arange(16.0) / 16


def time_features(t):
    """(...,) times -> (..., 32) sines and cosines at 16 octave-spaced frequencies."""
    tf = t[..., None] * _FREQS.to(t.device, t.dtype)
    return torch.cat([tf.sin(), tf.cos()], -1)


def rotary_tables(pos, head_dim, dtype):
    """cos and sin of the rotary angles (RoPE) for positions pos, over the whole head (the
    sines of the first half negated), in float64 for float64 networks and float32 otherwise:
    computed once per forward, cast to q/k's dtype in rotary."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    half = head_dim // 2
    angle = pos.to(wide)[:, None] * 10000.0 ** (-torch.arange(half, dtype=wide, device=pos.device) / half)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def rotary(x, tables):
    """Rotate query/key channel pairs (x1, x2) = (first half, second half) by angles
    proportional to the position: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    cos, sin = (table.to(x.dtype) for table in tables)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Gelu(nn.Module):
    """GELU, x Phi(x) (nn.GELU's function). In float64 (coding) written out with torch.erf,
    which is 2-3x faster there than F.gelu; other dtypes use F.gelu."""

    def forward(self, x):
        if x.dtype != torch.float64:
            return F.gelu(x)
        return torch.erf(x * math.sqrt(0.5)).add_(1).mul_(x).mul_(0.5)


class Block(nn.Module):
    """Pre-norm transformer block; `heads` and `finish` are split so that callers can add
    cached keys and values in between. kv_heads < n_heads: grouped-query attention (each
    key/value head serves n_heads / kv_heads query heads; 1: multi-query), which shrinks
    what a coding-time cache stores and reads per token."""

    def __init__(self, d, n_heads, rope=False, kv_heads=None):
        super().__init__()
        self.n_heads, self.rope = n_heads, rope
        self.kv_heads = kv_heads or n_heads
        if n_heads % self.kv_heads:
            raise ValueError("n_heads must be a multiple of kv_heads")
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, d + 2 * self.kv_heads * (d // n_heads))
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), Gelu(), nn.Linear(4 * d, d))

    def heads(self, h, tables=None):
        """-> q (B, n_heads, T, hd), k and v (B, kv_heads, T, hd); q and k rotated together."""
        B, T, d = h.shape
        qkv = self.qkv(self.ln1(h)).reshape(B, T, -1, d // self.n_heads).transpose(1, 2)   # the heads: q, k, v
        qk, v = qkv.split([self.n_heads + self.kv_heads, self.kv_heads], 1)
        if self.rope:
            qk = rotary(qk, tables)
        q, k = qk.split([self.n_heads, self.kv_heads], 1)
        return q, k, v

    @staticmethod
    def cache_rows(k, v):
        """What a coding-time cache keeps of new keys and values (tensors (B, kv_heads, T, ...))."""
        return k, v

    @staticmethod
    def from_cache(k, v):
        """Cached rows -> the keys and values that `finish` takes."""
        return k, v

    def finish(self, h, q, k, v, mask=None, causal=False):
        a = self.attend(q, k, v, mask, causal)
        h = h + self.proj(a.transpose(1, 2).reshape(h.shape))
        return h + self.mlp(self.ln2(h))

    def alone(self, h):
        """The block over sequences of one position (B, 1, d): attention gives each position its
        own value, so only the value projection runs (what heads and finish compute)."""
        B, T, d = h.shape
        hd = d // self.n_heads
        values = slice(d + self.kv_heads * hd, None)
        v = F.linear(self.ln1(h), self.qkv.weight[values], self.qkv.bias[values])
        if self.kv_heads != self.n_heads:
            v = v.reshape(B, T, self.kv_heads, hd).repeat_interleave(self.n_heads // self.kv_heads, 2).reshape(B, T, d)
        h = h + self.proj(v)
        return h + self.mlp(self.ln2(h))

    def attend(self, q, k, v, mask=None, causal=False):
        """Attention of q (B, n_heads, T, hd) over k, v (B, kv_heads, S, hd): mask (T, S), or
        causal (T = S), or neither (all keys). (Sequences of a single position: `alone`.) One
        query with no mask (a coding step's new token over its window): the query heads that
        share a key/value head go in as that head's queries, so each key and value is read once
        per step, not once per query head."""
        B, H, T, hd = q.shape
        group = H // self.kv_heads
        if group == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        if T == 1 and mask is None:
            return F.scaled_dot_product_attention(q.reshape(B, self.kv_heads, group, hd), k, v).reshape(q.shape)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
