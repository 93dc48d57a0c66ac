"""The codecs under test: each has `name`, `label`, `compress(data) -> bytes`, `decompress(blob) -> bytes`.

Baselines use the Python bindings of the standard libraries at their strongest settings.
bfn-codec additionally sets `stats` after each compress: the model's expected code length
(`expected_bits`), its loss on the coded trajectories (`model_bits`) and the coder's excess over it.
"""
import bz2
import gzip
import lzma
import os

PPMD_MEM = 192 << 20  # 7-Zip's PPMd memory at -mx9


class Codec:
    name = label = ""
    fast = True  # False: run it once per file, not best of several runs

    def compress(self, data):
        raise NotImplementedError

    def decompress(self, blob):
        raise NotImplementedError


class Gzip(Codec):
    name, label = "gzip-9", "gzip -9"

    def compress(self, data):
        return gzip.compress(data, compresslevel=9, mtime=0)

    def decompress(self, blob):
        return gzip.decompress(blob)


class Bzip2(Codec):
    name, label = "bzip2-9", "bzip2 -9"

    def compress(self, data):
        return bz2.compress(data, 9)

    def decompress(self, blob):
        return bz2.decompress(blob)


class Xz(Codec):
    name, label = "xz-9e", "xz -9e"

    def compress(self, data):
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)

    def decompress(self, blob):
        return lzma.decompress(blob, format=lzma.FORMAT_XZ)


class Zstd(Codec):
    def __init__(self, level):
        import zstandard
        self.zstd, self.level = zstandard, level
        self.name = f"zstd-{level}"
        self.label = f"zstd --ultra -{level}" if level > 19 else f"zstd -{level}"

    def compress(self, data):
        return self.zstd.ZstdCompressor(level=self.level).compress(data)

    def decompress(self, blob):
        return self.zstd.ZstdDecompressor().decompress(blob)


class Brotli(Codec):
    name, label = "brotli-11", "brotli -q 11 -w 24"

    def __init__(self):
        import brotli
        self.brotli = brotli

    def compress(self, data):
        return self.brotli.compress(data, quality=11, lgwin=24)

    def decompress(self, blob):
        return self.brotli.decompress(blob)


class Ppmd(Codec):
    """PPMd variant H (7-Zip's PPMd) with the original length in front, as 7-Zip keeps it in its header.

    pyppmd's encoder drops output bytes when one symbol's output crosses the end of its
    32 KiB output block (seen on plrabn12.txt at order 16), so input is fed in small pieces
    whose output always fits in one block; its variant I (pyppmd.compress) fails on random data.
    """
    PIECE = 4096

    def __init__(self, order):
        import pyppmd
        self.pyppmd, self.order = pyppmd, order
        self.name, self.label = f"ppmd-{order}", f"PPMd H order {order}, {PPMD_MEM >> 20} MiB"

    def compress(self, data):
        enc = self.pyppmd.Ppmd7Encoder(self.order, PPMD_MEM)
        out = [uvarint(len(data))]
        out += [enc.encode(data[a:a + self.PIECE]) for a in range(0, len(data), self.PIECE)]
        out.append(enc.flush(endmark=False))
        return b"".join(out)

    def decompress(self, blob):
        n, start = read_uvarint(blob)
        data = self.pyppmd.Ppmd7Decoder(self.order, PPMD_MEM).decode(blob[start:], n)
        if len(data) != n:
            raise ValueError(f"PPMd decoded {len(data)} bytes, expected {n}")
        return data


class Bfn(Codec):
    """bfn-codec at `steps` with every frame coded by the model (bfn-N), or, with `fallback`,
    the default path a user gets (bfn-default: per frame the smallest of BFN, xz, stored)."""
    fast = False

    def __init__(self, steps, model_path, workers, fallback=False):
        from bfn_codec import codec
        self.codec, self.steps, self.model_path, self.workers = codec, steps, model_path, workers
        self.fallback = fallback
        self.name, self.label = (("bfn-default", f"bfn-codec default ({steps} steps, xz or stored where smaller)")
                                 if fallback else (f"bfn-{steps}", f"bfn-codec {steps} steps"))
        self.stats = None

    def compress(self, data):
        blob, stats = self.codec.compress(data, model_path=self.model_path, steps=self.steps, workers=self.workers,
                                          fallback=self.fallback)
        self.stats = {"expected_bits": self.codec.expected_bits(stats), "model_bits": stats.model_bits,
                      "excess_bits": self.codec.coder_excess_bits(stats)}
        return blob

    def decompress(self, blob):
        return self.codec.decompress(blob, model_path=self.model_path, workers=self.workers)


def uvarint(n):
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_uvarint(buf):
    n = shift = pos = 0
    while True:
        b = buf[pos]
        n |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return n, pos
        shift += 7


BASELINES = {"gzip-9": Gzip, "bzip2-9": Bzip2, "xz-9e": Xz, "zstd-19": lambda: Zstd(19),
             "zstd-22": lambda: Zstd(22), "brotli-11": Brotli, "ppmd-6": lambda: Ppmd(6),
             "ppmd-16": lambda: Ppmd(16)}


def default_model():
    from bfn_codec.codec import DEFAULT_MODEL
    return DEFAULT_MODEL


def make(name, model_path=None, workers=1):
    """One codec from its name (e.g. "zstd-19", "bfn-10"); raises ImportError if its package is missing."""
    if name == "bfn-default":
        from bfn_codec.codec import default_steps
        from bfn_codec.model import load_weights
        path = model_path or default_model()
        return Bfn(default_steps(load_weights(path)[0]), path, workers, fallback=True)
    if name.startswith("bfn-"):
        return Bfn(int(name[4:]), model_path or default_model(), workers)
    return BASELINES[name]()


def select(spec, bfn_steps, model_path, workers):
    """Codecs whose name or family (the part before "-") is in the comma list `spec` (None: all).

    Returns (codecs, notes), notes saying what was skipped and why.
    """
    names = list(BASELINES) + ["bfn-default"] + [f"bfn-{s}" for s in bfn_steps]
    if spec:
        wanted = [w.strip() for w in spec.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(w in (n, n.split("-")[0]) for n in names)]
        if unknown:
            raise ValueError(f"unknown codec(s) {', '.join(unknown)}; known: {', '.join(names)} "
                             "(a family such as 'zstd' or 'bfn' selects all of its settings)")
        names = [n for n in names if n in wanted or n.split("-")[0] in wanted]
    codecs, notes = [], []
    bfn_missing = False
    for name in names:
        if name.startswith("bfn-"):
            if bfn_missing:
                continue
            path = model_path or default_model()
            if not os.path.exists(path):
                notes.append(f"bfn-codec skipped: model file {path} does not exist (pass --model PATH).")
                bfn_missing = True
                continue
        try:
            codecs.append(make(name, model_path, workers))
        except ImportError as e:
            notes.append(f"{name} skipped: {e} (pip install -e '.[bench]').")
    return codecs, notes
