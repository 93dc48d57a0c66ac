"""The network: context caching, chunk layout, residual output, weights files."""
import dataclasses

import pytest
import torch

from bfn_codec.chunknet import ChunkNet as BFNNet
from bfn_codec.model import ModelConfig, build, fingerprint, load_weights, save_weights, to_symbols, to_vars

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


# ---- the semi-autoregressive design (sar.py) ----

SAR = ModelConfig(arch="sar", output="bytes", d_model=32, n_layers=2, n_heads=2, chunk_len=2, context_len=16,
                  step_d_model=16, step_layers=1, step_heads=2, beta1=3.0)


def random_sar(cfg=SAR, seed=0):
    torch.manual_seed(seed)
    net = build(cfg).double()
    torch.nn.init.normal_(net.head.weight, std=0.3)
    return net


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("window, kv_heads, local", [(16, 0, 0), (6, 0, 0), (16, 1, 0), (16, 2, 0), (6, 1, 0),
                                                     (16, 0, 3), (16, 1, 4), (6, 0, 3)])
def test_cached_context_equals_the_training_pass(window, kv_heads, local, chunk):
    """The coding-time context (keys and values cached across chunks, a window of tokens)
    gives the chunk states of the training pass over the clean sequence, as long as the
    window holds the whole sequence; a shorter window changes them. The same with fewer
    key/value heads than query heads (grouped and multi-query attention), with a first layer
    that sees only the last `local` tokens, and with chunks of one byte (one new token per
    step: attention with no mask, heads grouped by key)."""
    net = random_sar(dataclasses.replace(SAR, context_len=window, kv_heads=kv_heads, local_layers=int(local > 0),
                                         local_window=local))
    seq = torch.randint(0, 256, (1, 16))
    count = 16 // chunk
    full = net.context(seq, chunk)                              # (1, count, ds)
    cache = net.coding_context()
    states = [cache.advance([seq[0, max(0, chunk * (j - 1)):chunk * j].tolist()]) for j in range(count)]
    gap = max((full[:, j] - states[j][:, 0]).abs().max().item() for j in range(count))
    assert gap < 1e-10 if window == 16 else gap > 1e-3


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_regrouped_key_value_heads_keep_what_the_heads_share(kv_heads):
    """regroup_kv_heads averages the key/value heads of each group: a network whose heads in a
    group are equal computes the same states after regrouping; one whose heads differ does not."""
    from bfn_codec.model import regroup_kv_heads
    cfg = dataclasses.replace(SAR, n_heads=4)
    net, seq = random_sar(cfg), torch.randint(0, 256, (1, 16))
    grouped = build(dataclasses.replace(cfg, kv_heads=kv_heads)).double()
    grouped.load_state_dict(regroup_kv_heads(net.state_dict(), cfg, kv_heads))
    assert (net.context(seq) - grouped.context(seq)).abs().max() > 1e-3
    d, hd, size = cfg.d_model, cfg.d_model // 4, 4 // kv_heads
    keys = net.blocks[0].qkv.weight[d:2 * d].reshape(kv_heads, size, hd, d).mean(1).reshape(-1, d)
    assert torch.allclose(grouped.blocks[0].qkv.weight[d:d + kv_heads * hd], keys)
    with torch.no_grad():
        for block in net.blocks:
            for p in (block.qkv.weight, block.qkv.bias):
                for head in range(4):              # every head a copy of its group's first
                    for part in (d, 2 * d):
                        first = part + (head // size) * size * hd
                        p[part + head * hd:part + (head + 1) * hd] = p[first:first + hd].clone()
    grouped.load_state_dict(regroup_kv_heads(net.state_dict(), cfg, kv_heads))
    assert (net.context(seq) - grouped.context(seq)).abs().max() < 1e-12
    with pytest.raises(ValueError):
        regroup_kv_heads(net.state_dict(), cfg, 3)


def test_fewer_key_value_heads_shrink_the_cache():
    """kv_heads = 1: the context network's key/value projection and the coding cache hold
    1 / n_heads of what one key/value head per query head holds."""
    full, mqa = random_sar(SAR), random_sar(dataclasses.replace(SAR, kv_heads=1))
    d = SAR.d_model
    assert full.blocks[0].qkv.weight.shape[0] == 3 * d and mqa.blocks[0].qkv.weight.shape[0] == d + 2 * d // SAR.n_heads
    caches = [net.coding_context() for net in (full, mqa)]
    for cache in caches:
        cache.advance([b""])
    assert caches[0].rows[0][0].numel() == SAR.n_heads * caches[1].rows[0][0].numel()


def test_sar_chunk_sees_its_context_and_its_neighbour():
    net = random_sar()
    z = torch.randn(1, 1, 2, 8, 2, dtype=torch.float64)
    t = torch.rand(1, 1, dtype=torch.float64)
    s1, s2 = (net.context(torch.randint(0, 256, (1, 16)))[:, -1:] for _ in range(2))
    assert (net(z, t, s1) - net(z, t, s2)).abs().max() > 1e-3
    z2 = z.clone()
    z2[0, 0, 1, :, 1] += 1.0                                      # the second byte's beliefs
    assert (net(z, t, s1)[0, 0, 0] - net(z2, t, s1)[0, 0, 0]).abs().max() > 1e-3


def test_untrained_joint_output_is_the_own_evidence_posterior():
    """delta = 0: p_O(b) is the Bayesian posterior of a uniform prior given the bits' evidence."""
    net = build(SAR)
    z = torch.randn(1, 1, 2, 8, 2)
    log_p = net(z, torch.rand(1, 1), net.context(torch.randint(0, 256, (1, 16)))[:, :1])
    bits = to_vars(torch.arange(256), SAR).float()               # (256, 8)
    expected = ((z[..., 1] - z[..., 0]) @ bits.T).log_softmax(-1)
    assert torch.allclose(log_p, expected, atol=1e-5)


def test_weights_file_names_its_design_and_is_checked(tmp_path):
    from bfn_codec.model import ModelError
    net = random_sar()
    save_weights(tmp_path / "s.pt", net)
    model, _, _ = load_weights(tmp_path / "s.pt")
    assert type(model).__name__ == "SARNet" and model.cfg == SAR
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    blob["config"]["arch"] = "nonexistent"
    torch.save(blob, tmp_path / "bad_arch.pt")
    with pytest.raises(ModelError, match="nonexistent"):
        load_weights(tmp_path / "bad_arch.pt")
    blob["config"]["arch"], blob["format"] = "sar", 99
    torch.save(blob, tmp_path / "bad_format.pt")
    with pytest.raises(ModelError, match="format"):
        load_weights(tmp_path / "bad_format.pt")
    blob["format"], blob["config"]["arch"] = 2, "chunk"          # the tensors of another design
    torch.save(blob, tmp_path / "mismatch.pt")
    with pytest.raises(ModelError, match="do not fit"):
        load_weights(tmp_path / "mismatch.pt")


def test_a_new_design_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    """A second network design, registered under its own name, codes a round trip through
    the public compress/decompress functions, and its weights file names it."""
    from bfn_codec import codec, model as model_module
    from bfn_codec.chunknet import ChunkNet

    class Tempered(ChunkNet):
        """The chunk network with its output logits tempered by a learned scale."""
        def __init__(self, cfg):
            super().__init__(cfg)
            self.scale = torch.nn.Parameter(torch.tensor(0.7))

        def forward(self, z, t, cache=None):
            return (super().forward(z, t, cache) * self.scale).log_softmax(-1)

    monkeypatch.setitem(model_module.ARCHS, "tempered", Tempered)
    cfg = dataclasses.replace(CFG, arch="tempered", rope=True)
    net = build(cfg)
    torch.nn.init.normal_(net.head.weight, std=0.3)
    save_weights(tmp_path / "t.pt", net)
    assert type(load_weights(tmp_path / "t.pt")[0]) is Tempered
    data = b"A second design, coded bits-back end to end. " * 4
    blob, stats = codec.compress(data, str(tmp_path / "t.pt"), steps=4, fallback=False)
    assert stats.bfn_bytes > 0 and codec.decompress(blob, str(tmp_path / "t.pt")) == data
    monkeypatch.delitem(model_module.ARCHS, "tempered")
    with pytest.raises(Exception, match="tempered"):
        codec.load_setup.cache_clear() or codec._load_model.cache_clear() or codec.decompress(blob, str(tmp_path / "t.pt"))


@pytest.mark.parametrize("integer", [False, True])
def test_context_cache_compaction_keeps_the_states(monkeypatch, integer):
    """The coding-time buffers are compacted now and then; the states do not change (in
    float64 and on int8 grids)."""
    from bfn_codec.sar import ContextCache
    net = random_sar(dataclasses.replace(SAR, context_len=8))
    seq = torch.randint(0, 256, (3, 120))
    runs = []
    for slack in (3, 1000):
        monkeypatch.setattr(ContextCache, "SLACK", slack)
        cache = net.coding_context(integer)
        runs.append([cache.advance([seq[j, max(0, 2 * k - 2):2 * k].tolist() for j in range(3 - (k > 50))])
                     for k in range(60)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_local_layer_forgets_what_lies_beyond_its_window():
    """With the first layer local (window 3) and the second global, a byte's state still depends
    on far bytes (through the global layer); with both layers local it does not."""
    seq = torch.randint(0, 256, (1, 16))
    far = seq.clone()
    far[0, 0] = (far[0, 0] + 1) % 256
    for layers, depends in [(1, True), (2, False)]:
        net = random_sar(dataclasses.replace(SAR, local_layers=layers, local_window=3))
        gap = (net.context(seq, 1)[:, -1] - net.context(far, 1)[:, -1]).abs().max().item()
        assert (gap > 1e-6) == depends, (layers, gap)


def test_the_cache_compacts_correctly_when_calls_are_as_long_as_its_slack(monkeypatch):
    """Buffers with room for only one call beyond the window (SLACK below the chunk length)
    still give the states of a cache that never compacts; a malformed local config is refused."""
    from bfn_codec.sar import ContextCache
    net = random_sar(dataclasses.replace(SAR, context_len=6, local_layers=1, local_window=3))
    seq = torch.randint(0, 256, (1, 16))
    calls = [seq[0, max(0, 2 * j - 2):2 * j].tolist() for j in range(8)]
    roomy = net.coding_context()
    expected = [roomy.advance([c]) for c in calls]
    monkeypatch.setattr(ContextCache, "SLACK", 1)
    tight = net.coding_context()
    assert all(torch.equal(tight.advance([c]), e) for c, e in zip(calls, expected))
    assert tight.rows[0][0].shape[2] == 6 + 3
    for bad in (dict(local_layers=1, local_window=0), dict(local_layers=3, local_window=2)):
        with pytest.raises(ValueError):
            build(dataclasses.replace(SAR, **bad))


@pytest.mark.parametrize("kv_heads", [0, 1, 2])
def test_a_block_alone_is_the_block_over_one_position(kv_heads):
    """Block.alone (the per-step network's one-byte chunks) computes what heads + finish
    compute for sequences of one position, with only the value projection."""
    from bfn_codec.layers import Block
    torch.manual_seed(0)
    block = Block(16, 4, kv_heads=kv_heads).double()
    h = torch.randn(5, 1, 16, dtype=torch.float64)
    assert torch.allclose(block.alone(h), block.finish(h, *block.heads(h)), rtol=0, atol=1e-12)
    assert not torch.allclose(block.alone(h), block.finish(h, *block.heads(h[[1, 0, 2, 3, 4]])), atol=1e-3)
