"""The network: context caching, chunk layout, residual output, weights files."""
import dataclasses

import pytest
import torch

from bfn_codec.model import BFNNet, ModelConfig, fingerprint, load_weights, save_weights, to_symbols, to_vars

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, chunk_len=8, context_len=16, beta1=3.0)


def test_bits_round_trip_msb_first():
    x = torch.arange(256)
    v = to_vars(x, CFG)
    assert v[5].tolist() == [0, 0, 0, 0, 0, 1, 0, 1]
    assert torch.equal(to_symbols(v, CFG), x)


@pytest.mark.parametrize("rope", [False, True])
def test_training_chunks_equal_coding_calls(rope):
    """Chunk j of a training sequence gets exactly what the coder gets with j*L context bytes."""
    torch.manual_seed(0)
    net = BFNNet(dataclasses.replace(CFG, rope=rope)).double()
    torch.nn.init.normal_(net.head.weight)
    seq = torch.randint(0, 256, (2, 24))
    C, L = 3, 8
    z = torch.randn(2, C, L, 8, 2, dtype=torch.float64)
    t = torch.rand(2, C, dtype=torch.float64)
    full = net(z, t, net.context(seq[:, :16]))
    for j in range(C):
        cache = net.context(seq[:, :j * L]) if j else None
        one = net(z[:, j:j + 1], t[:, j:j + 1], cache)
        assert torch.allclose(full[:, j:j + 1], one, atol=1e-10)


def test_context_changes_the_output():
    """The chunk does see its context (a mask that hid it would pass the test above)."""
    torch.manual_seed(0)
    for rope in (False, True):
        net = BFNNet(dataclasses.replace(CFG, rope=rope)).double()
        torch.nn.init.normal_(net.head.weight)
        z = torch.randn(1, 1, 8, 8, 2, dtype=torch.float64)
        t = torch.rand(1, 1, dtype=torch.float64)
        a = net(z, t, net.context(torch.randint(0, 256, (1, 16))))
        b = net(z, t, net.context(torch.randint(0, 256, (1, 16))))
        assert (a - b).abs().max() > 1e-3


def test_untrained_output_is_the_own_evidence_posterior():
    net = BFNNet(CFG)
    z = torch.randn(1, 1, 8, 8, 2)
    assert torch.allclose(net(z, torch.rand(1, 1)), z.log_softmax(-1), atol=1e-6)


def test_weights_file_round_trip_and_fingerprint(tmp_path):
    net = BFNNet(CFG)
    torch.nn.init.normal_(net.head.weight)
    save_weights(tmp_path / "a.pt", net)
    model, fp, _ = load_weights(tmp_path / "a.pt")
    assert model.cfg == CFG
    with torch.no_grad():
        net.head.weight[0, 0] += 1.0
    save_weights(tmp_path / "b.pt", net)
    assert load_weights(tmp_path / "b.pt")[1] != fp
    blob = torch.load(tmp_path / "a.pt", weights_only=True)
    assert fingerprint(dataclasses.asdict(CFG), blob["state"]) == fp
    assert fingerprint({**dataclasses.asdict(CFG), "beta1": 2.0}, blob["state"]) != fp
