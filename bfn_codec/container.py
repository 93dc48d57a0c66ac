"""The .bfn file format (versions 2 to 7). All integers little-endian.

Version 2 files are coded with a model whose output is independent bits, a frame as one
lane; versions 3 to 6 with a joint 256-way output per byte, a frame as lanes (codec.lanes:
version 3 one per 2048 bytes; 4 to 6 also up to 16 lanes of at least 512 bytes in a short
frame). Versions 5 to 7 run the context network on int8 grids, the others in float64: 5 and
6 in torch (exact.py), 7 in the compiled kernel, whose every float operation is defined
(context.py). Versions 3 to 5 code a byte coordinate by coordinate (coder.Bytes), 6 and 7 as
one 256-way symbol at every step (coder.JointBytes). The layout is the same.

    magic      4  b"BFN\\x1a"
    version    1
    model     16  fingerprint of the model (ASCII hex), see model.fingerprint; zeros when
                  no frame needs a model (then steps, bins, chunk and context are 0)
    steps      2  n, the number of BFN steps
    bins       1  grid bins per receiver standard deviation
    chunk      2  chunk length in bytes: one the model codes (a level or --chunk-len chose it)
    context    2  clean context in bytes: the model's context_len, checked on decoding
    frame      4  frame size in bytes
    length     8  original length in bytes
    crc        4  zlib.crc32 of the original
    frames     4  number of frames
    per frame: method 1 (0 stored, 1 bits-back, 2 xz), raw length 4, tail chunks 4, payload length 4,
               crc32 of the frame's bytes 4
    header_crc 4  zlib.crc32 of everything above
    payloads      the frames' payloads, in order

Concatenated .bfn files (members) are one .bfn file of their concatenated contents; after
the last member nothing may follow. The frame table is checked against the frame size and
the declared length before any frame is read, so that a decoder allocates at most the
frame size per frame, whatever a damaged or crafted file claims.
"""
import dataclasses
import enum
import struct
import zlib

from .errors import CorruptError, FormatError  # noqa: F401  (raised here, caught as container.FormatError)


MAGIC = b"BFN\x1a"
VERSIONS = {"bits": 2, "bytes": 7}     # written, by output family; 2 whitens before the pops of every step
READS = {"bits": (2,), "bytes": (3, 4, 5, 6, 7)}   # read, by output family
INTEGER_CONTEXT = frozenset({5, 6, 7})   # versions whose context network codes on int8 grids (exact.py)
COMPILED_CONTEXT = frozenset({7})        # ... in the compiled kernel (context.py)
JOINT_BYTES = frozenset({6, 7})             # versions that code each byte as one symbol per step (coder.JointBytes)
NO_MODEL_VERSION = 3                     # a file whose frames need no model: one that earlier releases read


@dataclasses.dataclass(frozen=True)
class LaneRule:
    """How a frame of n bytes splits into lanes (codec.lanes): n // long lanes (long = 0: one
    lane), and a short frame up to `few` lanes, n // short of them; lanes of about n / count
    bytes (the last may be shorter, and rounding to the chunk length may leave fewer). A
    lane's start costs about 15 bits (its first bytes lack context); each lane shares every
    network and coder call."""
    long: int
    short: int = 0
    few: int = 0


LANES = {2: LaneRule(0), 3: LaneRule(2048), 4: LaneRule(2048, 512, 16), 5: LaneRule(2048, 512, 16),
         6: LaneRule(2048, 512, 16), 7: LaneRule(2048, 512, 16)}   # by version


NO_MODEL = "0" * 16      # the model field of a file whose frames need none (all stored or xz)


INTEGER_DESIGNS = ("sar",)      # designs whose coding-time context runs on int8 grids (exact.py)


def version_for(cfg):
    """The format version of files coded with a model of this config: by its output family;
    a design without an integer context network writes the newest version that has none."""
    version = VERSIONS[cfg.output]
    if version in INTEGER_CONTEXT and cfg.arch not in INTEGER_DESIGNS:
        version = max(v for v in READS[cfg.output] if v not in INTEGER_CONTEXT)
    return version


def readable(version, cfg):
    """Whether a model of this config decodes files of this format version."""
    return version in READS[cfg.output] and (version not in INTEGER_CONTEXT or cfg.arch in INTEGER_DESIGNS)
_HEAD = struct.Struct("<4sB16sHBHHIQII")
_FRAME = struct.Struct("<BIIII")
_CRC = struct.Struct("<I")


MAX_FRAME_SIZE = 1 << 30      # bytes: what a decoder allocates per frame at most
MAX_STEPS = 1000              # n: the most steps a file may ask of a decoder
MIN_FRAME_SIZE = 256          # the smallest the tools accept: below, a frame's fixed costs outweigh it


class Method(enum.IntEnum):
    """How a frame's payload is coded."""
    STORED = 0
    BITS_BACK = 1
    XZ = 2


@dataclasses.dataclass
class Frame:
    method: Method
    raw_len: int
    tail_chunks: int          # bits-back frames: how many last chunks were coded directly
    payload: bytes
    stats: object = None      # encoder only, bits-back frames: coder.Stats


@dataclasses.dataclass
class Header:
    model: str                # the model's fingerprint
    steps: int
    bins: int
    chunk_len: int
    context_len: int
    frame_size: int
    length: int
    crc: int
    version: int = VERSIONS["bits"]


def pack(header, frames, frame_crcs):
    head = _HEAD.pack(MAGIC, header.version, header.model.encode("ascii"), header.steps, header.bins,
                      header.chunk_len, header.context_len, header.frame_size, header.length,
                      header.crc, len(frames))
    head += b"".join(_FRAME.pack(f.method, f.raw_len, f.tail_chunks, len(f.payload), c)
                     for f, c in zip(frames, frame_crcs))
    return head + _CRC.pack(zlib.crc32(head)) + b"".join(f.payload for f in frames)


def unpack(blob):
    """One .bfn file -> (Header, [Frame], [frame crc]); raises FormatError with a one-line reason."""
    header, frames, crcs, end = _unpack_member(blob, 0)
    if end != len(blob):
        raise FormatError("corrupted .bfn file (trailing data after the last frame)")
    return header, frames, crcs


def members(blob):
    """Concatenated .bfn files -> [(Header, [Frame], [frame crc])], one per member, in order."""
    out, pos = [], 0
    while not out or pos < len(blob):
        if out and blob[pos:pos + len(MAGIC)] != MAGIC:
            raise FormatError("corrupted .bfn file (trailing data after the last frame)")
        header, frames, crcs, pos = _unpack_member(blob, pos)
        out.append((header, frames, crcs))
    return out


def _unpack_member(blob, start):
    """The member at blob[start:] -> (Header, [Frame], [frame crc], where it ends)."""
    if blob[start:start + len(MAGIC)] != MAGIC:
        raise FormatError("not a .bfn file (bad magic bytes)")
    if len(blob) - start < _HEAD.size:
        raise FormatError("truncated .bfn file (header)")
    magic, version, model, steps, bins, chunk, context, frame_size, length, crc, n_frames = \
        _HEAD.unpack_from(blob, start)
    readable = sorted({v for versions in READS.values() for v in versions})
    if version not in readable:
        raise FormatError(f"unsupported .bfn format version {version} (this program reads versions "
                          f"{', '.join(map(str, readable))})")
    table, table_end = start + _HEAD.size, start + _HEAD.size + n_frames * _FRAME.size
    if len(blob) < table_end + _CRC.size:
        raise FormatError("truncated .bfn file (frame table)")
    if _CRC.unpack_from(blob, table_end)[0] != zlib.crc32(blob[start:table_end]):
        raise FormatError("corrupted .bfn file (header checksum mismatch)")
    if not all(c in b"0123456789abcdef" for c in model):
        raise FormatError("corrupted .bfn file (model fingerprint)")
    header = Header(model.decode("ascii"), steps, bins, chunk, context, frame_size, length, crc, version)
    entries = [_FRAME.unpack_from(blob, table + k * _FRAME.size) for k in range(n_frames)]
    _check_table(header, entries)
    needs_model = any(method == Method.BITS_BACK for method, *_ in entries)
    if needs_model and (header.model == NO_MODEL or not (0 < steps <= MAX_STEPS and bins and chunk)):
        raise FormatError("corrupted .bfn file (coding settings)")
    frames, crcs, pos = [], [], table_end + _CRC.size
    for method, raw_len, tail_chunks, size, fcrc in entries:
        if pos + size > len(blob):
            raise FormatError("truncated .bfn file (frame data)")
        frames.append(Frame(Method(method), raw_len, tail_chunks, blob[pos:pos + size]))
        crcs.append(fcrc)
        pos += size
    return header, frames, crcs, pos


def _check_table(header, entries):
    """Every frame within the frame size, the frames adding up to the declared length, stored
    frames as long as their bytes: checked before any frame is read or allocated."""
    def fits(method, raw_len, size):
        return method in Method.__members__.values() and raw_len <= header.frame_size \
            and (method != Method.STORED or size == raw_len)
    if not 0 < header.frame_size <= MAX_FRAME_SIZE \
            or sum(raw_len for _, raw_len, _, _, _ in entries) != header.length \
            or not all(fits(method, raw_len, size) for method, raw_len, _, size, _ in entries):
        raise FormatError("corrupted .bfn file (frame table)")
