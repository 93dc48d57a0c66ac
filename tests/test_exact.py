"""The context network on int8 grids (exact.py): exact products, states that depend on
nothing but the lane's own bytes, close to the float64 network."""
import dataclasses

import pytest
import torch

from bfn_codec import container
from bfn_codec.exact import IntLinear, int8_rows
from test_model import SAR, random_sar


def test_int8_rows_round_to_the_nearest_point_of_each_rows_grid():
    x = torch.randn(5, 40, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.0])[:, None]
    ints, scale = int8_rows(x)
    assert torch.equal(ints, ints.round()) and ints.abs().max() == 127
    assert torch.all((x - ints * scale).abs() <= scale / 2 * (1 + 1e-12))
    assert torch.equal(ints[4], torch.zeros(40, dtype=torch.float64))


def test_an_int_linear_is_its_integer_product_scaled():
    """The integer product is exact (compared with float64 sums of the same integers, exact
    below 2^53), so the output is the rounded weights and inputs times their scales."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(300, 70).double()
    x = torch.randn(9, 300, dtype=torch.float64)
    xq, xs = int8_rows(x)
    wq, ws = int8_rows(linear.weight.detach())
    expected = (xq @ wq.T) * xs * ws[:, 0] + linear.bias.detach()
    assert torch.equal(IntLinear(linear)(x), expected)
    assert (IntLinear(linear)(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


LANE_CASES = [dict(), dict(kv_heads=1), dict(local_layers=1, local_window=3), dict(context_len=6)]


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("change", LANE_CASES)
def test_integer_states_depend_only_on_the_lanes_own_bytes(chunk, change):
    """A lane's states on int8 grids are the same bits whether it is coded alone or beside
    other lanes, in any position of the batch (its products are exact, the rest is per row),
    and whatever the thread count; they are close to the float64 states but not equal."""
    net = random_sar(dataclasses.replace(SAR, **change))
    seq = torch.randint(0, 256, (3, 24))

    def states(rows, integer=True):
        cache = net.coding_context(integer)
        return torch.cat([cache.advance([seq[r, max(0, chunk * (j - 1)):chunk * j].tolist() for r in rows])
                          for j in range(24 // chunk)], 1)

    together = states([0, 1, 2])
    assert torch.equal(states([1]), together[1:2])
    assert torch.equal(states([2, 0]), together[[2, 0]])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(states([0, 1, 2]), together)
    finally:
        torch.set_num_threads(threads)
    gap = (states([0, 1, 2], integer=False) - together).abs().max().item()
    assert 0 < gap < 0.05 * together.abs().max().item()


def test_last_bit_changes_before_the_int8_grids_do_not_change_the_stream(monkeypatch, tiny_sar):
    """Every layer norm's output (what the int8 grids round, and the per-step network's
    float64 path) off by a relative 1e-12, alternately up and down (another machine's last
    bits), gives the same stream; a change of 1 % does change it: the test can fail."""
    import torch.nn.functional as F
    from bfn_codec import codec
    from conftest import TEXT
    data = TEXT[:600]
    reference = codec.compress(data, str(tiny_sar), fallback=False)[0]
    assert reference[4] in container.INTEGER_CONTEXT
    real, calls = F.layer_norm, []

    def perturbed(*args, change, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        signs = torch.ones(out.numel(), dtype=out.dtype)
        signs[::2] = -1
        return out * (1 + change * signs.reshape(out.shape))

    for change, same in [(1e-12, True), (1e-2, False)]:
        monkeypatch.setattr(F, "layer_norm", lambda *a, change=change, **k: perturbed(*a, change=change, **k))
        assert (codec.compress(data, str(tiny_sar), fallback=False)[0] == reference) == same and calls


def test_integer_attention_groups_query_heads_as_the_float_attention_does():
    """4 query heads over 2 key/value heads, with a mask: the integer attention is close to
    F.scaled_dot_product_attention(enable_gqa=True); pairing the heads differently is not."""
    import torch.nn.functional as F
    from bfn_codec.exact import IntBlock
    from bfn_codec.layers import Block
    torch.manual_seed(0)
    block = IntBlock(Block(32, 4, kv_heads=2).double())
    q = torch.randn(3, 4, 2, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, 2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    exact = block.attend(q, *block.from_cache(*block.cache_rows(k, v)), mask)
    scale = exact.abs().max().item()
    assert (exact - F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)).abs().max() < 0.03 * scale
    swapped = F.scaled_dot_product_attention(q, k.flip(1), v.flip(1), attn_mask=mask, enable_gqa=True)
    assert (exact - swapped).abs().max() > 0.1 * scale
    with pytest.raises(ValueError):
        block.attend(q, *block.from_cache(*block.cache_rows(k, v)), causal=True)


def test_a_chunk_design_with_byte_outputs_codes_in_float64(tmp_path):
    """Only designs with an integer context network write formats 5 and 6: a `chunk` model with
    the joint byte output writes format 4, and a format 5 or 6 header naming it is refused."""
    from bfn_codec import codec
    from bfn_codec.model import ModelConfig, build, save_weights
    cfg = ModelConfig(output="bytes", d_model=16, n_layers=1, n_heads=2, chunk_len=8, context_len=16)
    torch.manual_seed(0)
    path = tmp_path / "chunk_bytes.pt"
    save_weights(path, build(cfg))
    data = b"a chunk design with byte outputs " * 20
    blob = codec.compress(data, str(path), fallback=False)[0]
    header, frames, crcs = container.unpack(blob)
    assert header.version == 4 and codec.decompress(blob, str(path)) == data
    for version in container.INTEGER_CONTEXT:
        relabelled = container.pack(dataclasses.replace(header, version=version), frames, crcs)
        with pytest.raises(container.FormatError):
            codec.decompress(relabelled, str(path))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_stored_streams_decode_with_other_kernels(capability):
    """The committed streams of every joint-byte format decode in a process whose torch kernels,
    BLAS and oneDNN are held to another instruction set (scalar or AVX2: other reduction
    orders, other exp and erf code): what another machine would run."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    data = Path(__file__).parent / "data"
    script = ("import sys, pathlib\nfrom bfn_codec import codec\nd = pathlib.Path(sys.argv[1])\n"
              "original = (d / 'compat_sar.bin').read_bytes()\n"
              "for p in sorted(d.glob('compat_sar.v*.bfn')):\n"
              "    assert codec.decompress(p.read_bytes(), str(d / 'compat_sar_model.pt')) == original, p\n"
              "import torch; print(torch.backends.cpu.get_cpu_capability())\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, MKL_ENABLE_INSTRUCTIONS="AVX2",
               ONEDNN_MAX_CPU_ISA="AVX2")
    r = subprocess.run([sys.executable, "-c", script, str(data)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1].lower() == ("default" if capability == "default" else "avx2")
