"""The errors a user sees, each with a one-line message (importing this needs no torch)."""


class FormatError(ValueError):
    """Not a .bfn file, or a damaged one; the message says which, in one line."""


class CorruptError(FormatError):
    """The stream cannot be decoded to the bytes it was made from."""


class ModelError(ValueError):
    """A weights file that is missing or cannot be loaded."""
