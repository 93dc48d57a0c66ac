"""Command line: bfn-compress, bfn-decompress (bfn-train, bfn-sample: train_cli.py). Thin: parse, call, report.

Exit codes: 0 success, 1 error (a one-line message on stderr), 2 a malformed command line.
"""
import contextlib
import os
import signal
import sys
import tempfile
import time

import click


def __getattr__(name):
    """bfn-train and bfn-sample live in train_cli (they import torch); entry points installed
    before the move still find them here."""
    if name in ("train_cmd", "sample_cmd"):
        from . import train_cli
        return getattr(train_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- compress / decompress ----

SUFFIX = ".bfn"


class Fail(Exception):
    """A one-line error for the user; processing goes on with the next file."""


def _read(path):
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Fail(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Fail(f"{path}: is a directory") from None
    except OSError as e:
        raise Fail(f"{path}: {e.strerror}") from None


@contextlib.contextmanager
def _interrupt_as_error():
    """Turn SIGTERM into KeyboardInterrupt so that partial outputs are removed either way."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write(path, data, force, mode=None):
    """Write atomically: a temporary file in the same folder, renamed when complete."""
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if os.path.exists(path) and not force:
        raise Fail(f"{path}: already exists; not overwritten (use -f)")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bfn-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode_of(src):
    return None if src == "-" else os.stat(src).st_mode & 0o777


def _progress(total, label, quiet):
    """A click progress bar on stderr when it is a terminal, else nothing."""
    if quiet or not sys.stderr.isatty() or total < 4096:
        return contextlib.nullcontext(None)
    return click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True)


def _output_name(src, output, to_stdout, decompress):
    if to_stdout or src == "-":
        return output or "-"
    if output:
        return output
    if decompress:
        if not src.endswith(SUFFIX):
            raise Fail(f"{src}: unknown suffix (expected {SUFFIX}); use -o to name the output")
        return src[:-len(SUFFIX)]
    return src + SUFFIX


def _compress_one(src, dst, opts):
    from . import codec
    model = _model_path(opts["model"])
    data = _read(src)
    if dst == "-" and sys.stdout.isatty() and not opts["force"]:
        raise Fail("refusing to write compressed data to a terminal (use -o FILE, or -f)")
    if dst != "-" and os.path.exists(dst) and not opts["force"]:
        raise Fail(f"{dst}: already exists; not overwritten (use -f)")
    t0 = time.time()
    with _progress(len(data), os.path.basename(src) if src != "-" else "stdin", opts["quiet"]) as bar:
        blob, stats = codec.compress(data, model, opts["steps"], frame_size=opts["frame_size"],
                                     workers=opts["threads"], progress=bar.update if bar else None,
                                     fallback=opts["fallback"], chunk_len=opts["chunk_len"])
    seconds = time.time() - t0
    _write(dst, blob, opts["force"], _mode_of(src))
    if opts["verbose"]:
        click.echo(_report(src, len(data), len(blob), stats, seconds), err=True)


def _report(src, size, out_size, stats, seconds):
    """One line: sizes, bits per byte, the model's expected size, and what coding added to it:
    the coder's excess on the bits-back chunks, and the fixed cost (header, ANS flush, and the
    directly coded tail's excess over the model's rate)."""
    from .codec import coder_excess_bits, expected_bits
    n = max(size, 1)
    line = f"{src} : {size} -> {out_size} bytes ({100 * out_size / n:.2f}%), {8 * out_size / n:.4f} bits/byte"
    if stats.coded_bits:
        model = expected_bits(stats) / 8 + stats.other_bytes
        excess = coder_excess_bits(stats) / 8
        coder = 100 * excess / (stats.model_bits / 8) if stats.model_bits else 0.0
        line += (f"; model {8 * model / n:.4f} bits/byte ({model:.0f} bytes), overhead {out_size - model:+.0f} "
                 f"bytes: coder {coder:+.2f}%, fixed {out_size - model - excess:.0f} bytes")
    return line + f"; {size / 1024 / max(seconds, 1e-9):.2f} KB/s"


def _decompress_one(src, dst, opts, test):
    from . import codec
    from .container import FormatError
    from .model import ModelError
    blob = _read(src)
    if not test and dst != "-" and os.path.exists(dst) and not opts["force"]:
        raise Fail(f"{dst}: already exists; not overwritten (use -f)")
    t0 = time.time()
    try:
        header = codec.container.unpack(blob)[0]
        with _progress(header.length, os.path.basename(src) if src != "-" else "stdin", opts["quiet"]) as bar:
            data = codec.decompress(blob, opts["model"], workers=opts["threads"],
                                    progress=bar.update if bar else None)
    except (FormatError, ModelError) as e:
        raise Fail(f"{src}: {e}") from None
    seconds = time.time() - t0
    if not test:
        _write(dst, data, opts["force"], _mode_of(src))
    if opts["verbose"] or (test and not opts["quiet"]):
        click.echo(f"{src} : {'OK, ' if test else ''}{len(blob)} -> {len(data)} bytes; "
                   f"{len(data) / 1024 / max(seconds, 1e-9):.2f} KB/s", err=True)


def _model_path(model):
    from . import codec
    path = model or codec.DEFAULT_MODEL
    if not os.path.isfile(path):
        raise Fail(f"no model at {path}" + ("" if model else " (this installation ships none; pass --model)"))
    return path


def _run(files, output, stdout, force, test, decompress, opts):
    from .container import FormatError
    from .model import ModelError
    files = list(files) or ["-"]
    if (output or (stdout and not (decompress or test))) and len(files) > 1:
        click.echo("bfn: -o and -c take a single input file when compressing", err=True)
        sys.exit(1)
    failed = False
    for src in files:
        try:
            if src != "-" and not os.path.isfile(src):
                raise Fail(f"{src}: no such file" if not os.path.exists(src) else f"{src}: not a regular file")
            dst = None if test else _output_name(src, output, stdout, decompress)
            with _interrupt_as_error():
                if decompress or test:
                    _decompress_one(src, dst, opts, test)
                else:
                    _compress_one(src, dst, opts)
        except Fail as e:
            click.echo(f"bfn: {e}", err=True)
            failed = True
        except (ModelError, FormatError, OSError) as e:
            click.echo(f"bfn: {src}: {e}", err=True)
            failed = True
        except KeyboardInterrupt:
            click.echo("bfn: interrupted", err=True)
            sys.exit(1)
    sys.exit(1 if failed else 0)


def _codec_options(f):
    for opt in reversed([
        click.option("-o", "--output", type=click.Path(dir_okay=False), help="write to this file (one input only)"),
        click.option("-c", "--stdout", "stdout", is_flag=True, help="write to standard output"),
        click.option("-f", "--force", is_flag=True, help="overwrite existing outputs"),
        click.option("-t", "--test", is_flag=True, help="check .bfn files: decode and verify, write nothing"),
        click.option("--steps", type=click.IntRange(1, 1000), default=None,
                     help="n, the number of BFN steps (more: smaller and slower) [default 10]"),
        click.option("--chunk-len", type=click.IntRange(1, 65535), default=None,
                     help="bytes per chunk, where the model knows several (shorter: smaller and slower) "
                          "[default: the model's]"),
        click.option("--model", type=click.Path(dir_okay=False), default=None,
                     help="weights file or checkpoint [default: the shipped model]"),
        click.option("-T", "--threads", type=click.IntRange(1, 64), default=None,
                     help="worker processes for independent frames [default: cores]"),
        click.option("--frame-size", type=click.IntRange(1, 1 << 30), default=None,
                     help="bytes per independently coded frame [default 256 KiB]"),
        click.option("--no-fallback", is_flag=True,
                     help="code every frame with the model, even where raw or xz would be smaller"),
        click.option("-v", "--verbose", is_flag=True, help="report sizes, model loss, overhead, speed"),
        click.option("-q", "--quiet", is_flag=True, help="no progress, no messages but errors"),
        click.argument("files", nargs=-1, type=click.Path()),
    ]):
        f = opt(f)
    return f


def _opts(steps, chunk_len, model, threads, frame_size, no_fallback, verbose, quiet, force):
    from . import codec
    return {"steps": steps or codec.DEFAULT_STEPS, "chunk_len": chunk_len, "model": model, "threads": threads or codec.default_workers(),
            "frame_size": frame_size or codec.FRAME_SIZE, "fallback": not no_fallback, "verbose": verbose and not quiet, "quiet": quiet,
            "force": force}


@click.command()
@click.option("-d", "--decompress", is_flag=True, help="decompress (as bfn-decompress)")
@_codec_options
def compress_cmd(decompress, output, stdout, force, test, steps, chunk_len, model, threads, frame_size, no_fallback,
                 verbose, quiet, files):
    """Compress FILES to FILE.bfn (no FILES or '-': standard input to standard output)."""
    _run(files, output, stdout, force, test, decompress,
         _opts(steps, chunk_len, model, threads, frame_size, no_fallback, verbose, quiet, force))


@click.command()
@_codec_options
def decompress_cmd(output, stdout, force, test, steps, chunk_len, model, threads, frame_size, no_fallback, verbose,
                   quiet, files):
    """Decompress FILE.bfn to FILE (no FILES or '-': standard input to standard output)."""
    _run(files, output, stdout, force, test, True,
         _opts(steps, chunk_len, model, threads, frame_size, no_fallback, verbose, quiet, force))
