"""Command line: bfn-compress, bfn-decompress (bfn-train, bfn-sample: train_cli.py). Thin:
parse, call, report. Nothing here imports torch before a model is needed, so that --help,
-V and -l answer at once.

Exit codes: 0 success, 1 error (a one-line message on stderr; an interrupt too), 2 a
malformed command line.
"""
import collections
import contextlib
import os
import signal
import sys
import tempfile
import time

import click

from . import __version__, container, shipped

SUFFIX = ".bfn"


def __getattr__(name):
    """bfn-train and bfn-sample live in train_cli (they import torch); entry points installed
    before the move still find them here."""
    if name in ("train_cmd", "sample_cmd"):
        from . import train_cli
        return getattr(train_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _check_output(src, dst, force):
    """Refuse, before any work, an output that must not or cannot be written; the message
    names the output asked for."""
    if dst == "-":
        return
    if src != "-" and os.path.exists(dst) and os.path.samefile(src, dst):
        raise Fail(f"{dst}: would overwrite the input")
    if os.path.isdir(dst):
        raise Fail(f"{dst}: is a directory")
    if os.path.lexists(dst) and not force:
        raise Fail(f"{dst}: already exists; not overwritten (use -f)")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise Fail(f"{dst}: no such directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Fail(f"{dst}: permission denied")


def _write(path, data, force, like=None):
    """Write atomically: a temporary file in the same folder, renamed when complete, with the
    mode and modification time of the file `like` (None: a new file's mode, the time now)."""
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if os.path.lexists(path) and not force:
        raise Fail(f"{path}: already exists; not overwritten (use -f)")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bfn-", dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if like is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        else:
            st = os.stat(like)
            os.chmod(tmp, st.st_mode & 0o777)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise Fail(f"{path}: {e.strerror}") from None
        raise


def _remove_input(src, dst, data):
    """--rm: remove src once dst, read back, holds exactly data."""
    if src == "-" or dst == "-":
        return
    if _read(dst) != data:
        raise Fail(f"{dst}: does not read back as written; {src} kept")
    os.unlink(src)


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


def _workers(threads):
    """-T: None the default, 0 all cores."""
    from . import codec
    return codec.cores() if threads == 0 else threads or codec.default_workers()


def _compress_one(src, dst, opts):
    from . import codec
    from .errors import ModelError
    if dst == "-" and sys.stdout.isatty() and not opts["force"]:
        raise Fail("refusing to write compressed data to a terminal (use -o FILE, or -f)")
    _check_output(src, dst, opts["force"])
    model = _model_path(opts["model"])
    data = _read(src)
    t0 = time.time()
    try:
        with _progress(len(data), os.path.basename(src) if src != "-" else "stdin", opts["quiet"]) as bar:
            blob, stats = codec.compress(data, model, opts["steps"], frame_size=opts["frame_size"] or codec.FRAME_SIZE,
                                         workers=_workers(opts["threads"]), progress=bar.update if bar else None,
                                         fallback=opts["fallback"], chunk_len=opts["chunk_len"], level=opts["level"])
    except (container.FormatError, ModelError) as e:
        raise Fail(f"{src}: {e}") from None
    seconds = time.time() - t0
    _write(dst, blob, opts["force"], None if src == "-" else src)
    if opts["remove"]:
        _remove_input(src, dst, blob)
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
    from .errors import ModelError
    if not test:
        _check_output(src, dst, opts["force"])
    blob = _read(src)
    t0 = time.time()
    try:
        length = sum(header.length for header, _, _ in container.members(blob))
        with _progress(length, os.path.basename(src) if src != "-" else "stdin", opts["quiet"]) as bar:
            data = codec.decompress(blob, opts["model"], workers=_workers(opts["threads"]),
                                    progress=bar.update if bar else None)
    except (container.FormatError, ModelError) as e:
        raise Fail(f"{src}: {e}") from None
    seconds = time.time() - t0
    if not test:
        _write(dst, data, opts["force"], None if src == "-" else src)
        if opts["remove"]:
            _remove_input(src, dst, data)
    if opts["verbose"] or (test and not opts["quiet"]):
        click.echo(f"{src} : {'OK, ' if test else ''}{len(blob)} -> {len(data)} bytes; "
                   f"{len(data) / 1024 / max(seconds, 1e-9):.2f} KB/s", err=True)


METHOD_NAMES = {container.Method.STORED: "stored", container.Method.BITS_BACK: "bits-back",
                container.Method.XZ: "xz"}


def _list_header():
    return f"{'compressed':>12} {'original':>12} {'ratio':>8}  {'format':>6}  {'model':<16}  {'steps':>5}  frames  file"


def _list_one(src):
    """-l: one line for a .bfn file, from its headers alone (nothing is decoded)."""
    blob = _read(src)
    try:
        members = container.members(blob)
    except container.FormatError as e:
        raise Fail(f"{src}: {e}") from None
    length = sum(header.length for header, _, _ in members)
    named = [header for header, _, _ in members if header.model != container.NO_MODEL]     # a model
    models = ",".join(dict.fromkeys(header.model for header in named)) or "none"
    steps = ",".join(dict.fromkeys(str(header.steps) for header in named)) or "-"
    methods = collections.Counter(METHOD_NAMES[f.method] for _, frames, _ in members for f in frames)
    frames = ", ".join(f"{count} {name}" for name, count in methods.items())
    ratio = f"{100 * len(blob) / length:.2f}%" if length else "-"
    versions = ",".join(dict.fromkeys(str(header.version) for header, _, _ in members))
    click.echo(f"{len(blob):>12} {length:>12} {ratio:>8}  {versions:>6}  {models:<16}  {steps:>5}  {frames}  {src}")


def _model_path(model):
    path = model or shipped.PATH
    if not os.path.isfile(path):
        raise Fail(f"no model at {path}" + ("" if model else " (this installation ships none; pass --model)"))
    return path


def _run(files, output, stdout, force, test, listing, decompress, opts):
    files = list(files) or ["-"]
    if output and len(files) > 1:
        raise click.UsageError("-o takes a single input file")
    if output and stdout:
        raise click.UsageError("-o and -c exclude each other")
    if listing and (output or stdout or test or opts["remove"]):
        raise click.UsageError("-l only lists: it takes no -o, -c, -t or --rm")
    if listing:
        click.echo(_list_header())
    failed = False
    for src in files:
        try:
            if src == "-" and sys.stdin.isatty() and not force:
                raise Fail("stdin is a console; aborting (name a file, or use -f to read the console)")
            if src != "-" and not os.path.isfile(src):
                raise Fail(f"{src}: no such file" if not os.path.exists(src) else f"{src}: not a regular file")
            with _interrupt_as_error():
                if listing:
                    _list_one(src)
                elif decompress or test:
                    _decompress_one(src, None if test else _output_name(src, output, stdout, True), opts, test)
                else:
                    _compress_one(src, _output_name(src, output, stdout, False), opts)
        except Fail as e:
            click.echo(f"bfn: {e}", err=True)
            failed = True
        except (container.FormatError, OSError) as e:
            click.echo(f"bfn: {src}: {e}", err=True)
            failed = True
        except KeyboardInterrupt:
            click.echo("bfn: interrupted", err=True)
            sys.exit(1)
    sys.exit(1 if failed else 0)


def _show_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        model = shipped.fingerprint()
        click.echo(f"bfn-codec {__version__}, shipped model {model or 'none'}")
        ctx.exit()


def _common_options(f):
    for opt in reversed([
        click.option("-V", "--version", is_flag=True, is_eager=True, expose_value=False, callback=_show_version,
                     help="show the version and the shipped model's fingerprint, and exit"),
        click.option("-o", "--output", type=click.Path(dir_okay=False), help="write to this file (one input only)"),
        click.option("-c", "--stdout", "stdout", is_flag=True, help="write to standard output"),
        click.option("-f", "--force", is_flag=True, help="overwrite existing outputs; read a console"),
        click.option("--rm/--keep", " /-k", "remove", default=False,
                     help="remove each input once its output is written and read back (decompressing: "
                          "verified by its checksums); -k keeps it  [default: keep]"),
        click.option("-t", "--test", is_flag=True, help="check .bfn files: decode and verify, write nothing"),
        click.option("-l", "--list", "listing", is_flag=True,
                     help="list .bfn files: sizes, ratio, model, steps, frame methods (nothing decoded)"),
        click.option("--model", type=click.Path(dir_okay=False), default=None,
                     help="weights file or checkpoint [default: the shipped model]"),
        click.option("-T", "--threads", type=click.IntRange(0, 256), default=None,
                     help="worker processes for independent frames, 0: all cores [default: cores, at most 8]"),
        click.option("-v", "--verbose", is_flag=True, help="report sizes, model loss, overhead, speed"),
        click.option("-q", "--quiet", is_flag=True, help="no progress, no messages but errors"),
        click.argument("files", nargs=-1, type=click.Path()),
    ]):
        f = opt(f)
    return f


COMPRESS_ONLY = {"level": "-1 .. -9", "steps": "--steps", "chunk_len": "--chunk-len", "frame_size": "--frame-size",
                 "no_fallback": "--no-fallback"}


def _compress_options(f):
    levels = [click.option(f"-{k}", "level", flag_value=k, default=None, hidden=k > 1,
                           help="-1 .. -9: the level, a preset of --steps and --chunk-len "
                                "(-1 fastest, -9 smallest) [default -6]") for k in range(1, 10)]
    for opt in reversed(levels + [
        click.option("--steps", type=click.IntRange(1, container.MAX_STEPS), default=None,
                     help="n, the number of BFN steps (more: slower, a little smaller) [default: the level's]"),
        click.option("--chunk-len", type=click.IntRange(1, 65535), default=None,
                     help="bytes per chunk, where the model knows several (shorter: smaller and slower) "
                          "[default: the level's]"),
        click.option("--frame-size", type=click.IntRange(container.MIN_FRAME_SIZE, container.MAX_FRAME_SIZE),
                     default=None, help="bytes per independently coded frame [default 256 KiB]"),
        click.option("--no-fallback", is_flag=True,
                     help="code every frame with the model, even where raw or xz would be smaller"),
    ]):
        f = opt(f)
    return f


def _opts(remove, model, threads, verbose, quiet, force, level=None, steps=None, chunk_len=None, frame_size=None,
          no_fallback=False):
    return {"remove": remove, "model": model, "threads": threads, "verbose": verbose and not quiet, "quiet": quiet,
            "force": force, "level": level, "steps": steps, "chunk_len": chunk_len, "frame_size": frame_size,
            "fallback": not no_fallback}


CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@click.option("-d", "--decompress", is_flag=True, help="decompress (as bfn-decompress)")
@_common_options
@_compress_options
def compress_cmd(decompress, output, stdout, force, remove, test, listing, model, threads, verbose, quiet, files,
                 **compressing):
    """Compress FILES to FILE.bfn (no FILES or '-': standard input to standard output)."""
    if decompress or test or listing:
        given = [flag for name, flag in COMPRESS_ONLY.items() if compressing[name]]
        if given:
            raise click.UsageError(f"{', '.join(given)}: for compressing only")
    _run(files, output, stdout, force, test, listing, decompress,
         _opts(remove, model, threads, verbose, quiet, force, **compressing))


@click.command(context_settings=CONTEXT)
@_common_options
def decompress_cmd(output, stdout, force, remove, test, listing, model, threads, verbose, quiet, files):
    """Decompress FILE.bfn to FILE (no FILES or '-': standard input to standard output)."""
    _run(files, output, stdout, force, test, listing, True, _opts(remove, model, threads, verbose, quiet, force))
