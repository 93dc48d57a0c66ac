"""bfn-codec: lossless compression with Bayesian Flow Networks and bits-back ANS coding.

    import bfn_codec
    blob = bfn_codec.compress(b"some bytes")           # the shipped model, level 6
    assert bfn_codec.decompress(blob) == b"some bytes"

Data that is not an intact .bfn file raises FormatError. Importing the package does not
import torch; the functions do.
"""
from .container import FormatError

__version__ = "0.1.0"
__all__ = ["compress", "decompress", "FormatError"]


def compress(data, level=None, *, model=None, workers=1):
    """bytes -> .bfn bytes. level: 1 (fastest) to 9 (smallest), None: the default (codec.LEVELS);
    model: a weights file (None: the shipped model); workers: processes coding frames in parallel."""
    from . import codec
    if isinstance(data, str):
        raise TypeError("compress takes bytes, not str")
    return codec.compress(memoryview(data).tobytes(), model, level=level, workers=workers)[0]


def decompress(blob, *, model=None, workers=1):
    """.bfn bytes (or several .bfn files concatenated) -> the original bytes, verified against
    their checksums. Raises FormatError where blob is not an intact .bfn file, or needs
    another model than the one given."""
    from . import codec
    return codec.decompress(memoryview(blob).tobytes(), model, workers=workers)
