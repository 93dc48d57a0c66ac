"""The context network and the per-step network at coding time in compiled code (format 7
on): `_context.c` runs a whole stripe of the context network (all layers, all lanes) in one
call, where exact.py's torch version runs about 500 operations, and each step's per-step
network of one-byte chunks in another (longer chunks keep the torch per-step network).

The context network's arithmetic is exact.py's int8 grids (products exact in any order),
with these definitions: a row's int8 values are rint(x (127 / max |x|)); the attention
weights' value-scale maximum is taken over the keys each query sees; sums of doubles run in
index order (layer norms: in 8 interleaved parts, added in a fixed order); exp, erf, sin,
cos and log are the kernel's own, from +, -, *, /, sqrt and rint. The per-step network is
float64 but for its products: float32 weights and inputs, each sum in index order. So the outputs are the same bits on every IEEE-754
machine, whatever its math library, SIMD width or thread count: the AVX-512 and the portable
build agree bit for bit (tests/test_kernel.py). GELU uses an erf with an absolute error
below 1.5e-7, far below the int8 grids' steps. The kernel is checked when loaded: its
version, and a few of its function values (a build with fused multiply-adds or x87
arithmetic would compute others).
"""
import ctypes
import importlib.machinery
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError
from .exact import int8_rows
from .sar import BOS

_LIB = None
P = ctypes.c_void_p


KERNEL_VERSION = 3       # _context.c's KERNEL_VERSION: what this code expects
# a few of the kernel's elementary function values, as every correct build computes them
SELF_TEST = {"exp": ([-0.3, -7.25], ["0x1.7b4c869c37c05p-1", "0x1.7455fe323fafep-11"]),
             "erf": ([0.7, -2.1], ["0x1.5b08c1aa86337p-1", "-0x1.fe79750fb9e0dp-1"]),
             "sin": ([1234.5], ["0x1.29c531dfd031bp-3"]), "cos": ([0.4], ["0x1.d7954e7dba2f8p-1"]),
             "log": ([3.7], ["0x1.4eeee650ae54fp+0"])}
REINSTALL = "reinstall the package with a C compiler (pip install -e .)"


def library():
    """The compiled kernel (built by `pip install`), loaded once and checked: its version, and
    that it computes the bits it should (a build with fused multiply-adds or x87 arithmetic
    would not)."""
    global _LIB
    if _LIB is None:
        here = Path(__file__).parent
        found = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in here.glob("_context" + suffix)]
        if not found:
            raise ModelError(f"the compiled context kernel (bfn_codec/_context.c) is not built: {REINSTALL}")
        lib = ctypes.CDLL(str(found[0]))
        try:
            lib.bfn_kernel_version.restype = ctypes.c_int32
            version = lib.bfn_kernel_version()
        except AttributeError:
            version = None
        if version != KERNEL_VERSION:
            raise ModelError(f"the compiled context kernel is a stale build ({found[0].name}): {REINSTALL}")
        _declare(lib)
        for name, (x, expected) in SELF_TEST.items():
            if any([float(v).hex() for v in _elementary(lib, name, x, portable)] != expected for portable in (0, 1)):
                raise ModelError(f"the compiled context kernel computes other bits than it should ({name}); "
                                 "it must be built without fused multiply-adds or x87 arithmetic: " + REINSTALL)
        _LIB = lib
    return _LIB


def _declare(lib):
    """The kernel's functions' argument and result types."""
    int32 = ctypes.c_int32
    lib.bfn_context_step.argtypes = [P, P, int32, int32, P, ctypes.c_int64, int32, P, int32]
    lib.bfn_step_prior.argtypes = [P, int32, P, P]
    lib.bfn_step.argtypes = [P, int32, P, P, P, ctypes.c_double, P, int32]
    lib.bfn_elementary.argtypes = [int32, P, P, int32, int32]
    lib.bfn_cache_compact.argtypes = [P, P, int32, int32]
    lib.bfn_cache_compact.restype = None
    lib.bfn_context_step.restype = lib.bfn_step_prior.restype = lib.bfn_step.restype = ctypes.c_int
    lib.bfn_elementary.restype = None


class _Linear(ctypes.Structure):
    _fields_ = [("weight", P), ("scale", P), ("bias", P), ("packed", P), ("offset", P)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1_weight", P), ("ln1_bias", P), ("ln2_weight", P), ("ln2_bias", P),
                ("qkv", _Linear), ("proj", _Linear), ("fc1", _Linear), ("fc2", _Linear)]


class _Net(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("d", "n_heads", "kv_heads", "n_layers", "local_layers",
                                                    "local_window", "window", "hidden", "ds")] + \
               [("embedding", P), ("layers", P), ("ln_weight", P), ("ln_bias", P), ("out", _Linear)]


class _Cache(ctypes.Structure):
    _fields_ = [("keys", P), ("values", P), ("key_scales", P), ("value_scales", P), ("key_sums", P),
                ("lanes", ctypes.c_int32), ("capacity", ctypes.c_int32)]


class _Dense(ctypes.Structure):
    _fields_ = [("weight_t", P), ("bias", P)]


class _StepLayer(ctypes.Structure):
    _fields_ = [("ln1_weight", P), ("ln1_bias", P), ("ln2_weight", P), ("ln2_bias", P),
                ("value", _Dense), ("proj", _Dense), ("fc1", _Dense), ("fc2", _Dense)]


class _StepNet(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("V", "ds", "n_layers", "hidden", "residual")] + \
               [(name, _Dense) for name in ("bits_in", "soft_emb", "time_in", "time_out", "prior", "head")] + \
               [("position", P), ("layers", P), ("ln_weight", P), ("ln_bias", P)]


class _Arrays:
    """Contiguous copies of a network's tensors for the kernel, kept alive with it (ctypes
    holds bare pointers)."""

    def __init__(self):
        self.keep = []

    def array(self, x, dtype=np.float64):
        a = np.ascontiguousarray(x.detach().double().numpy() if torch.is_tensor(x) else x, dtype=dtype)
        self.keep.append(a)
        return a.ctypes.data

    def dense(self, weight, bias=None):
        """A per-step layer: weight (out, in) stored as (in, out) in float32, the bias in float64."""
        return _Dense(self.array(weight.detach().double().t(), np.float32), None if bias is None else self.array(bias))


class CompiledStep(_Arrays):
    """The per-step network of one-byte chunks (sar.SARNet.forward with L = 1) in the kernel:
    `prior(states)` once per stripe, then `log_probs(states, prior, beliefs, t)` -> log p_O
    (lanes, 256) at each step. Float64, the products in float32, each sum in index order."""

    def __init__(self, net, portable=False):
        super().__init__()
        cfg, self.portable, self.V = net.cfg, portable, net.cfg.V
        if cfg.output != "bytes" or not cfg.step_layers or (cfg.K, cfg.V) != (2, 8):
            raise ValueError("the compiled per-step network takes a joint byte output (K = 2, V = 8) and step layers")
        ds = cfg.step_d_model
        blocks = [b for b in net.step_blocks]
        layers = (_StepLayer * len(blocks))(*[
            _StepLayer(self.array(b.ln1.weight), self.array(b.ln1.bias), self.array(b.ln2.weight),
                       self.array(b.ln2.bias), self.dense(b.qkv.weight[2 * ds:], b.qkv.bias[2 * ds:]),
                       self.dense(b.proj.weight, b.proj.bias), self.dense(b.mlp[0].weight, b.mlp[0].bias),
                       self.dense(b.mlp[2].weight, b.mlp[2].bias)) for b in blocks])
        self.keep.append(layers)
        self.net = _StepNet(cfg.V, ds, len(blocks), blocks[0].mlp[0].out_features, int(cfg.residual),
                            self.dense(net.bits_in.weight, net.bits_in.bias), self.dense(net.soft_emb.weight),
                            self.dense(net.time_mlp[0].weight, net.time_mlp[0].bias),
                            self.dense(net.time_mlp[2].weight, net.time_mlp[2].bias),
                            self.dense(net.prior.weight[:256], net.prior.bias[:256]),
                            self.dense(net.head.weight, net.head.bias), self.array(net.pos_emb.weight[0]),
                            ctypes.cast(layers, P), self.array(net.ln_out.weight), self.array(net.ln_out.bias))

    def prior(self, states):
        states = np.ascontiguousarray(states, dtype=np.float64)
        prior = np.empty((len(states), 256))
        if library().bfn_step_prior(ctypes.byref(self.net), len(states), states.ctypes.data, prior.ctypes.data):
            raise MemoryError("the per-step kernel could not allocate its buffers")
        return states, prior

    def log_probs(self, states, prior, beliefs, t):
        beliefs = np.ascontiguousarray(beliefs, dtype=np.float64).reshape(len(states), self.V)   # lane after lane
        if prior.shape != (len(states), 256):
            raise ValueError("the per-step network takes a prior per lane")
        log_p = np.empty((len(states), 256))
        if library().bfn_step(ctypes.byref(self.net), len(states), states.ctypes.data, prior.ctypes.data,
                              beliefs.ctypes.data, float(t), log_p.ctypes.data, int(self.portable)):
            raise MemoryError("the per-step kernel could not allocate its buffers")
        return log_p


class CompiledContext(_Arrays):
    """sar.ContextCache's interface (`advance(previous_chunks)` -> the next stripe's context
    states (lanes, 1, ds)) over the compiled kernel: keys and values of the last `context_len`
    tokens of every lane, as int8 rows with their scales, compacted every SLACK tokens."""

    SLACK = 256

    def __init__(self, net, portable=False):
        super().__init__()
        cfg = net.cfg
        if cfg.context_len > 2 ** 16:       # weights times values: integer sums below 2^24, exact in float32
            raise ValueError("the compiled context network takes windows of at most 2^16 tokens")
        self.portable = portable            # the kernel's baseline build and plain products (tests)
        self.W, self.ds = cfg.context_len, cfg.step_d_model
        self.shape = (cfg.n_layers, cfg.kv_heads or cfg.n_heads, cfg.d_model // cfg.n_heads)
        self.capacity = -(-(cfg.context_len + max(self.SLACK, cfg.chunk_len + 1)) // 16) * 16    # whole key blocks
        layers = (_Layer * cfg.n_layers)(*[
            _Layer(self.array(b.ln1.weight), self.array(b.ln1.bias), self.array(b.ln2.weight),
                   self.array(b.ln2.bias), self._linear(b.qkv), self._linear(b.proj),
                   self._linear(b.mlp[0]), self._linear(b.mlp[2])) for b in net.blocks])
        self.keep.append(layers)
        self.net = _Net(cfg.d_model, cfg.n_heads, self.shape[1], cfg.n_layers, cfg.local_layers, cfg.local_window,
                        cfg.context_len, net.blocks[0].mlp[0].out_features, self.ds,
                        self.array(net.byte_emb.weight), ctypes.cast(layers, P), self.array(net.ln_ctx.weight),
                        self.array(net.ln_ctx.bias), self._linear(net.ctx_out))
        self.cache = None
        self.base = self.pos = 0            # token number of cache row 0; tokens so far

    def _linear(self, linear):
        """An IntLinear's arrays: int8 weights (one scale per output channel), and for the VNNI
        product the weights in blocks of 16 outputs by 4 inputs with 128 times their sums."""
        weight, scale = int8_rows(linear.weight.detach().double())
        weight = weight.numpy().astype(np.int8)
        out, inputs = weight.shape
        packed = offset = None
        if out % 16 == 0 and inputs % 4 == 0:
            packed = self.array(weight.reshape(out // 16, 16, inputs // 4, 4).transpose(0, 2, 1, 3), np.int8)
            offset = self.array(128 * weight.sum(1, dtype=np.int32), np.int32)
        return _Linear(self.array(weight, np.int8), self.array(scale[:, 0]), self.array(linear.bias), packed, offset)

    def advance(self, previous_chunks):
        rows = [([] if self.pos else [BOS]) + [int(b) for b in chunk] for chunk in previous_chunks]
        tokens = np.ascontiguousarray(rows, dtype=np.int32)
        lanes, m = tokens.shape
        if m == 0 or (self.cache is not None and lanes > self.cache.lanes) or m > self.capacity - self.W:
            raise ValueError("each call takes a chunk of equal length for each lane still going, no more lanes "
                             "than the first call, no longer than the cache's slack")
        if self.cache is None:         # keys (in blocks of 16 rows), values, their scales, the keys' sums
            layers, kv, hd = self.shape
            heads, padded = (layers, lanes, kv), -(-hd // 4) * 4
            self.arrays = [np.zeros(heads + (self.capacity * padded,), np.int8),
                           np.zeros(heads + (self.capacity, hd), np.int8), np.zeros(heads + (self.capacity,)),
                           np.zeros(heads + (self.capacity,)), np.zeros(heads + (self.capacity,), np.int32)]
            self.cache = _Cache(*[a.ctypes.data for a in self.arrays], lanes, self.capacity)
        if self.pos + m - self.base > self.capacity:      # compact: keep the last W tokens
            keep, end = min(self.W, self.pos - self.base), self.pos - self.base
            library().bfn_cache_compact(ctypes.byref(self.net), ctypes.byref(self.cache), end - keep, keep)
            self.base = self.pos - keep
        states = np.empty((lanes, self.ds))
        if library().bfn_context_step(ctypes.byref(self.net), ctypes.byref(self.cache), lanes, m,
                                      tokens.ctypes.data, self.pos, self.pos - self.base, states.ctypes.data,
                                      int(self.portable)):
            raise MemoryError("the context kernel could not allocate its buffers")
        self.pos += m
        return torch.from_numpy(states)[:, None]


def elementary(name, x, portable=False):
    """The kernel's own exp (x <= 0), erf, sin, cos (x >= 0) or log (x >= 1) of the array x
    (portable: in its baseline build)."""
    return _elementary(library(), name, x, portable)


def _elementary(lib, name, x, portable):
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.empty_like(x)
    lib.bfn_elementary(("exp", "erf", "sin", "cos", "log").index(name), x.ctypes.data, y.ctypes.data, len(x),
                       int(portable))
    return y

