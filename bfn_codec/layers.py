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
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

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

    def attend(self, q, k, v, mask=None, causal=False):
        """Attention of q (B, n_heads, T, hd) over k, v (B, kv_heads, S, hd): mask (T, S), or
        causal (T = S), or neither (all keys). One query and one key (a one-byte chunk in the
        per-step network): its softmax weight is exactly 1, the output is the value. One query
        with no mask (a coding step's new token over its window): the query heads that share a
        key/value head go in as that head's queries, so each key and value is read once per
        step, not once per query head."""
        B, H, T, hd = q.shape
        group = H // self.kv_heads
        if T == 1 and k.shape[2] == 1 and mask is None:
            return v.repeat_interleave(group, 1) if group > 1 else v
        if group == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        if T == 1 and mask is None:
            return F.scaled_dot_product_attention(q.reshape(B, self.kv_heads, group, hd), k, v).reshape(q.shape)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
