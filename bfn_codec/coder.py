"""Bits-back coding of a BFN over binary variables on one constriction ANS stack.

Each variable (a bit of a byte) is coded through its informative coordinate s = z_1 - z_0:

    top      q(s_n | x)        = N(2 beta_n c, 4 beta_n),                   c = 2x - 1
    bridge   q(s_{i-1} | s_i)  = N(s_i beta_{i-1}/beta_i, 4 beta_{i-1} alpha_i / beta_i)
    receiver p(s_i | s_{i-1})  = sum_c w_c N(s_{i-1} + 2 alpha_i c, 4 alpha_i)
    output   p(x | s_n)        = Bernoulli(p_O(x = 1 | theta_n, t = 1))

(the flow, sender and receiver of sec. 6 in one coordinate). The component weights w_c
come from the output family (below): independent bits (`Bits`) give them directly; a joint
256-way byte is either one symbol, the byte that picks the component of all 8 coordinates
at once (`JointBytes`, format 6), or coded by the chain rule, coordinate d of every byte
under the joint's posterior given the byte's coordinates 0..d-1 already coded at this
step (`Bytes`, formats 3 to 5; the same for the output p(x | s_n)). Each piece is a
push/pop pair: `pop` is the exact inverse of `push` on the stack. The encoder of a chunk pops
s_n, pushes x, then for i = n..2 pops s_{i-1} from the bridge and pushes s_i under the
receiver, and finally pushes s_1; the decoder runs the exact reverse. Pushing under the
receiver mixture is itself bits-back over the component c (pop c from its posterior,
push s_i under component c, push c under w). Before each step's pops the top of the stack
is whitened (`whiten`), so that the pops draw fresh samples whatever was pushed before.

Determinism: every number handed to constriction is a function of integers and of the
network's output *after* `quantise_logit`, computed the same way on both sides. s_i
lives on the integer grid s_i = S_i * grid_i; Bernoulli probabilities are rounded to
2^-20; `JointBytes` hands over integer weights from integer log-weights.
"""
import dataclasses
import functools
import math

import numpy as np
import constriction

_model = constriction.stream.model
AnsCoder = constriction.stream.stack.AnsCoder

LOGIT_STEP = 1.0 / 64      # network logits are rounded to this grid before use
LOGIT_MAX = 16.0
PROB_STEP = 2.0 ** -20     # every probability handed to the coder is a multiple of this
POP_SIGMAS = 6.0           # pop ranges: +- this many standard deviations


def quantise_logit(logit):
    """Round float logits (any dtype) to the fixed grid: what both sides agree on. (The steps
    are powers of two: scaling by them is exact.) A NaN (a broken network) is an error."""
    points = np.round(np.asarray(logit, np.float64) * (1 / LOGIT_STEP))
    if np.isnan(points).any():
        raise ValueError("the network's output is not a number")
    top = LOGIT_MAX / LOGIT_STEP
    return np.minimum(np.maximum(points, -top, out=points), top, out=points) * LOGIT_STEP


def prob_of_one(logit):
    """sigmoid(logit) on the 2^-20 grid, never 0 or 1."""
    points = np.round(1.0 / (1.0 + np.exp(-logit)) * (1 / PROB_STEP))
    return np.minimum(np.maximum(points, 1.0, out=points), 1 / PROB_STEP - 1, out=points) * PROB_STEP


def _gaussian_bits(std):
    """Entropy in bits of a Gaussian of this std (in grid units) on unit bins."""
    return math.log2(std * math.sqrt(2 * math.pi * math.e))


class Schedule:
    """Steps, accuracies and integer grids for n steps (sec. 6.8); r grid bins per receiver sigma."""

    def __init__(self, n, beta1, r=4.0):
        from .bfn import alpha, beta       # here, so that frames without a model need no torch
        self.n, self.beta1, self.r = n, float(beta1), float(r)
        i = np.arange(n + 1)
        self.beta = beta(i / n, beta1)
        self.alpha = np.concatenate([[0.0], alpha(i[1:], n, beta1)])
        self.grid = np.concatenate([[1.0], np.sqrt(4 * self.alpha[1:]) / r])
        # Push ranges for the receiver: wide enough for any value the tight pops can give.
        bound = np.zeros(n + 1)          # largest |s_i| reachable
        bound[n] = 2 * self.beta[n] + POP_SIGMAS * math.sqrt(4 * self.beta[n]) + 2 * self.grid[n]
        for k in range(n, 1, -1):
            bound[k - 1] = (bound[k] * self.beta[k - 1] / self.beta[k] + POP_SIGMAS * self.bridge_std(k)
                            + 2 * self.grid[k - 1])
        self.push_range = np.zeros(n + 1, dtype=np.int64)
        for k in range(1, n + 1):
            widest = bound[k] + bound[k - 1] + 2 * self.alpha[k]
            self.push_range[k] = int(math.ceil(widest / self.grid[k])) + 2

    def t(self, i):
        return i / self.n

    def expected_pop_bits(self, i):
        """Bits per variable the encoder pops at step i before the step's pushes (entropies
        of the discretised Gaussians, the component as a full bit); i = n + 1: the top."""
        if i == self.n + 1:
            return _gaussian_bits(math.sqrt(4 * self.beta[self.n]) / self.grid[self.n])
        return (_gaussian_bits(self.bridge_std(i) / self.grid[i - 1]) if i > 1 else 0.0) + 1.0

    def whiten_words(self, i, D):
        """16-bit words whitened before step i's pops (i = n + 1: the top) for D variables:
        what the step is expected to pop, and a margin."""
        return math.ceil(D * self.expected_pop_bits(i) / 16) + WHITEN_MARGIN

    def peak_pop_bits(self, D):
        """Bits per variable that a chunk of D variables pops before its pushes catch up
        (its worst point, the whitening included): the initial bits it needs on the stack."""
        run, peak = 0.0, 0.0
        for i in range(self.n + 1, 0, -1):
            peak = min(peak, run - 16 * self.whiten_words(i, D) / D)
            if i <= self.n:
                run += _gaussian_bits(self.r) + 1.0      # the step's receiver push and component
            run -= self.expected_pop_bits(i)
        return -peak

    def bridge_std(self, i):
        return math.sqrt(4 * self.beta[i - 1] * self.alpha[i] / self.beta[i])


# ---- elementary push/pop pairs ----

def push_gaussian(coder, S, mean, std, half_range):
    """Push integers S under N(mean, std^2) on unit bins, support round(mean) +- half_range."""
    centre = np.round(mean)
    coder.encode_reverse((S - centre).astype(np.int32), _model.QuantizedGaussian(-half_range, half_range),
                         mean - centre, std)


def pop_gaussian(coder, mean, std, half_range):
    centre = np.round(mean)
    S = coder.decode(_model.QuantizedGaussian(-half_range, half_range), mean - centre, std)
    return S.astype(np.int64) + centre.astype(np.int64)


def push_bits(coder, bits, p_one):
    coder.encode_reverse(bits.astype(np.int32), _model.Bernoulli(perfect=False), p_one)


def pop_bits(coder, p_one):
    return coder.decode(_model.Bernoulli(perfect=False), p_one).astype(np.int64)


_WORD = _model.Uniform(1 << 16)
WHITEN_MARGIN = 4          # 16-bit words whitened beyond what a step is expected to pop


def _keystream(key, count):
    """count pseudo-random 16-bit words from an integer key, the same on any machine: the low
    16 bits of splitmix64's output function applied to key * 0x9E3779B97F4A7C15 + j,
    j = 1..count (arithmetic mod 2^64). Part of the format."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15) + np.arange(1, count + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) & np.uint64(0xFFFF)).astype(np.int32)


def whiten(coder, key, count):
    """XOR the top `count` 16-bit words of the stack with a keyed pseudo-random stream.

    Its own inverse and free. Why: after a push, the next pop reads a quantile inside the
    pushed symbol's bin, so pops that follow pushes under a miscalibrated model are not
    fresh samples and the trajectory drifts; the whitened words no longer depend on the
    bins of what was pushed. The count is capped by the stack's bulk word count, which
    whitening keeps, so the decoder computes the same cap."""
    count = min(count, 2 * coder.pos()[0] - 2)
    if count > 0:
        coder.encode_reverse(coder.decode(_WORD, count) ^ _keystream(key, count), _WORD)


def _whiten_step(coder, sch, key, i, D):
    whiten(coder, key * (sch.n + 2) + i, sch.whiten_words(i, D))


def _pop_half_range(std):
    return int(math.ceil(POP_SIGMAS * float(np.max(std)))) + 1


# ---- BFN pieces: each a push/pop pair over integer states S ----

def push_top(coder, sch, S_n, x):
    mean, std = _top_params(sch, x)
    push_gaussian(coder, S_n, mean, std, _pop_half_range(std))


def pop_top(coder, sch, x):
    """S_n ~ q(s_n | x): the Bayesian flow at t = 1 (sec. 6.4)."""
    mean, std = _top_params(sch, x)
    return pop_gaussian(coder, mean, std, _pop_half_range(std))


def _top_params(sch, x):
    n = sch.n
    mean = 2 * sch.beta[n] * (2 * x - 1) / sch.grid[n]
    std = np.full(len(x), math.sqrt(4 * sch.beta[n]) / sch.grid[n])
    return mean, std


def _bridge_params(sch, i, S_i):
    mean = S_i * sch.grid[i] * (sch.beta[i - 1] / sch.beta[i]) / sch.grid[i - 1]
    std = np.full(len(S_i), sch.bridge_std(i) / sch.grid[i - 1])
    return mean, std


def push_bridge(coder, sch, i, S_prev, S_i):
    mean, std = _bridge_params(sch, i, S_i)
    push_gaussian(coder, S_prev, mean, std, _pop_half_range(std))


def pop_bridge(coder, sch, i, S_i):
    """S_{i-1} ~ q(s_{i-1} | s_i): a Brownian bridge, independent of x."""
    mean, std = _bridge_params(sch, i, S_i)
    return pop_gaussian(coder, mean, std, _pop_half_range(std))


def _component_params(sch, i, s_prev, c):
    mean = (s_prev + 2 * sch.alpha[i] * (2 * c - 1)) / sch.grid[i]
    return mean, np.full(len(s_prev), sch.r)


def _posterior(logit, s_i, s_prev):
    """P(c = 1 | s_i, s_{i-1}): the receiver's component log-odds plus u = s_i - s_{i-1}."""
    return prob_of_one(logit + (s_i - s_prev))


def push_receiver(coder, sch, i, S_i, s_prev, logit):
    """Push S_i under p_R(s_i | s_{i-1}) with component log-odds `logit` (sec. 6.7), bits-back over c."""
    s_i = S_i * sch.grid[i]
    c = pop_bits(coder, _posterior(logit, s_i, s_prev))
    mean, std = _component_params(sch, i, s_prev, c)
    push_gaussian(coder, S_i, mean, std, int(sch.push_range[i]))
    push_bits(coder, c, prob_of_one(logit))


def pop_receiver(coder, sch, i, s_prev, logit):
    c = pop_bits(coder, prob_of_one(logit))
    mean, std = _component_params(sch, i, s_prev, c)
    S_i = pop_gaussian(coder, mean, std, int(sch.push_range[i]))
    push_bits(coder, c, _posterior(logit, S_i * sch.grid[i], s_prev))
    return S_i


# ---- output families at coding time: each codes a chunk's symbols and steps as push/pop pairs ----

class Chain:
    """Families whose variables are coded a group of coordinates at a time, each coordinate's
    component log-odds conditional on the groups before it (the chain rule). A family gives
    `groups(D)`, `start(out)`, `logit(state, g)`, `observe(state, g, evidence)`,
    `fix(state, g, bits)` and `step_bits(trace, x, acc)`."""

    def _chain(self, out, groups, values, update):
        """The conditional log-odds of every group, given the groups before it (encoder side)."""
        state, logits = self.start(out), []
        for g in groups:
            logits.append(self.logit(state, g))
            state = update(state, g, values[g])
        return logits

    def push_symbols(self, coder, out, x):
        """Push the bits x (D,) under the output distribution `out`; -> their code length in bits."""
        groups = self.groups(len(x))
        logits = self._chain(out, groups, x, self.fix)
        for g, logit in reversed(list(zip(groups, logits))):
            push_bits(coder, x[g], prob_of_one(logit))
        return sum(nll_bits(logit, x[g]) for g, logit in zip(groups, logits))

    def pop_symbols(self, coder, out, D):
        state, x = self.start(out), np.zeros(D, dtype=np.int64)
        for g in self.groups(D):
            x[g] = pop_bits(coder, prob_of_one(self.logit(state, g)))
            state = self.fix(state, g, x[g])
        return x

    def push_step(self, coder, sch, i, S_i, s_prev, out):
        """Push S_i under step i's receiver given s_{i-1}, a group of coordinates at a time;
        -> what `step_bits` needs (the conditional log-odds used, the evidence u = s_i - s_{i-1})."""
        groups = self.groups(len(S_i))
        u = S_i * sch.grid[i] - s_prev
        logits = self._chain(out, groups, u, self.observe)
        for g, logit in reversed(list(zip(groups, logits))):
            push_receiver(coder, sch, i, S_i[g], s_prev[g], logit)
        return logits, groups, u

    def pop_step(self, coder, sch, i, s_prev, out):
        state, S_i = self.start(out), np.zeros(len(s_prev), dtype=np.int64)
        for g in self.groups(len(s_prev)):
            S_i[g] = pop_receiver(coder, sch, i, s_prev[g], self.logit(state, g))
            state = self.observe(state, g, S_i[g] * sch.grid[i] - s_prev[g])
        return S_i


class Bits(Chain):
    """families.Bits: independent bits; the network gives every coordinate's log-odds."""
    name = "bits"

    @staticmethod
    def from_network(log_p):
        """log p_O (..., V, 2) -> quantised log-odds (D,)."""
        return quantise_logit((log_p[..., 1] - log_p[..., 0]).reshape(-1).numpy())

    def groups(self, D):
        return [slice(None)]

    def start(self, out):
        return out

    def logit(self, state, g):
        return state[g]

    def observe(self, state, g, evidence):
        return state

    fix = observe

    def step_bits(self, trace, x, acc):
        """The step's expected code length given its receiver (quadrature over the sender)."""
        logits = trace[0]
        return kl_bits(logits[0], x, acc)


class Bytes(Chain):
    """families.Bytes (formats 3 to 5): one joint 256-way output per byte, coded coordinate
    by coordinate.

    Group d holds coordinate d of every byte. The state is the joint's log-weights (N, 256),
    updated by each coded coordinate: by its evidence u b_d at a receiver step (the
    likelihood ratio of a component, sec. 6.7), or by the bit itself at the output."""
    name = "bytes"
    TABLE = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(bool)   # (256, 8)

    @staticmethod
    def from_network(log_p):
        """log p_O (..., 256) -> quantised log-weights (N, 256)."""
        return quantise_logit(log_p.reshape(-1, 256).numpy())

    def groups(self, D):
        return [slice(d, None, 8) for d in range(8)]

    def start(self, out):
        return out

    HALVES = [np.argsort(column, kind="stable") for column in TABLE.T]

    def logit(self, state, g):
        """log-odds of coordinate g.start: logsumexp of the weights of the bytes whose bit is 1
        over those whose bit is 0 (HALVES[d]: the byte values with bit d 0, then those with 1)."""
        halves = state[:, self.HALVES[g.start]].reshape(len(state), 2, -1)
        top = halves.max(-1)
        log_sums = top + np.log(np.exp(halves - top[:, :, None]).sum(-1))
        return quantise_logit(log_sums[:, 1] - log_sums[:, 0])

    def observe(self, state, g, evidence):
        return state + evidence[:, None] * self.TABLE[:, g.start]

    def fix(self, state, g, bits):
        return np.where(self.TABLE[:, g.start][None, :] == (bits[:, None] == 1), state, -np.inf)

    def step_bits(self, trace, x, acc):
        """The step's code length on this trajectory: log q(u | x) - log p_R(u), coordinate by
        coordinate, -log(w + (1 - w) e^{-u c}) with w the receiver's weight of the true sign c."""
        logits, groups, u = trace
        total = 0.0
        for g, logit in zip(groups, logits):
            c = 2 * x[g] - 1
            total += float(-np.logaddexp(-np.logaddexp(0.0, -c * logit),
                                         -np.logaddexp(0.0, c * logit) - u[g] * c).sum())
        return total / math.log(2)


class JointBytes:
    """families.Bytes (format 6 on): each byte one 256-way symbol, at the output and at every
    receiver step.

    A receiver step is bits-back over the byte b that picks the mixture component (sec. 6.7):
    the encoder pops b from its posterior q(b | s_i, s_{i-1}), pushes s_i's 8 coordinates
    under component b, and pushes b under the weights w; the decoder runs the reverse. The
    posterior's log-weights are log w_b + sum_d u_d b_d with u = s_i - s_{i-1} (the likelihood
    ratio of the components). Exact arithmetic: log-weights are integers in units of
    2^-10 (the network's on its 1/64 grid, each u_d rounded), so that every sum is exact;
    `pmf` turns them into integer weights through a table of exp(-j 2^-10) built by integer
    arithmetic, and constriction's Categorical takes those. No float function whose last
    bit may differ between machines is on the path. Three coder calls per step, where the
    chain rule (`Bytes`) makes 24."""
    name = "bytes"
    GRID = 1024.0                                 # log-weights in units of 1 / GRID
    TABLE = Bytes.TABLE.astype(np.float64)        # (256, 8): the bits of every byte value
    _CATEGORICAL = _model.Categorical(perfect=False)

    from_network = staticmethod(Bytes.from_network)

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def exp_table():
        """round(2^30 exp(-j / GRID)) for j < 20 GRID (beyond, every weight is below constriction's
        one-tick floor), by a 62-bit fixed-point recurrence whose ratio comes from `decimal`
        (correctly rounded): the same integers on every machine."""
        import decimal
        with decimal.localcontext(decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)):
            ratio = int(((decimal.Decimal(-1) / int(JointBytes.GRID)).exp() * 2 ** 62).to_integral_value())
        table, w = [], 1 << 62
        for _ in range(20 * int(JointBytes.GRID)):
            table.append((w + (1 << 31)) >> 32)
            w = (w * ratio + (1 << 61)) >> 62
        return np.array(table, dtype=np.float64)

    def pmf(self, points):
        """Integer log-weights (N, 256) -> rows of integer weights for constriction (the largest 2^30)."""
        table = self.exp_table()
        j = points.max(1, keepdims=True) - points
        return table[np.minimum(j, len(table) - 1, out=j).astype(np.intp)]

    def points(self, out, u=None):
        """The log-weights (N, 256) in units of 1 / GRID: the network's, plus the evidence of u (D,) if given."""
        points = out * self.GRID                              # exact: out is on the 1/64 grid
        if u is not None:
            points += np.round(u * self.GRID).reshape(len(out), 8) @ self.TABLE.T    # integer sums: exact
        return points

    def push_symbols(self, coder, out, x):
        symbols = bits_to_bytes(x).astype(np.int32)
        coder.encode_reverse(symbols, self._CATEGORICAL, self.pmf(self.points(out)))
        log_w = out - _logsumexp_rows(out)
        return float(-log_w[np.arange(len(out)), symbols].sum() / math.log(2))

    def pop_symbols(self, coder, out, D):
        assert D == 8 * len(out)
        return bytes_to_bits(coder.decode(self._CATEGORICAL, self.pmf(self.points(out))).astype(np.uint8))

    def push_step(self, coder, sch, i, S_i, s_prev, out):
        u = S_i * sch.grid[i] - s_prev
        b = coder.decode(self._CATEGORICAL, self.pmf(self.points(out, u)))
        mean, std = _component_params(sch, i, s_prev, bytes_to_bits(b.astype(np.uint8)))
        push_gaussian(coder, S_i, mean, std, int(sch.push_range[i]))
        coder.encode_reverse(b, self._CATEGORICAL, self.pmf(self.points(out)))
        return out, u

    def pop_step(self, coder, sch, i, s_prev, out):
        b = coder.decode(self._CATEGORICAL, self.pmf(self.points(out)))
        mean, std = _component_params(sch, i, s_prev, bytes_to_bits(b.astype(np.uint8)))
        S_i = pop_gaussian(coder, mean, std, int(sch.push_range[i]))
        coder.encode_reverse(b, self._CATEGORICAL, self.pmf(self.points(out, S_i * sch.grid[i] - s_prev)))
        return S_i

    def step_bits(self, trace, x, acc):
        """The step's code length on this trajectory: log q(u | x) - log p_R(u) =
        -log sum_b w_b exp(E_b - E_x), E_b = sum_d u_d b_d."""
        out, u = trace
        evidence = u.reshape(len(out), 8) @ self.TABLE.T
        true = evidence[np.arange(len(out)), bits_to_bytes(x)]
        return float(-(_logsumexp_rows(out + evidence)[:, 0] - _logsumexp_rows(out)[:, 0] - true).sum()
                     / math.log(2))


def _logsumexp_rows(a):
    top = a.max(1, keepdims=True)
    return top + np.log(np.exp(a - top).sum(1, keepdims=True))


FAMILIES = {"bits": Bits, "bytes": Bytes}


def bytes_to_bits(data):
    """uint8 bytes -> their binary variables, most significant bit first (int64)."""
    return np.unpackbits(np.asarray(data, dtype=np.uint8)).astype(np.int64)


def bits_to_bytes(bits):
    return np.packbits(np.asarray(bits, dtype=np.uint8))


# ---- a chunk: the whole n-step transmission ----

@dataclasses.dataclass
class Stats:
    """Code lengths of coded frames, in bits (see codec.compress)."""
    model_bits: float = 0.0    # the model's loss on the bits-back chunks' trajectories
    direct_bits: float = 0.0   # what the directly coded tail chunks cost
    direct_bytes: int = 0      # their length
    coded_bits: float = 0.0    # what the ANS stacks hold
    bfn_bytes: int = 0         # bytes coded bits-back
    other_bytes: int = 0       # payload of frames stored raw or as xz

    def __add__(self, other):
        return Stats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def nll_bits(logit, x):
    """-log2 p(x) under Bernoulli(sigmoid(logit)), summed."""
    return float(np.logaddexp(0.0, -np.where(x == 1, logit, -logit)).sum() / math.log(2))


def kl_bits(logit, x, acc):
    """Expected bits of one step given this step's receiver (bfn.step_kl_binary, summed)."""
    import torch
    from .bfn import step_kl_binary
    log_p = torch.nn.functional.logsigmoid(torch.from_numpy(np.stack([-logit, logit], -1)))
    kl = step_kl_binary(log_p, torch.from_numpy(np.asarray(x, dtype=np.int64)), acc)
    return float(kl.double().sum()) / math.log(2)


def encode_chunk(coder, sch, family, x, predict, key, stats=None):
    """Push the binary variables x (D,) onto the stack. predict(s, t) -> the family's
    quantised output; key: the chunk's number, which seeds the whitening before each step's pops."""
    n = sch.n
    _whiten_step(coder, sch, key, n + 1, len(x))
    S = pop_top(coder, sch, x)
    bits = family.push_symbols(coder, predict(S * sch.grid[n], 1.0), x)
    for i in range(n, 0, -1):
        _whiten_step(coder, sch, key, i, len(x))
        S_prev = pop_bridge(coder, sch, i, S) if i > 1 else np.zeros_like(S)
        s_prev = S_prev * sch.grid[i - 1] if i > 1 else np.zeros(len(S))
        trace = family.push_step(coder, sch, i, S, s_prev, predict(s_prev, sch.t(i - 1)))
        if stats is not None:
            bits += family.step_bits(trace, x, sch.alpha[i])
        S = S_prev
    if stats is not None:
        stats.model_bits += bits


def decode_chunk(coder, sch, family, D, predict, key):
    """Pop D binary variables: the exact reverse of encode_chunk."""
    n = sch.n
    S_prev, s_prev = None, np.zeros(D)
    for i in range(1, n + 1):
        S = family.pop_step(coder, sch, i, s_prev, predict(s_prev, sch.t(i - 1)))
        if i > 1:
            push_bridge(coder, sch, i, S_prev, S)
        _whiten_step(coder, sch, key, i, D)
        S_prev, s_prev = S, S * sch.grid[i]
    x = family.pop_symbols(coder, predict(s_prev, 1.0), D)
    push_top(coder, sch, S_prev, x)
    _whiten_step(coder, sch, key, n + 1, D)
    return x


def encode_direct(coder, family, x, predict, stats=None):
    """Push x (D,) under the network's t = 0 prediction from context alone: no bits-back."""
    bits = family.push_symbols(coder, predict(np.zeros(len(x)), 0.0), x)
    if stats is not None:
        stats.direct_bits += bits
        stats.direct_bytes += len(x) // 8


def decode_direct(coder, family, D, predict):
    return family.pop_symbols(coder, predict(np.zeros(D), 0.0), D)
