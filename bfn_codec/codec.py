"""File -> frames -> chunks -> network -> coder: compress and decompress byte strings.

Frames are independent (own ANS stack, own context), so they can be coded in parallel
processes with output identical to a serial run. Within a frame, chunks are chained on
one stack in reverse order, so the decoder emits them in file order and each chunk's
network sees the clean bytes before it. The frame's last chunks are coded directly (no
bits-back) under the network's t = 0 prediction and pushed first: they are the initial
bits that the first bits-back chunk pops. The decoder checks that the stack ends empty.
"""
import dataclasses
import functools
import lzma
import math
import os
import zlib

import numpy as np
import torch

from . import coder
from . import container
from .container import CorruptError, Frame, Method
from .model import load_weights


class Predictor:
    """The network as the coder sees it: float64, one thread, outputs on a fixed grid.

    `contexts()` follows a frame chunk by chunk: its `advance(previous_chunk_bytes)` gives
    the next chunk's context state (the encoder runs it over the whole frame first, the
    decoder as it goes: the same calls in the same order). `for_chunk(state, length)` ->
    predict(s, t), the family's quantised output for the chunk's beliefs s at time t."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg
        self.family = coder.FAMILIES[model.cfg.output]()

    def contexts(self):
        return self.model.coding_context()

    def for_chunk(self, state, length):
        cfg = self.cfg
        context = self.model.prepare(state)
        z = torch.zeros(1, 1, length, cfg.V, 2, dtype=torch.float64)

        @torch.no_grad()
        def predict(s, t):
            z[..., 1] = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float64)).reshape(1, 1, length, cfg.V)
            return self.family.from_network(self.model(z, torch.full((1, 1), float(t), dtype=torch.float64), context))
        return predict


def chunk_bounds(n_bytes, chunk_len):
    return [(a, min(a + chunk_len, n_bytes)) for a in range(0, n_bytes, chunk_len)]


def information_bits(stack):
    """Exact information content of an ANS stack, in bits."""
    words, state = stack.pos()
    return 32 * words + (math.log2(state) if state else 0.0)


PROBE_CHUNKS = 16      # chunks of a frame sampled to guess whether the BFN can win
PROBE_RATIO = 0.5      # the BFN codes in more than this share of the t = 0 code length


PROBE_CONTEXT = 256    # clean bytes a probed chunk sees


def probe_bits(arr, bounds, predictor):
    """A quick guess of a frame's direct code length: the network's t = 0 prediction on
    PROBE_CHUNKS chunks spread over the frame, each on a fresh context of the PROBE_CONTEXT
    bytes before it, scaled up."""
    picks = sorted(set(np.linspace(0, len(bounds) - 1, min(PROBE_CHUNKS, len(bounds))).astype(int)))
    bits = nbytes = 0
    for k in picks:
        a, b = bounds[k]
        state = predictor.contexts().advance(arr[max(0, a - PROBE_CONTEXT):a])
        predict = predictor.for_chunk(state, b - a)
        bits += coder.push_symbols(coder.AnsCoder(), predictor.family, predict(np.zeros(8 * (b - a)), 0.0),
                                coder.bytes_to_bits(arr[a:b]))
        nbytes += b - a
    return bits * len(arr) / nbytes


def encode_frame(data, predictor, sch, fallback=True, progress=None):
    """bytes -> Frame: bits-back coded, or xz or stored where that is smaller.

    The last chunks of the frame (the tail) are coded directly under the network's t = 0
    prediction, first, so that the bits-back chunks find real information on the stack to
    pop; the tail grows until the stack holds what a chunk pops at its worst point.
    """
    if not len(data):
        return Frame(Method.STORED, 0, 0, b"")
    arr = np.frombuffer(data, dtype=np.uint8)
    bounds = chunk_bounds(len(arr), predictor.cfg.chunk_len)
    others = []
    if fallback:
        others = [Frame(Method.XZ, len(data), 0, lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
                  Frame(Method.STORED, len(data), 0, bytes(data))]
        if PROBE_RATIO * probe_bits(arr, bounds, predictor) > 8 * min(len(f.payload) for f in others):
            if progress:
                progress(len(data))
            return min(others, key=lambda f: len(f.payload))
    stats = coder.Stats(bfn_bytes=len(data))
    stack = coder.AnsCoder()
    need = 8 * predictor.cfg.chunk_len * sch.peak_pop_bits(8 * predictor.cfg.chunk_len)
    contexts = predictor.contexts()
    starts = [a for a, _ in bounds]
    states = [contexts.advance(arr[prev:a]) for prev, a in zip([0] + starts[:-1], starts)]
    tail = 0
    for k, (a, b) in reversed(list(enumerate(bounds))):
        bits = coder.bytes_to_bits(arr[a:b])
        predict = predictor.for_chunk(states[k], b - a)
        if tail == len(bounds) - 1 - k and information_bits(stack) < need:
            coder.encode_direct(stack, predictor.family, bits, predict, stats)
            tail += 1
        else:
            coder.encode_chunk(stack, sch, predictor.family, bits, predict, k, stats)
        if progress:
            progress(b - a)
    stats.coded_bits = information_bits(stack)
    stats.bfn_bytes -= stats.direct_bytes
    frame = Frame(Method.BITS_BACK, len(data), tail, stack.get_compressed().astype("<u4").tobytes(), stats)
    return min([frame] + others, key=lambda f: len(f.payload))


def decode_frame(frame, predictor, sch, progress=None):
    if frame.method == Method.STORED:
        if len(frame.payload) != frame.raw_len:
            raise CorruptError("corrupted stored frame")
        return frame.payload
    if frame.method == Method.XZ:
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
        stack = coder.AnsCoder(np.frombuffer(frame.payload, dtype="<u4").astype(np.uint32))
        contexts, prev = predictor.contexts(), 0
        for k, (a, b) in enumerate(bounds):
            predict = predictor.for_chunk(contexts.advance(out[prev:a]), b - a)
            if k >= len(bounds) - frame.tail_chunks:
                bits = coder.decode_direct(stack, predictor.family, 8 * (b - a), predict)
            else:
                bits = coder.decode_chunk(stack, sch, predictor.family, 8 * (b - a), predict, k)
            out[a:b] = coder.bits_to_bytes(bits)
            prev = a
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

@dataclasses.dataclass
class Setup:
    """What coding a frame needs: the network as the coder sees it, the schedule, and the
    model's fingerprint."""
    predictor: Predictor
    schedule: coder.Schedule
    fingerprint: str


@functools.lru_cache(maxsize=2)
def load_setup(model_path, steps, bins):
    """Load the model for coding (once per process and setting); torch runs on one thread."""
    torch.set_num_threads(1)
    model, fingerprint, _ = load_weights(model_path)
    return Setup(Predictor(model), coder.Schedule(steps, model.cfg.beta1, bins), fingerprint)


def encode_job(setup, data, progress=None, fallback=True):
    return encode_frame(data, setup.predictor, setup.schedule, fallback, progress)


def decode_job(setup, frame, progress=None):
    try:
        return decode_frame(frame, setup.predictor, setup.schedule, progress=progress)
    except CorruptError as e:
        return e


_process_setup = None      # a worker process's Setup, set once by its pool initializer


def _init_worker(model_path, steps, bins):
    global _process_setup
    _process_setup = load_setup(model_path, steps, bins)


def _in_worker(job, item):
    return job(_process_setup, item)


def run_frames(job, items, model_path, steps, bins, workers, progress=None, size=len):
    """Map job(setup, item[, progress]) over frames in `workers` processes (1: in this process).
    Results keep their order. progress(n_bytes) is called as bytes are done: per chunk in this
    process, per frame in a pool."""
    if workers <= 1 or len(items) <= 1:
        setup = load_setup(model_path, steps, bins)
        return [job(setup, item, progress) for item in items]
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(items)), _init_worker, (model_path, steps, bins)) as pool:
        results = []
        for item, res in zip(items, pool.imap(functools.partial(_in_worker, job), items)):
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
    """bytes -> (.bfn bytes, coder.Stats summed over the frames)."""
    model_path = model_path or DEFAULT_MODEL
    setup = load_setup(model_path, steps, bins)
    cfg = setup.predictor.cfg
    parts = split_frames(bytes(data), frame_size)
    frames = run_frames(functools.partial(encode_job, fallback=fallback), parts, model_path, steps, bins,
                        workers, progress)
    header = container.Header(setup.fingerprint, steps, bins, cfg.chunk_len, cfg.context_len, frame_size,
                              len(data), checksum(data), container.version_for(cfg.output))
    blob = container.pack(header, frames, [checksum(p) for p in parts])
    stats = sum((f.stats for f in frames if f.method == Method.BITS_BACK), coder.Stats())
    stats.other_bytes = sum(len(f.payload) for f in frames if f.method != Method.BITS_BACK)
    return blob, stats


def expected_bits(stats):
    """The model's n-step loss for all Method.BITS_BACK frames: its rate on the bits-back chunks, applied to
    the directly coded tail too (or the tail's direct code length where there is nothing else)."""
    if not stats.bfn_bytes:
        return stats.direct_bits
    return stats.model_bits / stats.bfn_bytes * (stats.bfn_bytes + stats.direct_bytes)


def coder_excess_bits(stats):
    """What the bits-back chunks cost beyond the model's loss on their trajectories."""
    return stats.coded_bits - stats.direct_bits - stats.model_bits


def decompress(blob, model_path=None, workers=1, progress=None):
    """.bfn bytes -> the original bytes, verified against every checksum; raises FormatError."""
    header, frames, crcs = container.unpack(blob)
    if any(f.method == Method.BITS_BACK for f in frames):
        model_path = model_path or DEFAULT_MODEL
        setup = load_setup(model_path, header.steps, header.bins)
        cfg = setup.predictor.cfg
        if setup.fingerprint != header.model:
            raise container.FormatError(f"this file needs model {header.model}, but the model given is "
                                        f"{setup.fingerprint} ({model_path}); pass the right one with --model")
        if (cfg.chunk_len, cfg.context_len) != (header.chunk_len, header.context_len) \
                or header.version != container.version_for(cfg.output):
            raise container.FormatError("corrupted .bfn file (settings differ from the model's)")
        results = run_frames(decode_job, frames, model_path, header.steps, header.bins, workers,
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
