"""Bits-back coder: every push/pop pair is the identity on the stack, chunks round-trip,
and the code length matches the model's n-step loss."""
import numpy as np
import pytest
import torch

from bfn_codec import bfn, codec, container, families
from bfn_codec import coder as bb
from bfn_codec.model import load_weights, to_vars
from bfn_codec.predictor import Predictor

from conftest import TEXT


def fresh_stack(words=256, seed=0):
    return bb.AnsCoder(np.random.default_rng(seed).integers(1, 2 ** 32, words, dtype=np.uint32))


def check_pop_push(pop, push):
    """Bits-back direction: pop then push restores the stack bit for bit."""
    stack = fresh_stack()
    before = stack.get_compressed()
    sym = pop(stack)
    push(stack, sym)
    assert np.array_equal(stack.get_compressed(), before)
    return sym


def check_push_pop(push, pop, sym):
    """Coding direction: push then pop gives the symbol back and restores the stack."""
    stack = fresh_stack()
    before = stack.get_compressed()
    push(stack, sym)
    out = pop(stack)
    assert np.array_equal(np.asarray(out), np.asarray(sym))
    assert np.array_equal(stack.get_compressed(), before)


SCH = bb.Schedule(8, 3.0, 4.0)
BITS, BYTES, JOINT = bb.Bits(), bb.Bytes(), bb.JointBytes()
RNG = np.random.default_rng(1)
D = 200
X = RNG.integers(0, 2, D)
LOGIT = bb.quantise_logit(RNG.normal(0, 3, D))


def test_gaussian_pair():
    mean, std = RNG.normal(0, 50, D), RNG.uniform(0.5, 20, D)
    sym = check_pop_push(lambda s: bb.pop_gaussian(s, mean, std, 130),
                         lambda s, v: bb.push_gaussian(s, v, mean, std, 130))
    check_push_pop(lambda s, v: bb.push_gaussian(s, v, mean, std, 130),
                   lambda s: bb.pop_gaussian(s, mean, std, 130), sym)


def test_bits_pair():
    p = bb.prob_of_one(LOGIT)
    sym = check_pop_push(lambda s: bb.pop_bits(s, p), lambda s, v: bb.push_bits(s, v, p))
    check_push_pop(lambda s, v: bb.push_bits(s, v, p), lambda s: bb.pop_bits(s, p), sym)


def test_top_and_bridge_pairs():
    S_n = check_pop_push(lambda s: bb.pop_top(s, SCH, X), lambda s, v: bb.push_top(s, SCH, v, X))
    check_push_pop(lambda s, v: bb.push_top(s, SCH, v, X), lambda s: bb.pop_top(s, SCH, X), S_n)
    for i in (SCH.n, 3, 2):
        S_prev = check_pop_push(lambda s: bb.pop_bridge(s, SCH, i, S_n),
                                lambda s, v: bb.push_bridge(s, SCH, i, v, S_n))
        check_push_pop(lambda s, v: bb.push_bridge(s, SCH, i, v, S_n),
                       lambda s: bb.pop_bridge(s, SCH, i, S_n), S_prev)


@pytest.mark.parametrize("words", [0, 1, 3, 4, 5, 40, 256])
def test_whitening_is_its_own_inverse(words):
    """Whitening twice with the same key restores the stack, on any fill (it never pops
    more than the stack holds), and it changes the words it covers."""
    stack = fresh_stack(words) if words else bb.AnsCoder()
    before, words_before = stack.get_compressed(), stack.pos()[0]
    bb.whiten(stack, 7, 300)
    assert stack.pos()[0] == words_before
    if words_before >= 2:        # the cap, 2 * words - 2, lets whitening act
        assert not np.array_equal(stack.get_compressed(), before)
    bb.whiten(stack, 7, 300)
    assert np.array_equal(stack.get_compressed(), before)


@pytest.mark.parametrize("whitened", [True, False])
def test_pops_stay_fresh_under_a_miscalibrated_model(whitened, monkeypatch):
    """A confidently wrong model pushes redundant bits; whitening keeps the popped
    trajectories fresh, so the actual cost stays at the model's loss on that trajectory
    (without whitening it is 4 % above)."""
    if not whitened:
        monkeypatch.setattr(bb, "whiten", lambda coder, key, count: None)
    def wrong(s, t):                     # says zeros; the data are mostly ones
        return bb.quantise_logit(0.5 * s - 4.0)
    rng = np.random.default_rng(4)
    sch = bb.Schedule(10, 3.0, 4.0)
    stack = fresh_stack(2000)
    start, stats = codec.information_bits(stack), bb.Stats()
    for k in range(40):
        bb.encode_chunk(stack, sch, BITS, (rng.random(512) < 0.9).astype(np.int64), wrong, k, stats)
    excess = (codec.information_bits(stack) - start) / stats.model_bits - 1
    assert abs(excess) < 0.015 if whitened else excess > 0.03


def test_direct_pair():
    predict = lambda s, t: LOGIT
    check_push_pop(lambda s, v: bb.encode_direct(s, BITS, v, predict), lambda s: bb.decode_direct(s, BITS, D, predict), X)


@pytest.mark.parametrize("i", [1, 2, 8])
def test_receiver_pair(i):
    s_prev = RNG.normal(0, 3, D) if i > 1 else np.zeros(D)
    S_i = check_pop_push(lambda s: bb.pop_receiver(s, SCH, i, s_prev, LOGIT),
                         lambda s, v: bb.push_receiver(s, SCH, i, v, s_prev, LOGIT))
    check_push_pop(lambda s, v: bb.push_receiver(s, SCH, i, v, s_prev, LOGIT),
                   lambda s: bb.pop_receiver(s, SCH, i, s_prev, LOGIT), S_i)


def stand_in(s, t):
    """A fixed, deliberately miscalibrated 'network' for coder-only tests."""
    return bb.quantise_logit(1.3 * s + 0.4 - t)


@pytest.mark.parametrize("n", [1, 4, 20])
def test_chunk_round_trip_restores_the_stack(n):
    sch = bb.Schedule(n, 3.0, 4.0)
    stack = fresh_stack(4096)
    before = stack.get_compressed()
    chunks = [RNG.integers(0, 2, 64) for _ in range(3)]
    for k, x in reversed(list(enumerate(chunks))):
        bb.encode_chunk(stack, sch, BITS, x, stand_in, k)
    for k, x in enumerate(chunks):
        assert np.array_equal(bb.decode_chunk(stack, sch, BITS, 64, stand_in, k), x)
    assert np.array_equal(stack.get_compressed(), before)


def test_code_length_matches_the_n_step_loss(any_model):
    """Net stack growth within 1 % of the model's loss on the same trajectory, and within
    3 % of an independent Monte Carlo estimate of the n-step loss (plus reconstruction)."""
    model, _, _ = load_weights(any_model)
    check_code_length(model, typo_text(12288 if model.cfg.chunk_len > 8 else 4096), n=10)


def typo_text(size):
    data = np.frombuffer(TEXT[:size], dtype=np.uint8).copy()   # with typos: a few bits per byte
    rng = np.random.default_rng(7)
    typos = rng.random(len(data)) < 0.1
    data[typos] = rng.integers(97, 123, typos.sum())
    return data


def check_code_length(model, data, n, reps=2, mc_tolerance=0.03):
    cfg = model.cfg
    pred = Predictor(model)
    sch = bb.Schedule(n, cfg.beta1, 4.0)
    bounds = [chunks[0] for chunks in codec.stripes([(0, len(data))], cfg.chunk_len)]
    contexts = pred.contexts()
    states = [contexts.advance([data[prev:a]]) for prev, (a, _) in zip([0] + [a for a, _ in bounds[:-1]], bounds)]
    stack = fresh_stack(1 << 14)
    start = codec.information_bits(stack)
    stats = bb.Stats()
    for k, (a, b) in reversed(list(enumerate(bounds))):
        bb.encode_chunk(stack, sch, pred.family, bb.bytes_to_bits(data[a:b]), pred.for_stripe(states[k], [b - a]), k,
                        stats)
    actual = codec.information_bits(stack) - start
    assert actual == pytest.approx(stats.model_bits, rel=0.01)

    # independent estimate: fresh trajectories from the flow, every step's KL by the family
    g = torch.Generator().manual_seed(5)
    mc = 0.0
    with torch.no_grad():
        for k, (a, b) in enumerate(bounds):
            context = model.prepare(states[k])
            v = to_vars(torch.from_numpy(data[a:b].astype(np.int64)), cfg)[None, None].repeat(reps, 1, 1, 1)
            if context is not None:
                context = ([(kk.expand(reps, -1, -1, -1), vv.expand(reps, -1, -1, -1)) for kk, vv in context]
                           if isinstance(context, list) else context.expand(reps, -1, -1))
            net = lambda z, t: model(z.double(), t.double(), context)
            mc += sum(families.n_step_loss(model.family, net, v, n, cfg.beta1, g, samples=8)) / reps
    assert actual == pytest.approx(bfn.bits(mc), rel=mc_tolerance)
    return actual, bfn.bits(mc)


class Recording:
    """An AnsCoder that records the information it holds after every operation."""

    def __init__(self, stack):
        self.stack, self.levels = stack, []

    def decode(self, *args):
        out = self.stack.decode(*args)
        self.levels.append(codec.information_bits(self.stack))
        return out

    def encode_reverse(self, *args):
        self.stack.encode_reverse(*args)
        self.levels.append(codec.information_bits(self.stack))

    def pos(self):
        return self.stack.pos()


@pytest.mark.parametrize("n", [5, 10, 30])
def test_peak_pop_bits_bounds_what_a_chunk_pops(n):
    """The schedule's estimate of a chunk's deepest point (the initial bits a frame needs)
    is an upper bound on the measured one, and not a loose one."""
    sch = bb.Schedule(n, 3.0, 4.0)
    x = RNG.integers(0, 2, 512)
    deepest = 0.0
    for seed in range(3):
        stack = Recording(fresh_stack(4096, seed))
        start = codec.information_bits(stack.stack)
        bb.encode_chunk(stack, sch, BITS, x, stand_in, seed)
        deepest = max(deepest, (start - min(stack.levels)) / len(x))
    assert 0.8 * sch.peak_pop_bits(len(x)) < deepest <= sch.peak_pop_bits(len(x))


def test_stored_stream_still_decodes_and_encodes_the_same():
    """A .bfn file committed with an earlier version decodes to its original, and encoding
    the original again gives the same bytes: the format and the coder did not drift
    (regenerate with tests/data/make_compat.py only when the format changes on purpose)."""
    from pathlib import Path
    data = Path(__file__).parent / "data"
    model, original = data / "compat_model.pt", (data / "compat_sample.bin").read_bytes()
    stored = (data / "compat_sample.bin.bfn").read_bytes()
    assert codec.decompress(stored, model) == original
    assert codec.compress(original, model, fallback=False)[0] == stored


def test_stored_sar_streams_of_every_version_still_decode():
    """Files of the joint-byte family committed with each format version decode to their
    original (version 3: lanes of at least 2048 bytes; 4: 512); encoding the original again
    gives the newest file byte for byte. Regenerate with tests/data/make_compat.py sar only
    when the format changes on purpose (the older files stay)."""
    from pathlib import Path
    from bfn_codec import container
    data = Path(__file__).parent / "data"
    model, original = data / "compat_sar_model.pt", (data / "compat_sar.bin").read_bytes()
    stored = {container.unpack(p.read_bytes())[0].version: p.read_bytes() for p in data.glob("compat_sar.v*.bfn")}
    assert set(stored) == set(container.READS["bytes"])
    for version, blob in stored.items():
        assert codec.decompress(blob, model) == original, version
    assert codec.compress(original, model, fallback=False)[0] == stored[container.VERSIONS["bytes"]]
    assert stored[3] != stored[4]                   # the lanes differ


@pytest.mark.parametrize("length, frame_size, sizes", [
    (0, 1 << 18, [0]),
    (1000, 1 << 18, [1000]),
    (65535, 1 << 18, [65535]),                  # below 2 x MIN_SPLIT: one frame
    (150_001, 1 << 18, [75_001, 75_000]),       # mid-sized: two frames for two cores
    (600_000, 1 << 18, [200_000] * 3),
    (100_000, 1 << 14, [14_286] * 6 + [14_284]),
])
def test_frames_depend_only_on_the_length(length, frame_size, sizes):
    frames = codec.split_frames(bytes(length), frame_size)
    assert [len(f) for f in frames] == sizes


def test_probe_skips_the_bfn_where_it_cannot_win(tiny_model):
    """Bytes that xz shrinks but the model does not know (64 random symbols): one batched
    t = 0 network call shows that the BFN cannot beat xz, so the frame is xz without coding
    every chunk."""
    model, _, _ = load_weights(tiny_model)
    pred = Predictor(model)
    calls = []
    forward = model.forward
    model.forward = lambda *a: calls.append(a) or forward(*a)
    data = np.random.default_rng(3).integers(0, 64, 4096, dtype=np.uint8).tobytes()
    frame = codec.encode_frame(data, pred, bb.Schedule(10, model.cfg.beta1, 4.0))
    assert frame.method == codec.Method.XZ and len(frame.payload) < 0.9 * len(data)
    assert len(calls) == 1                  # one batched network call decides
    header = codec.container.unpack(codec.compress(data, tiny_model)[0])[0]
    assert header.model == codec.container.NO_MODEL            # no frame needs the model: none named
    text = np.frombuffer(TEXT[:4096], dtype=np.uint8)    # where the model is good, the guess is low
    assert pred.probe_bits(text) < 2 * len(text) < 6 * len(text) < pred.probe_bits(np.frombuffer(data, np.uint8))


def test_incompressible_input_never_loads_a_model(tmp_path):
    """Random bytes and empty input are stored without torch ever being imported (fast), in
    both directions, and the header names no model; text loads it."""
    import subprocess
    import sys
    script = (
        "import os, sys\n"
        "from bfn_codec import codec, container\n"
        "data = os.urandom(100_000)\n"
        "for x in (data, b''):\n"
        "    blob = codec.compress(x, os.path.join(sys.argv[1], 'no-such-model.pt'))[0]\n"
        "    header, frames, _ = container.unpack(blob)\n"
        "    assert header.model == container.NO_MODEL, header\n"
        "    assert all(f.method == codec.Method.STORED for f in frames) and len(blob) < len(x) + 100\n"
        "    assert codec.decompress(blob, 'no-such-model.pt') == x\n"
        "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (tmp_path / "random").write_bytes(np.random.default_rng(5).bytes(50_000))       # the same through the CLI
    script = ("import sys; from bfn_codec import cli\n"
              "try:\n    cli.compress_cmd([sys.argv[1], '-q'])\n"
              "except SystemExit as e:\n    assert e.code == 0, e.code\n"
              "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "random")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "random.bfn").stat().st_size < 50_100


# ---- the joint byte families: coordinate by coordinate (chain rule), one symbol per byte (joint) ----

NB = 25                                       # bytes
XB = RNG.integers(0, 2, 8 * NB)
BIAS = RNG.normal(0, 2, 256)


def stand_in_bytes(s, t):
    """A fixed, miscalibrated joint 'network': (N, 256) quantised log-weights."""
    u = np.asarray(s, np.float64).reshape(-1, 8)
    logits = 1.3 * u @ bb.Bytes.TABLE.T + BIAS - t
    return bb.quantise_logit(logits - logits.max(1, keepdims=True))


BYTE_FAMILIES = pytest.mark.parametrize("family", [BYTES, JOINT], ids=["chain", "joint"])


@BYTE_FAMILIES
def test_bytes_output_pair(family):
    out = stand_in_bytes(np.zeros(8 * NB), 1.0)
    sym = check_pop_push(lambda s: family.pop_symbols(s, out, 8 * NB), lambda s, v: family.push_symbols(s, out, v))
    check_push_pop(lambda s, v: family.push_symbols(s, out, v), lambda s: family.pop_symbols(s, out, 8 * NB), sym)


@BYTE_FAMILIES
@pytest.mark.parametrize("i", [1, 2, 8])
def test_bytes_receiver_step_pair(family, i):
    s_prev = RNG.normal(0, 3, 8 * NB) if i > 1 else np.zeros(8 * NB)
    out = stand_in_bytes(s_prev, (i - 1) / SCH.n)
    S_i = check_pop_push(lambda s: family.pop_step(s, SCH, i, s_prev, out),
                         lambda s, v: family.push_step(s, SCH, i, v, s_prev, out))
    check_push_pop(lambda s, v: family.push_step(s, SCH, i, v, s_prev, out),
                   lambda s: family.pop_step(s, SCH, i, s_prev, out), S_i)


@BYTE_FAMILIES
def test_bytes_output_costs_the_joint(family):
    """Both byte families code the output at log p(x) of the joint: the chain rule's sum of
    conditionals up to the logit grid, the joint symbol up to constriction's 24-bit rounding;
    and the stack grows by that (bytes drawn from the joint: far-tail bytes cost less than
    log p(x), their probability floored by the coder)."""
    out = stand_in_bytes(RNG.normal(0, 2, 8 * NB), 0.3)
    p = np.exp(out) / np.exp(out).sum(1, keepdims=True)
    x = np.array([RNG.choice(256, p=row) for row in p], dtype=np.uint8)
    stack = fresh_stack()
    start = codec.information_bits(stack)
    bits = family.push_symbols(stack, out, bb.bytes_to_bits(x))
    joint = -(out[np.arange(NB), x] - np.log(np.exp(out).sum(1))).sum() / np.log(2)
    assert bits == pytest.approx(joint, abs=NB * 8 * 0.01)
    assert codec.information_bits(stack) - start == pytest.approx(joint, abs=NB * 8 * 0.01)


def test_joint_weights_are_exact_integers():
    """The joint family's weights: its exp table is round(2^30 exp(-j / 1024)), and the
    posterior's log-weights are integers (in 1/1024), whatever the order of the sums."""
    table = bb.JointBytes.exp_table()
    j = np.arange(len(table))
    assert np.array_equal(table, np.round(2 ** 30 * np.exp(-j / 1024)))
    out = stand_in_bytes(RNG.normal(0, 2, 8 * NB), 0.3)
    u = RNG.normal(0, 5, 8 * NB)
    points = JOINT.points(out, u)
    assert np.array_equal(points, np.round(points))
    steps = np.round(u * 1024).reshape(NB, 8)
    assert np.array_equal(points, out * 1024 + sum(steps[:, d, None] * bb.Bytes.TABLE[:, d] for d in range(7, -1, -1)))
    rows = JOINT.pmf(points)
    assert rows.max(1).tolist() == [2.0 ** 30] * NB and rows.min() >= 2


def test_a_network_output_that_is_not_a_number_is_an_error():
    """A NaN never reaches the coder (it would turn into an arbitrary table index)."""
    assert np.array_equal(bb.quantise_logit([0.004, -np.inf, 40.0]), [0.0, -16.0, 16.0])
    with pytest.raises(ValueError):
        bb.quantise_logit(np.array([[0.0, np.nan]]))


@BYTE_FAMILIES
@pytest.mark.parametrize("n", [1, 4, 20])
def test_bytes_chunk_round_trip_restores_the_stack(family, n):
    sch = bb.Schedule(n, 3.0, 4.0)
    stack = fresh_stack(4096)
    before = stack.get_compressed()
    chunks = [RNG.integers(0, 2, 8 * 4) for _ in range(3)]
    for k, x in reversed(list(enumerate(chunks))):
        bb.encode_chunk(stack, sch, family, x, stand_in_bytes, k)
    for k, x in enumerate(chunks):
        assert np.array_equal(bb.decode_chunk(stack, sch, family, 8 * 4, stand_in_bytes, k), x)
    assert np.array_equal(stack.get_compressed(), before)


@BYTE_FAMILIES
def test_bytes_code_length_is_the_trajectory_loss_under_a_miscalibrated_model(family):
    """Chained chunks of a wrong joint model cost what the model's loss on their trajectories says."""
    rng = np.random.default_rng(4)
    sch = bb.Schedule(10, 3.0, 4.0)
    stack = fresh_stack(2000)
    start, stats = codec.information_bits(stack), bb.Stats()
    for k in range(60):
        x = bb.bytes_to_bits(rng.choice([32, 101, 116, 97], 16).astype(np.uint8))
        bb.encode_chunk(stack, sch, family, x, stand_in_bytes, k, stats)
    excess = (codec.information_bits(stack) - start) / stats.model_bits - 1
    assert abs(excess) < 0.015


@pytest.mark.parametrize("length, lane_bytes", [(1000, 64), (1000, 100), (700, 0), (130, 64)])
def test_lanes_round_trip(any_model, length, lane_bytes):
    """A frame as lanes coded in lock-step (the last one shorter, its last chunk partial)
    decodes exactly, and the lanes do change the stream."""
    model, _, _ = load_weights(any_model)
    pred = Predictor(model)
    sch = bb.Schedule(4, model.cfg.beta1, 4.0)
    data = typo_text(length).tobytes()
    rule = container.LaneRule(lane_bytes)
    frame = codec.encode_frame(data, pred, sch, rule, fallback=False)
    assert codec.decode_frame(frame, pred, sch, rule) == data
    if lane_bytes and length >= 2 * lane_bytes:
        assert len(codec.lanes(length, model.cfg.chunk_len, rule)) >= 2
        assert codec.encode_frame(data, pred, sch, container.LaneRule(0), fallback=False).payload != frame.payload


def test_lanes_depend_only_on_the_length():
    rule = container.LaneRule(4096)
    layout = codec.lanes(100_000, 2, rule)
    assert len(layout) == 24 and layout[0] == (0, 4168) and layout[-1][1] == 100_000
    assert all((b - a) % 2 == 0 for a, b in layout[:-1])
    assert codec.lanes(8191, 2, rule) == [(0, 8191)]
    assert len(codec.lanes(10 ** 7, 2, rule)) == codec.MAX_LANES
    assert codec.lanes(5000, 1, container.LaneRule(0)) == [(0, 5000)]
    few = container.LANES[4]                       # short frames: up to 16 lanes of at least 512 bytes
    assert [len(codec.lanes(n, 1, few)) for n in (1023, 1024, 6000, 8192, 40_000, 76_000, 10 ** 6)] == \
        [1, 2, 11, 16, 19, 37, 64]
    plan = codec.stripes(codec.lanes(1001, 4, container.LaneRule(100)), 4)
    assert sorted(i for chunks in plan for a, b in chunks for i in range(a, b)) == list(range(1001))
