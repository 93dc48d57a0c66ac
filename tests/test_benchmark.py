"""Smoke test of the benchmark: every codec on a tiny file with the tiny model, one run each."""
import csv
import shlex

import pytest

for mod in ("zstandard", "brotli", "pyppmd", "matplotlib"):
    pytest.importorskip(mod)

from benchmarks import codecs as cx  # noqa: E402
from benchmarks.run import main  # noqa: E402

REPETITIVE = b"abcabcabd, the same words over and over. " * 50


@pytest.mark.parametrize("name", list(cx.BASELINES))
@pytest.mark.parametrize("data", [b"", b"x", REPETITIVE, bytes(range(256)) * 40])
def test_baseline_round_trip(name, data):
    codec = cx.make(name)
    assert codec.decompress(codec.compress(data)) == data


def read_rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_benchmark_smoke(tmp_path, tiny_model):
    (tmp_path / "rep.txt").write_bytes(REPETITIVE)
    out = tmp_path / "out"
    argv = [str(tmp_path / "rep.txt"), "--out", str(out), "--quick", "--bfn-steps", "2",
            "--model", str(tiny_model), "--workers", "1"]
    assert main(argv) == 0

    rows = read_rows(out)
    assert [(r["file"], r["codec"]) for r in rows] == [("rep.txt", c) for c in list(cx.BASELINES) + ["bfn-default", "bfn-2"]]
    assert all(r["roundtrip_ok"] == "True" for r in rows)
    by = {r["codec"]: r for r in rows}
    assert int(by["gzip-9"]["bytes"]) == len(REPETITIVE)
    assert float(by["gzip-9"]["bits_per_byte"]) < 8
    assert float(by["gzip-9"]["bits_per_byte"]) == pytest.approx(8 * int(by["gzip-9"]["compressed_bytes"])
                                                                 / len(REPETITIVE))
    bfn = by["bfn-2"]
    assert float(bfn["expected_bytes"]) > 0
    assert float(bfn["overhead_bytes"]) == pytest.approx(int(bfn["compressed_bytes"]) - float(bfn["expected_bytes"]))
    assert float(bfn["compress_kb_s"]) > 0 and float(bfn["decompress_kb_s"]) > 0
    assert abs(float(bfn["coder_pct"])) < 10      # the bits-back chunks' excess is small
    assert 0 < float(bfn["fixed_bytes"]) < int(bfn["compressed_bytes"])    # header and flush at least

    for png in ("bpb_per_file.png", "bpb_vs_speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "RESULTS.md").read_text()
    assert md.startswith("# bfn-codec benchmark\n\nProduced by:\n\n```\npython -m benchmarks.run "
                         + shlex.join(argv) + "\n```")
    assert "**total**" in md and "Python" in md and "torch" in md and "overhead" in md and "coder %" in md


def test_directory_and_missing_model(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_bytes(REPETITIVE)
    (tmp_path / "in" / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), "--out", str(out), "--quick", "--codecs", "gzip,zstd,bfn",
                 "--model", str(tmp_path / "none.pt")]) == 0
    rows = read_rows(out)
    assert [(r["file"], r["codec"]) for r in rows] == [
        (f, c) for f in ("a.txt", "sub/b.bin") for c in ("gzip-9", "zstd-19", "zstd-22")]
    assert all(r["roundtrip_ok"] == "True" for r in rows)
    assert "bfn-codec skipped" in (out / "RESULTS.md").read_text()
    assert (out / "bpb_vs_speed.png").stat().st_size > 0
