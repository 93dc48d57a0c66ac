"""The compiled kernel of format 7 (context.py, _context.c): the same bits in its vectorised and
its portable build, lanes independent of each other, the same network as the torch one, and
elementary functions accurate to what they claim."""
import dataclasses
import importlib.machinery
import math

import numpy as np
import pytest
import torch

from bfn_codec import context
from bfn_codec.errors import ModelError
from test_model import SAR, random_sar

# a multi-query context network with a local layer, sizes that take the VNNI products and the
# blocked per-step layers (widths of 64); a step width of 16 takes the unblocked ones
KERNEL = dataclasses.replace(SAR, d_model=64, n_heads=4, kv_heads=1, local_layers=1, local_window=5, chunk_len=2,
                             context_len=16, step_d_model=64, step_layers=2, step_heads=2)
NARROW = dataclasses.replace(SAR, chunk_len=2)
GROUPED = dataclasses.replace(KERNEL, kv_heads=2, local_layers=0)     # query heads 0, 1 read kv head 0; 2, 3 head 1
PADDED = dataclasses.replace(KERNEL, d_model=24, kv_heads=2, step_d_model=16)   # heads of 6 channels: key rows padded to 8


def kernel_net(cfg=KERNEL):
    net = random_sar(cfg)
    torch.nn.init.normal_(net.prior.weight, std=0.1)      # a prior that matters
    return net


def states(net, seq, lanes, chunk=1, **kw):
    """Context states of the given lanes of seq (rows), stripe by stripe: (lanes, stripes, ds)."""
    cache = context.CompiledContext(net, **kw)
    return torch.cat([cache.advance([seq[r, max(0, chunk * (j - 1)):chunk * j].tolist() for r in lanes])
                      for j in range(seq.shape[1] // chunk)], 1)


@pytest.fixture
def small_slack(monkeypatch):
    monkeypatch.setattr(context.CompiledContext, "SLACK", 3)     # compact the cache every few tokens


@pytest.mark.parametrize("cfg", [KERNEL, NARROW, GROUPED, PADDED])
@pytest.mark.parametrize("chunk", [1, 2])
def test_the_vectorised_and_the_portable_build_give_the_same_bits(cfg, chunk, small_slack):
    """On a CPU with AVX-512 (and VNNI) the kernel runs other instructions than its baseline
    build with plain integer products: the context states and the per-step outputs are the
    same bits all the same, through many cache compactions."""
    net = kernel_net(cfg)
    seq = torch.randint(0, 256, (3, 48))
    fast = states(net, seq, [0, 1, 2], chunk)
    assert torch.equal(fast, states(net, seq, [0, 1, 2], chunk, portable=True))
    step, portable = context.CompiledStep(net), context.CompiledStep(net, portable=True)
    lane_states, prior = step.prior(fast[:, -1].numpy())
    beliefs = np.random.default_rng(0).normal(0, 4, (3, 8))
    for t in (0.0, 0.4, 1.0):
        out = step.log_probs(lane_states, prior, beliefs, t)
        assert np.array_equal(out, portable.log_probs(lane_states, prior, beliefs, t))
        assert np.allclose(np.exp(out).sum(1), 1.0)


@pytest.mark.parametrize("chunk", [1, 2])
def test_compacting_the_cache_changes_nothing(chunk, monkeypatch):
    """States with a cache compacted every few tokens equal those of one that never is."""
    net = kernel_net(PADDED)
    seq = torch.randint(0, 256, (3, 48))
    whole = states(net, seq, [0, 1, 2], chunk)
    monkeypatch.setattr(context.CompiledContext, "SLACK", 3)
    assert torch.equal(states(net, seq, [0, 1, 2], chunk), whole)


@pytest.mark.parametrize("chunk", [1, 2])
def test_a_lanes_states_depend_only_on_its_own_bytes(chunk, small_slack):
    net = kernel_net()
    seq = torch.randint(0, 256, (3, 40))
    together = states(net, seq, [0, 1, 2], chunk)
    assert torch.equal(states(net, seq, [1], chunk), together[1:2])
    assert torch.equal(states(net, seq, [2, 0], chunk), together[[2, 0]])


@pytest.mark.parametrize("cfg", [KERNEL, NARROW, GROUPED, PADDED])
@pytest.mark.parametrize("chunk", [1, 2])
def test_the_kernel_computes_the_torch_network(cfg, chunk):
    """The kernel's context states follow the torch network on int8 grids (exact.py): most
    of them to 1e-6, the others moved by a rounding that the two place at different last
    bits (and, for chunks of 2, by the value scales' maximum, taken over the keys a query
    sees where exact.py takes all the call's keys); its per-step outputs follow the float64
    network to the precision of its erf and its float32 products."""
    net = kernel_net(cfg)
    seq = torch.randint(0, 256, (4, 40))
    compiled = states(net, seq, [0, 1, 2, 3], chunk)
    cache = net.coding_context(integer=True)
    reference = torch.cat([cache.advance([seq[r, max(0, chunk * (j - 1)):chunk * j].tolist() for r in range(4)])
                           for j in range(40 // chunk)], 1)
    gap = (compiled - reference).abs()
    assert gap.median() < (1e-6 if chunk == 1 else 1e-3) * reference.abs().mean()
    assert gap.mean() < 0.03 * reference.abs().mean()
    step = context.CompiledStep(net)
    lane_states, prior = step.prior(reference[:, -1].numpy())
    beliefs = np.random.default_rng(1).normal(0, 3, (4, 8))
    z = torch.zeros(4, 1, 1, 8, 2, dtype=torch.float64)
    z[..., 1] = torch.from_numpy(beliefs).reshape(4, 1, 1, 8)
    for t in (0.0, 0.5, 1.0):
        with torch.no_grad():
            expected = net(z, torch.full((1, 1), t, dtype=torch.float64), reference[:, -1:]).reshape(4, 256)
        assert np.abs(step.log_probs(lane_states, prior, beliefs, t) - expected.numpy()).max() < 1e-5


def test_the_elementary_functions_are_the_same_bits_in_both_builds():
    x = -np.geomspace(1e-9, 700, 999)
    for name, arg in (("exp", x), ("erf", x / 100), ("sin", -x), ("cos", -x), ("log", 1 - x)):
        assert np.array_equal(context.elementary(name, arg), context.elementary(name, arg, portable=True))


def test_the_elementary_functions_are_as_accurate_as_they_claim():
    x = np.concatenate([-np.geomspace(1e-12, 700, 3000), [0.0, -745.0]])
    exact = np.array([math.exp(max(v, -708.0)) for v in x])
    assert np.all(np.abs(context.elementary("exp", x) - exact) <= 4e-16 * exact)
    x = np.linspace(-8, 8, 4001)
    assert np.abs(context.elementary("erf", x) - np.array([math.erf(v) for v in x])).max() < 1.5e-7
    x = np.concatenate([np.linspace(0, 10, 2001), np.geomspace(10, 2e5, 2000)])
    assert np.abs(context.elementary("sin", x) - np.sin(x)).max() < 1e-11
    assert np.abs(context.elementary("cos", x) - np.cos(x)).max() < 1e-11
    x = np.geomspace(1, 1e6, 3000)
    assert np.all(np.abs(context.elementary("log", x) - np.log(x)) <= 4e-16 * np.log(x) + 1e-300)


def test_a_stale_or_miscompiled_kernel_is_a_clear_error(monkeypatch):
    """A build of another kernel version, or one whose arithmetic gives other bits (fused
    multiply-adds, x87), is refused when loaded."""
    monkeypatch.setattr(context, "_LIB", None)
    monkeypatch.setattr(context, "KERNEL_VERSION", context.KERNEL_VERSION + 1)
    with pytest.raises(ModelError, match="stale"):
        context.library()
    monkeypatch.undo()
    monkeypatch.setattr(context, "_LIB", None)
    monkeypatch.setitem(context.SELF_TEST, "exp", ([-0.3], [(0.7408182206817179 + 1e-16).hex()]))
    with pytest.raises(ModelError, match="other bits"):
        context.library()


def test_calls_the_cache_was_not_made_for_are_refused():
    cache = context.CompiledContext(kernel_net())
    cache.advance([[]] * 2)
    with pytest.raises(ValueError, match="no more lanes"):
        cache.advance([[1]] * 3)
    with pytest.raises(ValueError, match="equal length"):
        cache.advance([[], []])
    with pytest.raises(ValueError, match="slack"):
        cache.advance([list(range(300))] * 2)


def test_a_missing_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(context, "_LIB", None)
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES", [".nowhere"])
    with pytest.raises(ModelError, match="not built"):
        context.CompiledContext(kernel_net()).advance([[]])
