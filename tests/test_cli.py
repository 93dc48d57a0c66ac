"""The commands, run as a user would: separate processes, real files, every error path."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bfn_codec import codec, container
from bfn_codec.model import load_weights
from bfn_codec.predictor import Predictor

from conftest import TEXT


def run(*args, stdin=None, env=None, cwd=None):
    script = {"bfn-compress": "compress_cmd", "bfn-decompress": "decompress_cmd"}[args[0]]
    argv = [sys.executable, "-c", f"import sys; from bfn_codec.cli import {script} as m; sys.exit(m())", *args[1:]]
    return subprocess.run(argv, input=stdin, capture_output=True, env={**os.environ, **(env or {})}, cwd=cwd,
                          timeout=600)


CASES = {
    "empty": b"",
    "one": b"x",
    "all_bytes": bytes(range(256)) * 3,
    "random": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    "run": b"a" * 5000,
    "utf8": "Grüße, naïve café — 東京 ✓ ".encode() * 60,
    "frames": TEXT[:5000],
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("cli")
    for name, data in CASES.items():
        (folder / name).write_bytes(data)
    r = run("bfn-compress", "-q", "-T", "1", "--frame-size", "1536", "--model", str(tiny_model),
            *[str(folder / n) for n in CASES if n != "frames"])
    assert r.returncode == 0, r.stderr
    r = run("bfn-compress", "-q", "-T", "2", "--frame-size", "1536", "--no-fallback", "--model", str(tiny_model),
            str(folder / "frames"))
    assert r.returncode == 0, r.stderr
    return folder


def test_round_trips_through_fresh_processes(compressed, tiny_model):
    out = compressed / "out"
    out.mkdir()
    for name in CASES:
        os.replace(compressed / (name + ".bfn"), out / (name + ".bfn"))
    r = run("bfn-decompress", "-T", "2", "--model", str(tiny_model), *[str(out / (n + ".bfn")) for n in CASES])
    assert r.returncode == 0, r.stderr
    for name, data in CASES.items():
        assert (out / name).read_bytes() == data, name
        assert (compressed / name).read_bytes() == data          # inputs are kept
    header, frames, _ = container.unpack((out / "frames.bfn").read_bytes())
    assert len(frames) == 4 and all(f.method == container.Method.BITS_BACK for f in frames)   # several bits-back frames
    assert len((out / "frames.bfn").read_bytes()) < 0.9 * 5000
    # incompressible input is stored, and grows by no more than the header
    assert len((out / "random.bfn").read_bytes()) < 3000 + 200
    assert [f.method for f in container.unpack((out / "random.bfn").read_bytes())[1]] == [container.Method.STORED] * 2
    # where xz is smaller than the model, a frame is xz
    assert container.Method.XZ in [f.method for f in container.unpack((out / "run.bfn").read_bytes())[1]]


@pytest.mark.parametrize("kind, size", [("tiny_model", 4000), ("tiny_sar", 1600), ("tiny_sar_local", 1600),
                                        ("tiny_sar_one", 1600)])
def test_worker_and_thread_counts_do_not_change_the_stream(tmp_path, request, kind, size):
    model = request.getfixturevalue(kind)
    src = tmp_path / "t.txt"
    src.write_bytes(TEXT[:size])
    blobs = []
    for k, (threads, workers) in enumerate([("1", "1"), ("2", "2"), ("3", "1")]):
        r = run("bfn-compress", "-q", "-c", "-f", "--no-fallback", "-T", workers, "--frame-size", str(size // 2),
                "--model", str(model), str(src), env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        assert r.returncode == 0, r.stderr
        blobs.append(r.stdout)
    assert blobs[0] == blobs[1] == blobs[2]
    assert all(f.method == container.Method.BITS_BACK for f in container.unpack(blobs[0])[1])
    r = run("bfn-decompress", "-c", "-T", "1", "--model", str(model), stdin=blobs[0],
            env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0 and r.stdout == TEXT[:size]


@pytest.mark.parametrize("kind, size", [("tiny_model", 2000), ("tiny_sar", 600), ("tiny_sar_local", 600),
                                        ("tiny_sar_one", 600)])
def test_tiny_perturbation_of_the_network_does_not_change_the_stream(request, monkeypatch, kind, size):
    """Network outputs off by a relative 1e-12 (another machine's last bits) give the same stream."""
    from bfn_codec import coder as bb
    tiny_model = request.getfixturevalue(kind)
    data = TEXT[:size]
    reference = codec.compress(data, str(tiny_model), fallback=False)[0]
    real = bb.quantise_logit
    calls = []

    def perturbed(logit, scale=1 + 1e-12):
        calls.append(1)
        return real(np.asarray(logit, np.float64) * scale)

    monkeypatch.setattr(bb, "quantise_logit", perturbed)
    assert codec.compress(data, str(tiny_model), fallback=False)[0] == reference and calls
    # a larger change does change it: the test can fail
    monkeypatch.setattr(bb, "quantise_logit", lambda logit: perturbed(logit, 1.05))
    assert codec.compress(data, str(tiny_model), fallback=False)[0] != reference


def test_stdin_stdout_and_test_mode(tmp_path, tiny_model):
    r = run("bfn-compress", "-q", "--model", str(tiny_model), stdin=TEXT[:3000])
    assert r.returncode == 0 and r.stdout[:4] == container.MAGIC
    (tmp_path / "x.bfn").write_bytes(r.stdout)
    t = run("bfn-compress", "-t", "--model", str(tiny_model), str(tmp_path / "x.bfn"))
    assert t.returncode == 0 and b"OK" in t.stderr
    assert sorted(os.listdir(tmp_path)) == ["x.bfn"]
    d = run("bfn-compress", "-d", "-c", "--model", str(tiny_model), "-", stdin=r.stdout)
    assert d.returncode == 0 and d.stdout == TEXT[:3000]


def test_verbose_reports_model_loss_and_overhead(tmp_path, tiny_model):
    src = tmp_path / "v.txt"
    src.write_bytes(TEXT[:6000])
    r = run("bfn-compress", "-v", "--no-fallback", "--model", str(tiny_model), str(src))
    assert r.returncode == 0
    line = r.stderr.decode()
    assert "bits/byte" in line and "model" in line and "overhead" in line and "KB/s" in line


def expect_error(r, text, folder=None, allowed=()):
    assert r.returncode == 1, r
    msg = r.stderr.decode().strip()
    assert len(msg.splitlines()) == 1 and text in msg, msg
    if folder is not None:
        assert sorted(os.listdir(folder)) == sorted(allowed), os.listdir(folder)


def test_error_paths(tmp_path, tiny_model, corpus):
    m = ["--model", str(tiny_model)]
    src = tmp_path / "a.txt"
    src.write_bytes(TEXT[:3000])
    expect_error(run("bfn-compress", *m, str(tmp_path / "missing.txt")), "no such file")
    assert run("bfn-compress", "-q", "--no-fallback", *m, str(src)).returncode == 0
    good = (tmp_path / "a.txt.bfn").read_bytes()
    before = good
    expect_error(run("bfn-compress", *m, str(src)), "already exists")
    assert (tmp_path / "a.txt.bfn").read_bytes() == before
    expect_error(run("bfn-decompress", *m, str(tmp_path / "a.txt.bfn")), "already exists")
    (tmp_path / "plain.bfn").write_bytes(b"hello, not a bfn file")
    expect_error(run("bfn-decompress", *m, str(tmp_path / "plain.bfn")), "not a .bfn file")
    expect_error(run("bfn-decompress", *m, str(src)), "unknown suffix")

    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {}
    for cut in (3, 20, 60, len(good) // 2, len(good) - 1):
        cases[f"trunc{cut}"] = good[:cut]
    for pos in (0, 10, 30, 70, len(good) // 2, len(good) - 3):
        flipped = bytearray(good)
        flipped[pos] ^= 0x10
        cases[f"flip{pos}"] = bytes(flipped)
    newer = bytearray(good)
    newer[4] = 99
    cases["version"] = bytes(newer)
    for name, blob in cases.items():
        (bad / (name + ".bfn")).write_bytes(blob)
        r = run("bfn-decompress", *m, str(bad / (name + ".bfn")))
        assert r.returncode == 1, name
        assert len(r.stderr.decode().strip().splitlines()) == 1, (name, r.stderr)
        assert not (bad / name).exists(), name
    expect_error(run("bfn-decompress", *m, str(bad / "version.bfn")), "unsupported")

    # a file made with another model: the message names the model it needs
    from bfn_codec.model import load_weights, save_weights
    import torch
    other, _, _ = load_weights(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        other.head.bias += 0.01
    save_weights(tmp_path / "other.pt", other)
    fp = container.unpack(good)[0].model
    os.replace(tmp_path / "a.txt.bfn", bad / "a.txt.bfn")
    expect_error(run("bfn-decompress", "--model", str(tmp_path / "other.pt"), str(bad / "a.txt.bfn")), fp)
    assert not (bad / "a.txt").exists()
    expect_error(run("bfn-compress", "--model", str(tmp_path / "nope.pt"), str(src)), "no model")
    (tmp_path / "junk.pt").write_bytes(b"not weights")
    expect_error(run("bfn-compress", "-f", "--model", str(tmp_path / "junk.pt"), str(src)), "not a bfn-codec weights")


def test_interrupt_leaves_no_partial_output(tmp_path, tiny_model):
    src = tmp_path / "big.txt"
    src.write_bytes(TEXT * 12)                  # far more than the coder does before the signal
    argv = [sys.executable, "-c", "import sys; from bfn_codec.cli import compress_cmd as m; sys.exit(m())",
            "-q", "-T", "1", "--no-fallback", "--model", str(tiny_model), str(src)]
    # the child gets the default SIGINT action even if something in this process ignores it
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(10)                              # past the imports, into the coding
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)                   # reads stderr: a full pipe must not stall the child
    assert p.returncode != 0
    assert sorted(os.listdir(tmp_path)) == ["big.txt"]


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_bytes_round_trip(tiny_model, data):
    blob = codec.compress(data, str(tiny_model), frame_size=128, fallback=False)[0]
    assert codec.decompress(blob, str(tiny_model)) == data


def test_bits_back_frames_round_trip_in_process(tiny_model):
    """Force the bits-back path even where storing would win, on awkward inputs."""
    model, _, _ = load_weights(tiny_model)
    pred = Predictor(model)
    sch = codec.coder.Schedule(6, model.cfg.beta1, 4)
    for data in [b"\x00", bytes(range(256)), b"\xff" * 40, CASES["utf8"][:100]]:
        frame = codec.encode_frame(data, pred, sch, fallback=False)
        assert frame.method == container.Method.BITS_BACK
        assert codec.decode_frame(frame, pred, sch) == data


def test_a_model_trained_on_several_chunk_lengths_codes_with_each(tiny_sar):
    """--chunk-len picks the chunk length; the header records it, decoding follows it, and a
    length the model does not know is a clear error."""
    data = TEXT[:300]
    blobs = {L: codec.compress(data, str(tiny_sar), steps=4, fallback=False, chunk_len=L)[0] for L in (1, 2)}
    assert blobs[1] != blobs[2]
    for L, blob in blobs.items():
        assert container.unpack(blob)[0].chunk_len == L and codec.decompress(blob, str(tiny_sar)) == data
    with pytest.raises(container.FormatError, match="not 3"):
        codec.compress(data, str(tiny_sar), chunk_len=3)


def test_a_header_cannot_ask_for_more_memory_than_its_frame_size():
    """A frame longer than the header's frame size (what a decoder allocates) is refused."""
    frames = [container.Frame(container.Method.STORED, 200, 0, bytes(200))]
    header = container.Header("0" * 16, 10, 4, 2, 512, 100, 200, codec.checksum(bytes(200)))
    with pytest.raises(container.FormatError, match="frame table"):
        container.unpack(container.pack(header, frames, [codec.checksum(bytes(200))]))
    header.frame_size = 200
    assert container.unpack(container.pack(header, frames, [codec.checksum(bytes(200))]))[0].length == 200


def test_the_shipped_model_codes_a_file(tmp_path):
    """After install, bfn-compress FILE works with the shipped model (no --model), bits-back,
    and bfn-decompress in another process gives the bytes back."""
    src = tmp_path / "s.txt"
    src.write_bytes(b"It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    b"must be in want of a wife. However little known the feelings or views of such a man may be "
                    b"on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
                    b"surrounding families, that he is considered as the rightful property of some one or other.")
    r = run("bfn-compress", "-q", "--no-fallback", str(src))
    assert r.returncode == 0, r.stderr
    blob = (tmp_path / "s.txt.bfn").read_bytes()
    frame = container.unpack(blob)[1][0]
    assert frame.method == container.Method.BITS_BACK
    assert len(frame.payload) < 0.5 * len(src.read_bytes())      # English at well under 4 bits per byte
    os.replace(src, tmp_path / "orig")
    r = run("bfn-decompress", "-q", str(tmp_path / "s.txt.bfn"))
    assert r.returncode == 0, r.stderr
    assert src.read_bytes() == (tmp_path / "orig").read_bytes()
