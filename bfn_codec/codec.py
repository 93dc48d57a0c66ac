"""File -> frames -> chunks -> network -> coder: compress and decompress byte strings.

Frames are independent (own ANS stack, own context), so they can be coded in parallel
processes with output identical to a serial run. Within a frame, chunks are chained on
one stack in reverse order, so the decoder emits them in file order and each chunk's
network sees the clean bytes before it. The frame's last chunks are coded directly (no
bits-back) under the network's t = 0 prediction and pushed first: they are the initial
bits that the first bits-back chunk pops. The decoder checks that the stack ends empty.
"""
import contextlib
import dataclasses
import functools
import lzma
import math
import os
import signal
import sys
import threading
import zlib

import numpy as np

from . import coder
from . import container
from . import shipped
from .container import CorruptError, Frame, Method


def lanes(n_bytes, chunk_len, rule):
    """A frame's lanes [(start, end)]: segments coded in lock-step, each with its own context,
    as many as the format's container.LaneRule says, at most MAX_LANES, all but the last a
    multiple of the chunk length. Depends only on the frame's length."""
    count = min(MAX_LANES, max(n_bytes // rule.long if rule.long else 1,
                               min(rule.few, n_bytes // rule.short) if rule.few else 1))
    if count < 2:
        return [(0, n_bytes)]
    step = -(-n_bytes // (count * chunk_len)) * chunk_len
    return [(a, min(a + step, n_bytes)) for a in range(0, n_bytes, step)]


def stripes(layout, chunk_len):
    """Stripe k: chunk k of every lane that has one, [(a, b)] (always the first lanes), one
    stripe at a time."""
    for k in range(stripe_count(layout, chunk_len)):
        yield [(s + k * chunk_len, min(s + (k + 1) * chunk_len, e)) for s, e in layout if s + k * chunk_len < e]


def stripe_count(layout, chunk_len):
    """How many stripes: the first lane's chunks (no lane is longer)."""
    start, end = layout[0]
    return -(-(end - start) // chunk_len)


def information_bits(stack):
    """Exact information content of an ANS stack, in bits."""
    words, state = stack.pos()
    return 32 * words + (math.log2(state) if state else 0.0)


INCOMPRESSIBLE = 0.98     # xz saves less than 2 %: random or compressed data, the BFN is not tried


def without_bfn(data, predictor=None):
    """The frame stored or as xz, whichever is smaller, where the BFN is not worth trying
    (None where it might win): empty data; data that xz cannot shrink by 2 % (random or
    already compressed: decided without a model); with a predictor, data on which the probe
    says that the BFN cannot beat it."""
    if not len(data):
        return Frame(Method.STORED, 0, 0, b"")
    best = classical(data)
    if len(best.payload) >= INCOMPRESSIBLE * len(data):
        return best
    if predictor is not None and predictor.probe_bits(np.frombuffer(data, dtype=np.uint8)) > 8 * len(best.payload):
        return best
    return None


@functools.lru_cache(maxsize=2)
def classical(data):
    """The frame stored or as xz, whichever is smaller (bytes; the last two kept: the probe
    and the fallback of a frame ask for the same)."""
    return min([Frame(Method.XZ, len(data), 0, lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
                Frame(Method.STORED, len(data), 0, bytes(data))], key=lambda f: len(f.payload))


def encode_frame(data, predictor, sch, lane_rule=container.LANES[2], fallback=True, progress=None):
    """bytes -> Frame: bits-back coded, or (fallback) xz or stored where that is smaller, the
    BFN skipped where the probe says it cannot win.

    The frame's lanes are coded stripe by stripe on one stack, the last stripe first. The
    last stripes (the tail) are coded directly under the network's t = 0 prediction, first,
    so that the bits-back stripes find real information on the stack to pop; the tail grows
    until the stack holds what a stripe pops at its worst point.
    """
    shortcut = without_bfn(data, predictor) if fallback or not len(data) else None
    if shortcut is not None:
        if progress:
            progress(len(data))
        return shortcut
    arr = np.frombuffer(data, dtype=np.uint8)
    L = predictor.chunk_len
    others = [classical(data)] if fallback else []
    stats = coder.Stats(bfn_bytes=len(data))
    stack = coder.AnsCoder()
    plan = list(stripes(lanes(len(arr), L, lane_rule), L))
    widest = 8 * sum(b - a for a, b in plan[0])
    need = widest * sch.peak_pop_bits(widest)
    contexts, states, previous = predictor.contexts(), [], [arr[:0]] * len(plan[0])
    for chunks in plan:
        states.append(contexts.advance(previous[:len(chunks)]))
        previous = [arr[a:b] for a, b in chunks]
    tail = 0
    for k, chunks in reversed(list(enumerate(plan))):
        bits = coder.bytes_to_bits(np.concatenate([arr[a:b] for a, b in chunks]))
        predict = predictor.for_stripe(states[k], [b - a for a, b in chunks])
        if tail == len(plan) - 1 - k and information_bits(stack) < need:
            coder.encode_direct(stack, predictor.family, bits, predict, stats)
            tail += 1
        else:
            coder.encode_chunk(stack, sch, predictor.family, bits, predict, k, stats)
        if progress:
            progress(len(bits) // 8)
    stats.coded_bits = information_bits(stack)
    stats.bfn_bytes -= stats.direct_bytes
    frame = Frame(Method.BITS_BACK, len(data), tail, stack.get_compressed().astype("<u4").tobytes(), stats)
    return min([frame] + others, key=lambda f: len(f.payload))


class DrainGuard:
    """The decoder's ANS stack for bits-back stripes: refuses to pop once it is empty. The
    encoder pops a bits-back stripe only from a stack holding at least what the stripe pops at
    its worst (the tail sees to that), so an intact frame never gets there; a damaged or
    crafted payload does, soon, where constriction would read zeros to the frame's end.
    (A directly coded tail may pop an empty stack: its first symbols can cost nothing.)"""

    def __init__(self, stack):
        self.stack = stack

    def decode(self, *args):
        if self.stack.is_empty():
            raise CorruptError("corrupted data or wrong model: the stream ends before the frame")
        return self.stack.decode(*args)

    def __getattr__(self, name):
        return getattr(self.stack, name)


XZ_MEMLIMIT = 128 << 20     # bytes an xz frame may ask of the decoder (preset 9e asks about 65 MiB)


def decode_frame(frame, predictor, sch, lane_rule=container.LANES[2], progress=None):
    if frame.method == Method.STORED:
        if len(frame.payload) != frame.raw_len:
            raise CorruptError("corrupted stored frame")
        return frame.payload
    if frame.method == Method.XZ:
        try:   # only what the encoder writes (.xz, preset 9e: a 64 MiB dictionary), in bounded memory
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT).decompress(
                frame.payload, max_length=frame.raw_len + 1)
        except (lzma.LZMAError, MemoryError):
            raise CorruptError("corrupted xz frame") from None
        if len(out) != frame.raw_len:
            raise CorruptError("corrupted xz frame")
        return out
    L = predictor.chunk_len
    layout = lanes(frame.raw_len, L, lane_rule)
    count = stripe_count(layout, L)
    if len(frame.payload) % 4 or frame.tail_chunks > count:
        raise CorruptError("corrupted frame")
    out = np.zeros(frame.raw_len, dtype=np.uint8)
    try:
        stack = coder.AnsCoder(np.frombuffer(frame.payload, dtype="<u4").astype(np.uint32))
        guarded = DrainGuard(stack)
        contexts, previous = predictor.contexts(), [out[:0]] * len(layout)
        for k, chunks in enumerate(stripes(layout, L)):
            lengths = [b - a for a, b in chunks]
            predict = predictor.for_stripe(contexts.advance(previous[:len(chunks)]), lengths)
            if k >= count - frame.tail_chunks:
                bits = coder.decode_direct(stack, predictor.family, 8 * sum(lengths), predict)
            else:
                bits = coder.decode_chunk(guarded, sch, predictor.family, 8 * sum(lengths), predict, k)
            stripe = coder.bits_to_bytes(bits)
            for (a, b), at in zip(chunks, np.cumsum([0] + lengths[:-1])):
                out[a:b] = stripe[at:at + b - a]
            previous = [out[a:b] for a, b in chunks]
            if progress:
                progress(sum(lengths))
    except CorruptError:
        raise
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
    predictor: object         # predictor.Predictor
    schedule: coder.Schedule
    fingerprint: str
    lane_rule: container.LaneRule     # the file's format's lane rule (container.LANES)
    version: int                      # the file's format version

    def header(self, frame_size, length, crc):
        """The .bfn header of a file with frames coded by this setup."""
        return container.Header(self.fingerprint, self.schedule.n, int(self.schedule.r), self.predictor.chunk_len,
                                self.predictor.cfg.context_len, frame_size, length, crc, self.version)


@functools.lru_cache(maxsize=2)
def load_setup(model_path, steps, bins, chunk_len=None, version=None):
    """Load the model for coding (once per process and setting); torch runs on one thread.
    chunk_len: the chunk length to code with (None: the model's default); version: the
    format version of the file (None: the one written now for this model)."""
    from .predictor import Predictor
    model, fingerprint, _ = _load_model(model_path)
    version = version or container.version_for(model.cfg)
    return Setup(Predictor(model, chunk_len, version),
                 coder.Schedule(steps, model.cfg.beta1, bins), fingerprint, container.LANES[version], version)


def compression_setup(model_path, level, steps, bins, chunk_len):
    """load_setup for compressing: a level's steps and chunk length, or those given."""
    model = _load_model(model_path)[0]
    steps, chunk_len = coding_settings(model, level, steps, chunk_len)
    return load_setup(model_path, steps, bins, chunk_len, container.version_for(model.cfg))


def decompression_setup(model_path, header):
    """load_setup for the frames of a file with this header, once the model is checked
    against it. Raises FormatError."""
    model, fingerprint, _ = _load_model(model_path)
    if fingerprint != header.model:
        raise container.FormatError(f"this file needs model {header.model}, but the model given is "
                                    f"{fingerprint} ({model_path}); pass the right one with --model")
    if header.chunk_len not in model.chunk_lens or header.context_len != model.cfg.context_len \
            or not container.readable(header.version, model.cfg):
        raise container.FormatError("corrupted .bfn file (settings differ from the model's)")
    return load_setup(model_path, header.steps, header.bins, header.chunk_len, header.version)


@functools.lru_cache(maxsize=2)
def _load_model(model_path):
    from .model import load_weights
    return load_weights(model_path)


def compress_job(setup, data, progress=None, fallback=True):
    """A frame that may need the model (probed here where fallback), and the header of a file
    whose frames its setup coded (its sizes and checksum left to the caller)."""
    frame = encode_frame(data, setup.predictor, setup.schedule, setup.lane_rule, fallback, progress)
    return frame, setup.header(0, 0, 0)


def decode_job(setup, frame, progress=None):
    try:
        return decode_frame(frame, setup.predictor, setup.schedule, setup.lane_rule, progress)
    except CorruptError as e:
        return e


def _init_worker(model_path):
    _load_model(model_path)


def _in_worker(job, make_setup, settings, item):
    return job(make_setup(*settings), item)


@contextlib.contextmanager
def worker_pool(workers, frames, model_path):
    """Worker processes for `frames` frames (None where one process codes them all: one worker
    or one frame), started at once so that they import torch and load the model; they probe
    and check what needs the model, so that this process never loads it; they are stopped on
    leaving."""
    if min(workers, frames) <= 1:
        yield None
        return
    with _start_pool(min(workers, frames), model_path) as pool:
        yield pool


def _start_pool(workers, model_path):
    """A pool of `workers` spawned processes, each loading the model (_load_model(model_path)).

    They start with /dev/null as stderr: a Ctrl-C while they import torch then shows no
    traceback of theirs (results and errors come back through the pool; this process reports
    the interrupt and stops them). A Ctrl-C here is held back until the pool is up: raised
    inside Pool(), it would leave a half-built pool behind."""
    import multiprocessing as mp
    caught = []
    handler = signal.getsignal(signal.SIGINT)
    hold = callable(handler) and threading.current_thread() is threading.main_thread()
    if hold:
        signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    sys.stderr.flush()
    stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        pool = mp.get_context("spawn").Pool(workers, _init_worker, (model_path,))
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(devnull)
        if hold:
            signal.signal(signal.SIGINT, handler)
    if caught:
        pool.terminate()
        raise KeyboardInterrupt
    return pool


def run_frames(job, items, settings, pool, progress=None, size=len, make_setup=load_setup):
    """Map job(setup, item[, progress]) over frames in a `worker_pool` (None: in this process);
    the setup is make_setup(*settings), made where the job runs.
    Results keep their order. progress(n_bytes) is called as bytes are done: per chunk in this
    process, per frame in a pool."""
    if pool is None or len(items) <= 1:
        setup = make_setup(*settings)
        return [job(setup, item, progress) for item in items]
    results = []
    for item, res in zip(items, pool.imap(functools.partial(_in_worker, job, make_setup, settings), items)):
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


def cores():
    """The cores this process may run on."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1


def default_workers():
    return max(1, min(cores(), 8))


# ---- levels: presets of the coding knobs ----

@dataclasses.dataclass(frozen=True)
class Level:
    steps: int             # n as a multiple of default_steps (0: one step); coding time grows with n, the ratio barely
    chunk: str             # of the chunk lengths the model codes: "longest" (fastest), "default", "shortest"


LEVELS = {
    1: Level(0, "longest"),
    2: Level(1, "longest"),
    3: Level(2, "longest"),
    4: Level(0, "default"),
    5: Level(0, "shortest"),
    6: Level(1, "default"),        # DEFAULT_LEVEL: the model's defaults
    7: Level(2, "shortest"),
    8: Level(3, "shortest"),
    9: Level(5, "shortest"),
}
DEFAULT_LEVEL = 6
DEFAULT_STEPS = 10


def default_steps(model):
    """The step count files are coded with unless a level or --steps says otherwise: the
    model's `coding_steps` (DEFAULT_STEPS where it names none)."""
    return model.cfg.coding_steps or DEFAULT_STEPS


def default_chunk_len(model):
    return model.cfg.coding_chunk_len or model.cfg.chunk_len


def coding_settings(model, level=None, steps=None, chunk_len=None):
    """(steps, chunk length) of a level (None: DEFAULT_LEVEL); steps or chunk_len given override it."""
    preset = LEVELS[check_level(level)]
    lens = model.chunk_lens
    preset_len = {"longest": max(lens), "default": default_chunk_len(model), "shortest": min(lens)}[preset.chunk]
    return steps or max(1, preset.steps * default_steps(model)), chunk_len or preset_len


def check_level(level):
    """The level (None: DEFAULT_LEVEL); ValueError for one that does not exist."""
    level = DEFAULT_LEVEL if level is None else level
    if level not in LEVELS:
        raise ValueError(f"no level {level!r} (levels: {min(LEVELS)} to {max(LEVELS)})")
    return level


# ---- whole files ----

DEFAULT_MODEL = shipped.PATH
DEFAULT_BINS = 4
FRAME_SIZE = 1 << 18
MIN_SPLIT = 1 << 15
MAX_LANES = 64


def compress(data, model_path=None, steps=None, bins=DEFAULT_BINS, frame_size=FRAME_SIZE,
             workers=1, progress=None, fallback=True, chunk_len=None, level=None):
    """bytes -> (.bfn bytes, coder.Stats summed over the frames). level: a preset of the steps
    and the chunk length (LEVELS; None: DEFAULT_LEVEL); steps and chunk_len, where given,
    override it (chunk_len: where the model knows several). A file whose frames all need no
    model (empty, random or already compressed) never loads one; its header names none
    (container.NO_MODEL)."""
    level = check_level(level)
    parts = split_frames(bytes(data), frame_size)
    # decided without a model here; the rest probed and coded where the model is (workers, or here)
    frames = [without_bfn(part) if fallback or not part else None for part in parts]
    header = container.Header(container.NO_MODEL, 0, 0, 0, 0, frame_size, len(data), checksum(data),
                              container.NO_MODEL_VERSION)
    if progress:
        progress(sum(f.raw_len for f in frames if f is not None))
    todo = [k for k, f in enumerate(frames) if f is None]
    if todo:
        model_path = model_path or DEFAULT_MODEL
        with worker_pool(workers, len(todo), model_path) as pool:
            coded = run_frames(functools.partial(compress_job, fallback=fallback), [parts[k] for k in todo],
                               (model_path, level, steps, bins, chunk_len), pool, progress,
                               make_setup=compression_setup)
        for k, (frame, coded_header) in zip(todo, coded):
            frames[k] = frame
            if frame.method == Method.BITS_BACK:                    # else the file needs no model
                header = dataclasses.replace(coded_header, frame_size=frame_size, length=len(data),
                                             crc=checksum(data))
    blob = container.pack(header, frames, [checksum(p) for p in parts])
    stats = sum((f.stats for f in frames if f.method == Method.BITS_BACK), coder.Stats())
    stats.other_bytes = sum(len(f.payload) for f in frames if f.method != Method.BITS_BACK)
    return blob, stats


def expected_bits(stats):
    """The model's n-step loss for all bits-back frames: its rate on the bits-back chunks, applied to
    the directly coded tail too (or the tail's direct code length where there is nothing else)."""
    if not stats.bfn_bytes:
        return stats.direct_bits
    return stats.model_bits / stats.bfn_bytes * (stats.bfn_bytes + stats.direct_bytes)


def coder_excess_bits(stats):
    """What the bits-back chunks cost beyond the model's loss on their trajectories."""
    return stats.coded_bits - stats.direct_bits - stats.model_bits


def decompress(blob, model_path=None, workers=1, progress=None):
    """.bfn bytes -> the original bytes, verified against every checksum; concatenated .bfn
    files give the concatenation of their originals. Raises FormatError."""
    return b"".join(_decompress_member(*member, model_path, workers, progress) for member in container.members(blob))


def _decompress_member(header, frames, crcs, model_path, workers, progress):
    if any(f.method == Method.BITS_BACK for f in frames):
        model_path = model_path or DEFAULT_MODEL
        with worker_pool(workers, sum(f.method == Method.BITS_BACK for f in frames), model_path) as pool:
            results = run_frames(decode_job, frames, (model_path, header), pool, progress,
                                 size=lambda f: f.raw_len, make_setup=decompression_setup)
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
