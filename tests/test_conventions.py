"""What a zstd or gzip user expects of bfn-compress and bfn-decompress: flags, conventions,
errors before work, hostile input, and the Python API."""
import dataclasses
import lzma
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

import bfn_codec
from bfn_codec import cli, codec, container, shipped
from bfn_codec.model import load_weights

from conftest import TEXT
from test_cli import expect_error, run

M = "--model"


def run_python(code, *args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=timeout, **kw)


# ---- flags and conventions ----

@pytest.mark.parametrize("args", [["-h"], ["--help"], ["-V"], ["--version"], ["-l", "{stored}"]])
def test_help_version_and_list_answer_without_torch(tmp_path, args):
    """--help, -V and -l need no model, so they do not import torch (which takes a second)."""
    data = os.urandom(300)
    stored = tmp_path / "s.bfn"
    stored.write_bytes(codec.compress(data, "no-such-model.pt")[0])         # stored, names no model
    argv = [a.format(stored=stored) for a in args]
    code = ("import sys, time; t = time.time(); from bfn_codec.cli import compress_cmd\n"
            "try:\n    compress_cmd(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules, time.time() - t, file=sys.stderr)")
    r = run_python(code, *argv)
    assert r.returncode == 0, r.stderr
    imported, seconds = r.stderr.decode().split()[-2:]
    assert imported == "False"
    if args[0] in ("-V", "--version"):
        assert r.stdout.decode().strip() == f"bfn-codec {bfn_codec.__version__}, shipped model {shipped.fingerprint()}"
    elif args[0] == "-l":
        assert re.fullmatch(rf"\s*{stored.stat().st_size}\s+300\s+\S+%\s+{container.NO_MODEL_VERSION}\s+none\s+-\s+"
                            rf"1 stored\s+\S*s\.bfn",
                            r.stdout.decode().splitlines()[-1])
    else:
        assert b"Usage: " in r.stdout and b"--rm" in r.stdout


def test_the_shipped_model_record_names_its_fingerprint():
    """-V reads the fingerprint from weights/default.json; it must be the weights' own
    (after replacing the weights: python -m bfn_codec.shipped)."""
    assert shipped.recorded_fingerprint() == load_weights(shipped.PATH)[1]


def test_keep_and_rm(tmp_path):
    src = tmp_path / "r.txt"
    src.write_bytes(TEXT[:2000])
    assert run("bfn-compress", "-q", "-k", str(src)).returncode == 0
    assert src.exists() and (tmp_path / "r.txt.bfn").exists()
    expect_error(run("bfn-compress", "-q", "--rm", str(src)), "already exists")
    assert src.exists()                                          # a failure keeps the input
    assert run("bfn-compress", "-q", "--rm", "-f", str(src)).returncode == 0
    assert not src.exists()
    assert run("bfn-decompress", "-q", "--rm", str(tmp_path / "r.txt.bfn")).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["r.txt"] and src.read_bytes() == TEXT[:2000]


def test_list_shows_sizes_model_steps_and_methods(tmp_path, tiny_model):
    src = tmp_path / "l.txt"
    src.write_bytes(TEXT[:1200])
    blob = codec.compress(TEXT[:1200], str(tiny_model), steps=7, frame_size=600, fallback=False)[0]
    (tmp_path / "l.txt.bfn").write_bytes(blob)
    (tmp_path / "junk.bfn").write_bytes(b"junk")
    r = run("bfn-compress", "-l", str(tmp_path / "l.txt.bfn"), str(tmp_path / "junk.bfn"))
    assert r.returncode == 1 and b"junk.bfn: not a .bfn file" in r.stderr
    header, line = r.stdout.decode().splitlines()
    assert header.split() == ["compressed", "original", "ratio", "format", "model", "steps", "frames", "file"]
    fingerprint, version = container.unpack(blob)[0].model, container.unpack(blob)[0].version
    assert re.fullmatch(rf"\s*{len(blob)}\s+1200\s+{100 * len(blob) / 1200:.2f}%\s+{version}\s+{fingerprint}\s+7\s+"
                        rf"2 bits-back\s+\S*l\.txt\.bfn", line), line


def test_levels_are_presets_recorded_in_the_header(tiny_sar):
    """-1 .. -9 set the steps and the chunk length (recorded in the header); the default
    level is the default behaviour; --steps and --chunk-len override a level."""
    model = load_weights(tiny_sar)[0]
    data = TEXT[:300]
    default = codec.compress(data, str(tiny_sar), fallback=False)[0]
    assert codec.compress(data, str(tiny_sar), fallback=False, level=codec.DEFAULT_LEVEL)[0] == default
    head = container.unpack(default)[0]
    assert (head.steps, head.chunk_len) == (codec.default_steps(model), codec.default_chunk_len(model))
    n = codec.default_steps(model)
    for level, steps, chunk_len in [(1, 1, max(model.chunk_lens)), (9, 5 * n, min(model.chunk_lens))]:
        blob = codec.compress(data, str(tiny_sar), fallback=False, level=level)[0]
        head = container.unpack(blob)[0]
        assert (head.steps, head.chunk_len) == (steps, chunk_len)
        assert codec.decompress(blob, str(tiny_sar)) == data
    head = container.unpack(codec.compress(data, str(tiny_sar), 3, fallback=False, level=1, chunk_len=1)[0])[0]
    assert (head.steps, head.chunk_len) == (3, 1)
    with pytest.raises(ValueError, match="no level 10"):
        codec.compress(data, str(tiny_sar), level=10)
    with pytest.raises(ValueError, match="no level 42"):       # checked even where no model is needed
        codec.compress(os.urandom(1000), str(tiny_sar), level=42)


def test_level_flags_and_all_cores(tmp_path, tiny_sar):
    src = tmp_path / "v.txt"
    src.write_bytes(TEXT[:400])
    r = run("bfn-compress", "-q", "-c", "-1", "-T0", "--no-fallback", M, str(tiny_sar), str(src))
    assert r.returncode == 0, r.stderr
    assert container.unpack(r.stdout)[0].steps == 1                       # level 1: one step
    assert cli._workers(0) == codec.cores() and cli._workers(None) == codec.default_workers()


@pytest.mark.parametrize("command, args", [
    ("bfn-decompress", ["--steps", "3"]), ("bfn-decompress", ["--frame-size", "4096"]),
    ("bfn-decompress", ["--no-fallback"]), ("bfn-decompress", ["-9"]), ("bfn-decompress", ["--chunk-len", "2"]),
    ("bfn-compress", ["-d", "--steps", "3"]), ("bfn-compress", ["-t", "--no-fallback"]),
    ("bfn-compress", ["-l", "-3"]),
    ("bfn-compress", ["-o", "x", "a", "b"]), ("bfn-compress", ["-o", "x", "-c", "a"]),
    ("bfn-compress", ["--frame-size", "1"]), ("bfn-compress", ["--nope"]), ("bfn-compress", ["-l", "-o", "x"]),
])
def test_a_malformed_command_line_exits_2(tmp_path, command, args):
    """Compression-only flags are refused by the decompressor, as every malformed command line:
    exit code 2 and a usage message, nothing written."""
    r = run(command, *args, cwd=tmp_path)
    assert r.returncode == 2 and b"Usage:" in r.stderr, r
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["bfn-compress", "bfn-decompress"])
def test_a_console_as_stdin_is_refused_at_once(command):
    """No file and a terminal on stdin: stop at once (as zstd), instead of waiting for input."""
    leader, follower = pty.openpty()
    try:
        r = run_python(f"import sys; from bfn_codec.cli import {command.replace('bfn-', '')}_cmd as m; sys.exit(m())",
                       stdin=follower, timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    assert r.returncode == 1 and r.stderr.decode().strip().startswith("bfn: stdin is a console"), r


def test_modification_time_and_mode_are_kept(tmp_path):
    src = tmp_path / "old.txt"
    src.write_bytes(os.urandom(500))
    os.chmod(src, 0o640)
    os.utime(src, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    assert run("bfn-compress", "-q", str(src)).returncode == 0
    packed = (tmp_path / "old.txt.bfn").stat()
    assert packed.st_mtime_ns == 1_600_000_000_987_654_321 and packed.st_mode & 0o777 == 0o640
    os.replace(src, tmp_path / "orig")
    assert run("bfn-decompress", "-q", str(tmp_path / "old.txt.bfn")).returncode == 0
    assert src.stat().st_mtime_ns == 1_600_000_000_987_654_321 and src.stat().st_mode & 0o777 == 0o640


def test_concatenated_files_decode_to_the_concatenation(tmp_path, tiny_model):
    parts = [TEXT[:900], os.urandom(300), b""]
    blobs = [codec.compress(parts[0], str(tiny_model), frame_size=400, fallback=False)[0],
             codec.compress(parts[1], str(tiny_model))[0], codec.compress(parts[2], str(tiny_model))[0]]
    joined = b"".join(blobs)
    assert bfn_codec.decompress(joined, model=str(tiny_model)) == b"".join(parts)
    (tmp_path / "all.bfn").write_bytes(joined)
    r = run("bfn-decompress", "-c", "-T", "2", M, str(tiny_model), str(tmp_path / "all.bfn"))
    assert r.returncode == 0 and r.stdout == b"".join(parts), r.stderr
    src = [tmp_path / "a", tmp_path / "b"]
    for path, data in zip(src, parts):
        path.write_bytes(data)
    r = run("bfn-compress", "-q", "-c", M, str(tiny_model), *map(str, src))      # -c: one stream of members
    assert r.returncode == 0 and bfn_codec.decompress(r.stdout, model=str(tiny_model)) == parts[0] + parts[1]
    with pytest.raises(bfn_codec.FormatError, match="trailing data"):
        bfn_codec.decompress(joined + b"BF", model=str(tiny_model))


def test_an_output_naming_the_input_is_refused_even_with_force(tmp_path):
    src = tmp_path / "same.txt"
    src.write_bytes(TEXT[:500])
    for flags in ([], ["-f"]):
        expect_error(run("bfn-compress", *flags, "-o", str(src), str(src)), "would overwrite the input",
                     tmp_path, ["same.txt"])
    assert src.read_bytes() == TEXT[:500]
    (tmp_path / "same.bfn").write_bytes(bfn_codec.compress(b"x"))
    expect_error(run("bfn-decompress", "-f", "-o", str(tmp_path / "same.bfn"), str(tmp_path / "same.bfn")),
                 "would overwrite the input")


def test_the_output_is_checked_before_any_work(tmp_path):
    """Output problems are reported before the model is even looked for (a missing model is
    the later error), naming the output asked for, never a temporary file."""
    src = tmp_path / "in.txt"
    src.write_bytes(TEXT[:500])
    (tmp_path / "in.txt.bfn").mkdir()
    nowhere = M, str(tmp_path / "no-model.pt")
    expect_error(run("bfn-compress", *nowhere, str(src)), f"{src}.bfn: is a directory")
    expect_error(run("bfn-compress", "-f", *nowhere, str(src)), f"{src}.bfn: is a directory")
    missing = tmp_path / "no" / "out.bfn"
    expect_error(run("bfn-compress", *nowhere, "-o", str(missing), str(src)), f"{missing}: no such directory")
    expect_error(run("bfn-compress", *nowhere, "-o", str(tmp_path / "new.bfn"), str(src)), "no model")
    with pytest.raises(cli.Fail, match=re.escape(f"{missing}: No such file")):
        cli._write(str(missing), b"data", False)


# ---- hostile input ----

def crafted_huge_frame(model_path):
    """A few hundred bytes whose header claims one bits-back frame of MAX_FRAME_SIZE bytes."""
    model, fingerprint, _ = load_weights(model_path)
    size = container.MAX_FRAME_SIZE
    header = container.Header(fingerprint, 10, 4, codec.default_chunk_len(model), model.cfg.context_len, size, size,
                              0, container.version_for(model.cfg))
    return container.pack(header, [container.Frame(container.Method.BITS_BACK, size, 0, bytes(range(256)) * 2)], [0])


def test_a_crafted_huge_frame_fails_quickly_in_bounded_memory(tmp_path, tiny_model):
    """The frame's length is within the header's frame size and total, so it is decoded: with
    at most the frame's own bytes allocated (not a plan of every chunk: 10 GB), and the stream
    found exhausted long before the frame's end. Run under a 3 GiB address-space limit."""
    path = tmp_path / "huge.bfn"
    path.write_bytes(crafted_huge_frame(tiny_model))
    limited = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
               "from bfn_codec.cli import decompress_cmd as m; sys.exit(m())")
    t0 = time.time()
    r = run_python(limited, "-T", "1", M, str(tiny_model), str(path))
    expect_error(r, "corrupted data", tmp_path, ["huge.bfn"])
    assert time.time() - t0 < 60


def test_only_intact_headers_and_xz_frames_are_read():
    """A model field that is not a fingerprint (control characters would break the one-line
    messages and -l), and an xz frame in the legacy .lzma format (whose header may ask for
    gigabytes of dictionary), are refused; what compress writes is read."""
    data = b"xz frames only" * 100
    header = container.Header(container.NO_MODEL, 0, 0, 0, 0, 4096, len(data), codec.checksum(data), 3)
    frames, crcs = [container.Frame(container.Method.XZ, len(data), 0, lzma.compress(data))], [codec.checksum(data)]
    assert codec.decompress(container.pack(header, frames, crcs)) == data
    for model in ("abc\ndef01234567", "0123456789ABCDEF"):
        bad = container.pack(dataclasses.replace(header, model=model), frames, crcs)
        with pytest.raises(container.FormatError, match="model fingerprint"):
            container.unpack(bad)
    legacy = container.Frame(container.Method.XZ, len(data), 0, lzma.compress(data, format=lzma.FORMAT_ALONE))
    with pytest.raises(container.FormatError, match="corrupted xz frame"):
        codec.decompress(container.pack(header, [legacy], crcs))


def test_a_frame_table_beyond_the_frame_size_or_total_is_refused_before_reading():
    frames = [container.Frame(container.Method.BITS_BACK, 300, 0, b"\0" * 8)] * 2
    header = container.Header("0" * 16, 10, 4, 1, 512, 300, 500, 0, 3)
    with pytest.raises(container.FormatError, match="frame table"):
        container.unpack(container.pack(header, frames, [0, 0]))        # 600 bytes of frames, 500 declared
    header.length, header.frame_size = 600, 200
    with pytest.raises(container.FormatError, match="frame table"):
        container.unpack(container.pack(header, frames, [0, 0]))        # frames longer than the frame size


def test_interrupt_while_workers_start_is_one_line(tmp_path, tiny_model):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) just as the worker
    processes start: the one-line message, exit 1, nothing left behind, every time."""
    src = tmp_path / "w.txt"
    src.write_bytes(TEXT * 3)
    argv = [sys.executable, "-c", "import sys; from bfn_codec.cli import compress_cmd as m; sys.exit(m())",
            "-q", "-T", "2", "--no-fallback", "--frame-size", "2000", M, str(tiny_model), str(src)]

    def children(pid):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return f.read().split()
        except OSError:
            return []

    for delay in (0.0, 0.03, 0.06, 0.1):
        p = subprocess.Popen(argv, stderr=subprocess.PIPE, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while not children(p.pid) and p.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGINT)
        err = p.communicate(timeout=120)[1].decode()
        assert (p.returncode, err.strip()) == (1, "bfn: interrupted"), (delay, err)
        assert sorted(os.listdir(tmp_path)) == ["w.txt"]


FUZZ_SOURCES = {}


def fuzz_sources(model_path):
    """Small .bfn files of each kind: bits-back frames, xz and stored frames, two members."""
    if not FUZZ_SOURCES:
        text, mixed = TEXT[:500], bytes(range(64)) * 4 + os.urandom(244)
        bits_back = (text, codec.compress(text, model_path, 4, frame_size=256, fallback=False)[0])
        plain = (mixed, codec.compress(mixed, model_path, 4, frame_size=256)[0])
        FUZZ_SOURCES.update(bits_back=bits_back, plain=plain,
                            both=(bits_back[0] + plain[0], bits_back[1] + plain[1]))
    return FUZZ_SOURCES


HEADER_FIELDS = [(4, 1), (5, 16), (21, 2), (23, 1), (24, 2), (26, 2), (28, 4), (32, 8), (40, 4), (44, 4)] + \
    [(48 + 17 * k + offset, size) for k in range(2) for offset, size in [(0, 1), (1, 4), (5, 4), (9, 4), (13, 4)]]
"""(offset, bytes) of the header's fields and of the first two frames' table entries (container.py)."""


def rewrite_header(blob, offset, size, value):
    """blob with one header field set to value, and the header checksum made right again."""
    table_end = 48 + 17 * struct.unpack_from("<I", blob, 44)[0]
    if offset + size > table_end:
        return blob
    out = bytearray(blob)
    out[offset:offset + size] = (value % (1 << 8 * size)).to_bytes(size, "little")
    table_end = 48 + 17 * struct.unpack_from("<I", out, 44)[0]
    if table_end + 4 <= len(out):
        out[table_end:table_end + 4] = struct.pack("<I", zlib.crc32(out[:table_end]))
    return bytes(out)


damage = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 2000)),
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(0, 7)),
    st.tuples(st.just("field"), st.sampled_from(range(len(HEADER_FIELDS))),
              st.one_of(st.integers(0, 3), st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 128 - 1))),
    st.tuples(st.just("claim"), st.integers(0, 256)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=8)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(source=st.sampled_from(["bits_back", "plain", "both"]), change=damage)
def test_damaged_files_give_the_original_or_one_line_and_no_output(tmp_path_factory, tiny_model, source, change):
    """Truncations, bit flips, rewritten header fields (with a correct header checksum), frame
    lengths changed consistently with the total, and trailing bytes: bfn-decompress gives the exact original, or a one-line error and no output."""
    original, blob = fuzz_sources(str(tiny_model))[source]
    kind, *arg = change
    if kind == "cut":
        blob = blob[:arg[0] % (len(blob) + 1)]
    elif kind == "flip":
        flipped = bytearray(blob)
        flipped[arg[0] % len(blob)] ^= 1 << arg[1]
        blob = bytes(flipped)
    elif kind == "field":
        blob = rewrite_header(blob, *HEADER_FIELDS[arg[0]], arg[1])
    elif kind == "claim":           # the first frame's length, and the total with it: a consistent table
        length, raw_len = struct.unpack_from("<Q", blob, 32)[0], struct.unpack_from("<I", blob, 49)[0]
        blob = rewrite_header(rewrite_header(blob, 49, 4, arg[0]), 32, 8, length - raw_len + arg[0])
    else:
        blob += arg[0]
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "f.bfn").write_bytes(blob)
    r = CliRunner().invoke(cli.decompress_cmd, ["-q", "-T", "1", M, str(tiny_model), str(folder / "f.bfn")])
    if r.exit_code == 0:
        assert (folder / "f").read_bytes() == original
    else:
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, (r.exit_code, r.stderr, r.exception)
        assert sorted(os.listdir(folder)) == ["f.bfn"]


# ---- the Python API ----

def test_the_api_round_trips_and_raises_format_error(tiny_model):
    data = TEXT[:700]
    blob = bfn_codec.compress(data, 1, model=str(tiny_model))
    assert bfn_codec.decompress(blob, model=str(tiny_model)) == data
    assert bfn_codec.decompress(bytearray(bfn_codec.compress(memoryview(b"")))) == b""
    for bad in (b"", b"not bfn", blob[:-1], blob + b"x"):
        with pytest.raises(bfn_codec.FormatError):
            bfn_codec.decompress(bad, model=str(tiny_model))
    with pytest.raises(TypeError):
        bfn_codec.compress("text")


def test_the_readme_example_runs():
    """The README's three-line example, as written (the shipped model)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "bfn_codec.compress" in example and "bfn_codec.decompress" in example
    exec(example, {})
