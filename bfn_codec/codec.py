"""File -> frames -> chunks -> network -> coder: compress and decompress byte strings.

Frames are independent (own ANS stack, own context), so they can be coded in parallel
processes with output identical to a serial run. Within a frame, chunks are chained on
one stack in reverse order, so the decoder emits them in file order and each chunk's
network sees the clean bytes before it. The frame's last chunks are coded directly (no
bits-back) under the network's t = 0 prediction and pushed first: they are the initial
bits that the first bits-back chunk pops. The decoder checks that the stack ends empty.
"""
import lzma
import math
import os
import zlib

import numpy as np
import torch

from . import coder as bb
from . import container
from .container import BFN, LZMA, STORED, CorruptError, Frame
from .model import load_weights


class Predictor:
    """The network as the coder sees it: float64, one thread, logits on a fixed grid."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg

    def for_chunk(self, context, length):
        cfg = self.cfg
        ctx = torch.from_numpy(np.asarray(context[max(0, len(context) - cfg.context_len):], dtype=np.int64))[None]
        cache = self.model.context(ctx) if ctx.shape[1] else None
        z = torch.zeros(1, 1, length, cfg.V, 2, dtype=torch.float64)

        @torch.no_grad()
        def predict(s, t):
            z[..., 1] = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float64)).reshape(1, 1, length, cfg.V)
            log_p = self.model(z, torch.full((1, 1), float(t), dtype=torch.float64), cache)
            return bb.quantise_logit((log_p[..., 1] - log_p[..., 0]).reshape(-1).numpy())
        return predict


def chunk_bounds(n_bytes, chunk_len):
    return [(a, min(a + chunk_len, n_bytes)) for a in range(0, n_bytes, chunk_len)]


def information_bits(stack):
    """Exact information content of an ANS stack, in bits."""
    words, state = stack.pos()
    return 32 * words + (math.log2(state) if state else 0.0)


PROBE_CHUNKS = 16      # chunks of a frame sampled to guess whether the BFN can win
PROBE_RATIO = 0.5      # the BFN codes in more than this share of the t = 0 code length


def probe_bits(arr, bounds, predictor):
    """A quick guess of a frame's direct code length: the network's t = 0 prediction on
    PROBE_CHUNKS chunks spread over the frame (one network call each), scaled up."""
    picks = sorted(set(np.linspace(0, len(bounds) - 1, min(PROBE_CHUNKS, len(bounds))).astype(int)))
    bits = nbytes = 0
    for k in picks:
        a, b = bounds[k]
        x = np.unpackbits(arr[a:b]).astype(np.int64)
        bits += bb.nll_bits(predictor.for_chunk(arr[:a], b - a)(np.zeros(len(x)), 0.0), x)
        nbytes += b - a
    return bits * len(arr) / nbytes


def encode_frame(data, predictor, sch, fallback=True, progress=None):
    """bytes -> Frame: bits-back coded, or xz or stored where that is smaller.

    The last chunks of the frame (the tail) are coded directly under the network's t = 0
    prediction, first, so that the bits-back chunks find real information on the stack to
    pop; the tail grows until the stack holds what a chunk pops at its worst point.
    """
    if not len(data):
        return Frame(STORED, 0, 0, b"")
    arr = np.frombuffer(data, dtype=np.uint8)
    bounds = chunk_bounds(len(arr), predictor.cfg.chunk_len)
    others = []
    if fallback:
        others = [Frame(LZMA, len(data), 0, lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
                  Frame(STORED, len(data), 0, bytes(data))]
        if PROBE_RATIO * probe_bits(arr, bounds, predictor) > 8 * min(len(f.payload) for f in others):
            if progress:
                progress(len(data))
            return min(others, key=lambda f: len(f.payload))
    stats = {"model_bits": 0.0, "direct_bits": 0.0, "direct_bytes": 0}
    stack = bb.AnsCoder()
    need = 8 * predictor.cfg.chunk_len * sch.peak_pop_bits(8 * predictor.cfg.chunk_len)
    tail = 0
    for k, (a, b) in reversed(list(enumerate(bounds))):
        bits = np.unpackbits(arr[a:b]).astype(np.int64)
        predict = predictor.for_chunk(arr[:a], b - a)
        if tail == len(bounds) - 1 - k and information_bits(stack) < need:
            bb.encode_direct(stack, bits, predict, stats)
            tail += 1
        else:
            bb.encode_chunk(stack, sch, bits, predict, k, stats)
        if progress:
            progress(b - a)
    frame = Frame(BFN, len(data), tail, stack.get_compressed().astype("<u4").tobytes(),
                  {**stats, "coded_bits": information_bits(stack)})
    return min([frame] + others, key=lambda f: len(f.payload))


def decode_frame(frame, predictor, sch, progress=None):
    if frame.method == STORED:
        if len(frame.payload) != frame.raw_len:
            raise CorruptError("corrupted stored frame")
        return frame.payload
    if frame.method == LZMA:
        try:
            out = lzma.LZMADecompressor().decompress(frame.payload, max_length=frame.raw_len + 1)
        except lzma.LZMAError:
            raise CorruptError("corrupted xz frame") from None
        if len(out) != frame.raw_len:
            raise CorruptError("corrupted xz frame")
        return out
    bounds = chunk_bounds(frame.raw_len, predictor.cfg.chunk_len)
    if len(frame.payload) % 4 or frame.tail_chunks > len(bounds):
        raise CorruptError("corrupted frame")
    out = np.zeros(frame.raw_len, dtype=np.uint8)
    try:
        stack = bb.AnsCoder(np.frombuffer(frame.payload, dtype="<u4").astype(np.uint32))
        for k, (a, b) in enumerate(bounds):
            predict = predictor.for_chunk(out[:a], b - a)
            if k >= len(bounds) - frame.tail_chunks:
                bits = bb.decode_direct(stack, 8 * (b - a), predict)
            else:
                bits = bb.decode_chunk(stack, sch, 8 * (b - a), predict, k)
            out[a:b] = np.packbits(bits.astype(np.uint8))
            if progress:
                progress(b - a)
    except BaseException as e:     # the coder refuses impossible symbols: a damaged stream
        if not isinstance(e, (KeyError, ValueError, OverflowError, AssertionError)) \
                and type(e).__name__ != "PanicException":     # constriction's Rust panics
            raise
        raise CorruptError("corrupted data or wrong model: the stream cannot be decoded") from None
    if not stack.is_empty():
        raise CorruptError("corrupted data or wrong model: data left over after the last chunk")
    return out.tobytes()


# ---- frames in worker processes: each loads the model once, runs the network on one thread ----

_worker = {}


def _init_worker(model_path, steps, bins, fallback=True):
    """Load the model for coding (once per process and setting); torch runs on one thread."""
    torch.set_num_threads(1)
    _worker["fallback"] = fallback
    if _worker.get("key") != (model_path, steps, bins):
        model, fp, _ = load_weights(model_path)
        _worker.update(key=(model_path, steps, bins), predictor=Predictor(model),
                       sch=bb.Schedule(steps, model.cfg.beta1, bins), fp=fp)
    return _worker


def _encode_job(data, progress=None):
    return encode_frame(data, _worker["predictor"], _worker["sch"], _worker["fallback"], progress)


def _decode_job(frame, progress=None):
    try:
        return decode_frame(frame, _worker["predictor"], _worker["sch"], progress=progress)
    except CorruptError as e:
        return e


def run_frames(job, items, model_path, steps, bins, workers, progress=None, size=len, fallback=True):
    """Map job over frames in `workers` processes (1: in this process). Results keep their order.

    progress(n_bytes) is called as bytes are done: per chunk in this process, per frame in a pool.
    """
    if workers <= 1 or len(items) <= 1:
        _init_worker(model_path, steps, bins, fallback)
        return [job(item, progress) for item in items]
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(items)), _init_worker, (model_path, steps, bins, fallback)) as pool:
        results = []
        for item, res in zip(items, pool.imap(job, items)):
            results.append(res)
            if progress:
                progress(size(item))
        return results


def split_frames(data, frame_size):
    """Equal frames of at most frame_size bytes; at least two once the input is 2 x
    MIN_SPLIT long, so that two cores share even a mid-sized file. Depends only on the
    length, never on the worker count."""
    count = max(1, -(-len(data) // frame_size))
    if count == 1 and len(data) >= 2 * MIN_SPLIT and frame_size >= MIN_SPLIT:
        count = 2
    step = -(-len(data) // count) if data else 1
    return [data[a:a + step] for a in range(0, len(data), step)] or [b""]


def checksum(data):
    return zlib.crc32(data) & 0xFFFFFFFF


def default_workers():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8))


# ---- whole files ----

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "weights", "default.pt")
DEFAULT_STEPS = 10
DEFAULT_BINS = 4
FRAME_SIZE = 1 << 18
MIN_SPLIT = 1 << 15


def compress(data, model_path=None, steps=DEFAULT_STEPS, bins=DEFAULT_BINS, frame_size=FRAME_SIZE,
             workers=1, progress=None, fallback=True):
    """bytes -> (.bfn bytes, stats). Over the frames coded with the BFN, stats has `model_bits`
    (the model's expected code length of the bits-back chunks on the coded trajectories) and
    `bfn_bytes` (their size), `direct_bits` and `direct_bytes` (the tail chunks, coded
    directly), `coded_bits` (what the ANS stacks hold); `other_bytes` is the payload of the
    frames stored raw or as xz."""
    model_path = model_path or DEFAULT_MODEL
    loaded = _init_worker(model_path, steps, bins)
    cfg = loaded["predictor"].cfg
    parts = split_frames(bytes(data), frame_size)
    frames = run_frames(_encode_job, parts, model_path, steps, bins, workers, progress, fallback=fallback)
    header = container.Header(loaded["fp"], steps, bins, cfg.chunk_len, cfg.context_len, frame_size,
                              len(data), checksum(data))
    blob = container.pack(header, frames, [checksum(p) for p in parts])
    stats = {key: sum(f.stats[key] for f in frames if f.method == BFN)
             for key in ("model_bits", "direct_bits", "direct_bytes", "coded_bits")}
    stats["bfn_bytes"] = sum(f.raw_len for f in frames if f.method == BFN) - stats["direct_bytes"]
    stats["other_bytes"] = sum(len(f.payload) for f in frames if f.method != BFN)
    return blob, stats


def expected_bits(stats):
    """The model's n-step loss for all BFN frames: its rate on the bits-back chunks, applied to
    the directly coded tail too (or the tail's direct code length where there is nothing else)."""
    if not stats["bfn_bytes"]:
        return stats["direct_bits"]
    return stats["model_bits"] / stats["bfn_bytes"] * (stats["bfn_bytes"] + stats["direct_bytes"])


def coder_excess_bits(stats):
    """What the bits-back chunks cost beyond the model's loss on their trajectories."""
    return stats["coded_bits"] - stats["direct_bits"] - stats["model_bits"]


def decompress(blob, model_path=None, workers=1, progress=None):
    """.bfn bytes -> the original bytes, verified against every checksum; raises FormatError."""
    header, frames, crcs = container.unpack(blob)
    if any(f.method == BFN for f in frames):
        model_path = model_path or DEFAULT_MODEL
        loaded = _init_worker(model_path, header.steps, header.bins)
        cfg = loaded["predictor"].cfg
        if loaded["fp"] != header.model:
            raise container.FormatError(f"this file needs model {header.model}, but the model given is "
                                        f"{loaded['fp']} ({model_path}); pass the right one with --model")
        if (cfg.chunk_len, cfg.context_len) != (header.chunk_len, header.context_len):
            raise container.FormatError("corrupted .bfn file (chunk settings differ from the model's)")
        results = run_frames(_decode_job, frames, model_path, header.steps, header.bins, workers,
                             progress, size=lambda f: f.raw_len)
    else:
        results = [decode_frame(f, None, None) for f in frames]
        if progress:
            progress(header.length)
    out = []
    for k, (res, crc) in enumerate(zip(results, crcs)):
        if isinstance(res, Exception):
            raise CorruptError(f"frame {k}: {res}")
        if checksum(res) != crc:
            raise CorruptError(f"checksum mismatch in frame {k}: corrupted file or wrong model")
        out.append(res)
    data = b"".join(out)
    if len(data) != header.length or checksum(data) != header.crc:
        raise CorruptError("checksum mismatch: corrupted file or wrong model")
    return data
