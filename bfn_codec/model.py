"""Models: the config that names a network design, the registry of designs, and the
weights files (config + tensors, loaded without executing pickled code).

A design is one module with a network class (`chunknet.ChunkNet`, `sar.SARNet`) and one
line in `ARCHS`. Every network takes `ModelConfig`, has an output family (families.py),
and offers the same interface to training and coding:
- `seq_len`, `split(x)`: a training sequence of bytes -> (clean input, variables (B, C, L, V));
- `context(clean)`: what the chunks of a training sequence read of their clean context;
- `forward(z, t, context)`: log p_O for chunks z (B, C, L, V, 2) at times t (B, C);
- `coding_context()`: an object whose `advance(previous_chunks)` gives the next chunks'
  context states (one row per lane) while a file is coded, and `prepare(states)`, what
  `forward` then takes.
"""
import dataclasses
import hashlib
import io
import json

import torch

from .chunknet import ChunkNet
from .container import MAX_STEPS
from .errors import ModelError
from .families import to_symbols, to_vars  # noqa: F401  (bytes <-> variables, used with a config)
from .sar import SARNet

FORMAT = 2      # weights file format: 2 names the architecture in the config


@dataclasses.dataclass
class ModelConfig:
    arch: str = "chunk"       # network design, a key of ARCHS: "chunk" (chunknet.py) or "sar" (sar.py)
    output: str = "bits"      # output family (families.py): "bits" (V independent) or "bytes" (one 256-way joint)
    K: int = 2                # classes per variable
    V: int = 8                # variables per position (8 bits per byte)
    d_model: int = 256        # width of the (context) network
    n_layers: int = 4         # its transformer blocks
    n_heads: int = 4
    kv_heads: int = 0         # sar: key/value heads of the context network (0: n_heads; 1: multi-query,
                              # a quarter of the cache reads per coded byte at 4 heads)
    local_layers: int = 0     # sar: the first this many context layers attend to the last local_window tokens
    local_window: int = 0     # only (a coded byte then reads fewer cached keys and values); 0: all layers global
    chunk_len: int = 64       # L: bytes per chunk, coded jointly by the n-step transmission
    context_len: int = 192    # chunk: clean bytes before a chunk (a multiple of chunk_len, or 0);
                              # sar: training sequence length and coding window
    beta1: float = 3.0        # accuracy schedule beta(t) = beta1 t^2
    residual: bool = True     # p_O = softmax(evidence of theta + delta) instead of softmax(delta)
    rope: bool = False        # chunk: rotary positions instead of learned absolute ones (sar: always)
    step_d_model: int = 64    # sar: width of the per-step network
    step_layers: int = 2      # sar: its transformer blocks (0: the autoregressive reference, L = 1)
    step_heads: int = 4       # sar: its attention heads
    coding_chunk_len: int = 0  # chunk length files are coded with by default (0: chunk_len)
    coding_steps: int = 0     # n files are coded with by default (0: codec.DEFAULT_STEPS)

    @property
    def n_symbols(self):
        return self.K ** self.V


ARCHS = {"chunk": ChunkNet, "sar": SARNet}     # network designs by ModelConfig.arch


def build(cfg: ModelConfig):
    """The network that cfg.arch names, freshly initialised."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown network design {cfg.arch!r} (known: {', '.join(sorted(ARCHS))})")
    return ARCHS[cfg.arch](cfg)


def regroup_kv_heads(state, cfg, kv_heads):
    """The parameters of a sar network with cfg.kv_heads key/value heads -> those of one with
    kv_heads (a divisor): each new key/value head the mean of the heads it replaces."""
    old = cfg.kv_heads or cfg.n_heads
    new = kv_heads or cfg.n_heads
    if cfg.arch != "sar" or old % new:
        raise ValueError(f"cannot regroup {old} key/value heads into {new}")
    d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
    out = dict(state)
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            name = f"blocks.{i}.qkv.{kind}"
            q, k, v = state[name].split([d, old * hd, old * hd])      # rows: queries, keys, values (heads major)
            pooled = [a.reshape(new, old // new, hd, *a.shape[1:]).mean(1).reshape(new * hd, *a.shape[1:])
                      for a in (k, v)]
            out[name] = torch.cat([q, *pooled])
    return out


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
        tensor = state[name].contiguous().cpu().reshape(-1)
        buf.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        h.update(buf.getvalue())
    return h.hexdigest()[:16]


def load_weights(path, dtype=torch.float64):
    """-> (model in eval mode, fingerprint, extra). Accepts shipped weights or a training
    checkpoint (whose EMA weights it takes). Checks the format, the design and the config."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if "ema" in blob:                       # a training checkpoint: use its EMA weights
            blob = {"format": FORMAT, "config": blob["config"]["model"], "state": blob["ema"], "extra": {}}
    except FileNotFoundError:
        raise ModelError(f"no model at {path}") from None
    except Exception as e:
        raise ModelError(f"{path}: not a bfn-codec weights file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") not in (1, FORMAT):
        raise ModelError(f"{path}: not a bfn-codec weights file of a known format")
    try:
        cfg = ModelConfig(**blob["config"])
    except TypeError as e:
        raise ModelError(f"{path}: config not understood ({e})") from None
    if not 0 <= cfg.coding_steps <= MAX_STEPS:
        raise ModelError(f"{path}: coding_steps {cfg.coding_steps} out of range (0 to {MAX_STEPS})")
    if cfg.arch not in ARCHS:
        raise ModelError(f"{path}: unknown network design {cfg.arch!r} (known: {', '.join(sorted(ARCHS))})")
    try:
        model = build(cfg)
        model.load_state_dict(blob["state"])
    except Exception as e:
        raise ModelError(f"{path}: weights do not fit the {cfg.arch!r} design ({type(e).__name__})") from None
    model.to(dtype).eval()
    return model, fingerprint(blob["config"], blob["state"]), blob.get("extra", {})


@torch.no_grad()
def generate(model, length, steps, generator=None, prompt=b""):
    """Bytes from n-step sampling (bfn.sample), chunk by chunk, each seeing the bytes before it."""
    from . import bfn
    cfg = model.cfg
    dtype = model.head.weight.dtype
    coding = model.coding_context()
    out, previous = b"", prompt
    while len(out) < length:
        context = model.prepare(coding.advance([previous]))
        net = lambda z, t: model(z[:, None].to(dtype), t[:, None].to(dtype), context)[:, 0]
        chunk = bfn.sample(net, (1, cfg.chunk_len, cfg.V), steps, cfg.beta1, cfg.K, generator, model.family.draw)
        previous = bytes(to_symbols(chunk[0], cfg).tolist())
        out += previous
    return out[:length]
