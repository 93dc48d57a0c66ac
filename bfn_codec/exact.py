"""The context network at coding time on integer grids (formats 5 and 6; format 7 runs the same
grids in the compiled kernel, context.py): its products are exact,
so that its states do not depend on the BLAS, the SIMD width, the thread count or the other
lanes of a batch.

A float matrix product depends on the order of its sums, and that order depends on the
machine. Here every product of the coding-time context network takes integer operands and
runs in float32 where every partial sum is an integer below 2^24 (float64 otherwise, exact
below 2^53), so that every order gives the same bits:
- a linear layer's input rows are scaled to [-127, 127] and rounded (`int8_rows`), its
  weights once per output channel: sums of k products below 127^2 k, float32 for k <= 1040;
- attention: queries and keys as int8 rows (sums over a head of 64 products: below 2^20);
  the softmax weights, times each value row's scale over the largest, rounded to multiples
  of 2^-16, times the int8 values (sums below 127 (2^16 + S), for windows S up to 2^16).
(No int8 GEMM kernel: oneDNN's s8s8 GEMM saturates on CPUs without AVX-512 VNNI.)
What stays float64 is elementwise or a short reduction (layer norm, softmax, GELU, rotary,
the scales): a last-bit difference there moves a value across a rounding boundary of the
int8 grids about once in 10^14 values, of the attention weights' grid once in 10^11. The
rounding costs the shipped model 0.0003 bits per byte on the validation slice
(docs/speed.md). Training and evaluation never use this module.
"""
import math

import torch
import torch.nn as nn

from .layers import Block

WEIGHT_GRID = 2.0 ** 16      # attention weights are multiples of 1 / WEIGHT_GRID


def int8_rows(x):
    """x (..., k) float64 -> (integers in [-127, 127], as float64; scales (..., 1)): x ~ ints * scale."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min_(1e-30).div_(127)
    return (x / scale).round_(), scale


def exact_dtype(products, bound):
    """The float type in which sums of `products` integers of at most `bound` are exact."""
    return torch.float32 if products * bound < 2 ** 24 else torch.float64


class IntLinear(nn.Module):
    """An nn.Linear with int8 weights (one scale per output channel) and int8 input rows."""

    def __init__(self, linear):
        super().__init__()
        weight, scale = int8_rows(linear.weight.detach().double())
        self.dtype = exact_dtype(weight.shape[1], 127 * 127)
        self.register_buffer("weight_t", weight.t().contiguous().to(self.dtype))        # (in, out)
        self.register_buffer("weight_scale", scale[:, 0])
        self.register_buffer("bias", linear.bias.detach().double())

    def forward(self, x):
        rows, scale = int8_rows(x.reshape(-1, x.shape[-1]))
        y = torch.mul(rows.to(self.dtype) @ self.weight_t, scale).mul_(self.weight_scale).add_(self.bias)    # float64
        return y.reshape(x.shape[:-1] + (-1,))


class IntBlock(Block):
    """A context block (layers.Block) whose products run on int8 grids: the same layer
    norms, heads and residual stream; keys and values are kept as int8 rows (held in float32
    for the products) with their float64 scales."""

    def __init__(self, block):
        nn.Module.__init__(self)
        self.n_heads, self.rope, self.kv_heads = block.n_heads, block.rope, block.kv_heads
        if exact_dtype(block.qkv.in_features // block.n_heads, 127 * 127) != torch.float32:
            raise ValueError("the integer attention takes heads of at most 1040 channels")
        self.ln1, self.ln2 = block.ln1, block.ln2
        self.qkv, self.proj = IntLinear(block.qkv), IntLinear(block.proj)
        self.mlp = nn.Sequential(IntLinear(block.mlp[0]), block.mlp[1], IntLinear(block.mlp[2]))

    @staticmethod
    def cache_rows(k, v):
        """What a cache keeps of new keys and values: their int8 rows (as float32) and scales,
        keys then values along the head axis."""
        ints, scales = int8_rows(torch.cat([k, v], 1))
        return ints.float(), scales

    def from_cache(self, ints, scales):
        return (ints[:, :self.kv_heads], scales[:, :self.kv_heads]), (ints[:, self.kv_heads:], scales[:, self.kv_heads:])

    def attend(self, q, k, v, mask=None, causal=False):
        """q (B, H, T, hd) float64 over cached k, v: (ints (B, kv_heads, S, hd), scales (B, kv_heads, S, 1));
        mask (T, S) or None (all keys)."""
        (kq, ks), (vq, vs) = k, v
        B, H, T, hd = q.shape
        if causal or kq.shape[2] > 2 ** 16:      # weights times values: exact float32 sums up to 2^16 keys
            raise ValueError("the integer attention takes a mask, not a causal flag, and windows of at "
                             "most 2^16 tokens")
        group = H // self.kv_heads
        qq, qs = int8_rows(q.reshape(B, self.kv_heads, group * T, hd))     # query head h reads kv head h // group
        logits = torch.mul(qq.float() @ kq.transpose(-1, -2), qs.mul_(1 / math.sqrt(hd))).mul_(ks.transpose(-1, -2))
        if mask is not None:
            logits = logits.masked_fill_(~mask.repeat(group, 1), -math.inf)
        top = vs.amax(-2, keepdim=True)                                      # (B, kv_heads, 1, 1)
        weights = logits.softmax(-1).mul_((vs.transpose(-1, -2) / top).mul_(WEIGHT_GRID)).round_()   # (x y) 2^16 = x (y 2^16)
        out = torch.mul(weights.float() @ vq, top / WEIGHT_GRID)
        return out.reshape(B, H, T, hd)
