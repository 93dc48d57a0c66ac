"""Output families: what a network's output means (sec. 6.6) and the loss terms it pays.

The Bayesian flow carries every byte as V binary variables (K = 2 logits each, z of shape
(..., V, 2)); the network adds a `delta` to what the flow's own evidence says (residual
form). A family turns (z, delta) into the output distribution p_O and knows the loss
terms of that distribution:

- `Bits`:  V independent outputs, p_O(x_d) = softmax(z_d + delta_d); delta has V entries
           (the logit of class 1; class 0 is the reference).
- `Bytes`: one joint K^V-way output per byte, log p_O(b) = sum_d z_{d, b_d} + delta_b
           (normalised); delta has K^V = 256 entries. One step's receiver of a byte is then
           a 256-component mixture over its V coordinates (sec. 6.7), which the coder codes
           as one 256-way symbol (coder.JointBytes; formats 3 to 5 coordinate by coordinate).

`cfg.residual = False` drops the evidence term (p_O = softmax(delta)).
"""
import torch

from . import bfn


def symbol_bits(V, K=2, device=None):
    """(K^V, V) table: the V variables of every symbol, most significant first."""
    symbols = torch.arange(K ** V, device=device)
    powers = K ** torch.arange(V - 1, -1, -1, device=device)
    return (symbols[:, None] // powers) % K


def to_vars(symbols, cfg):
    """Symbols in [0, K^V) -> (..., V) variables, most significant first (bytes -> bits)."""
    powers = cfg.K ** torch.arange(cfg.V - 1, -1, -1, device=symbols.device)
    return (symbols.long().unsqueeze(-1) // powers) % cfg.K


def to_symbols(variables, cfg):
    powers = cfg.K ** torch.arange(cfg.V - 1, -1, -1, device=variables.device)
    return (variables.long() * powers).sum(-1)


class Evidence:
    """What a family knows of the joint symbols: the flow's evidence for each of the 2^V."""

    _table = None

    def table(self, like):
        """symbol_bits(V), on like's device and dtype (kept for the next call)."""
        if self._table is None or self._table.device != like.device or self._table.dtype != like.dtype:
            self._table = symbol_bits(self.V).to(like.device, like.dtype)
        return self._table

    def evidence(self, z):
        """sum_d z_{d, b_d} for every byte value b, up to a constant: (..., V, 2) -> (..., 256)."""
        u = (z[..., 1] - z[..., 0]).float() if z.dtype != torch.float64 else z[..., 1] - z[..., 0]
        with torch.autocast(u.device.type, enabled=False):     # large sums: never in bf16
            return u @ self.table(u).T


class Bits(Evidence):
    """V independent binary outputs per byte (the original family)."""
    name = "bits"

    def __init__(self, V=8, residual=True):
        self.V, self.residual = V, residual
        self.n_out = V

    def log_probs(self, z, delta, evidence=None):
        """z (..., V, 2), delta (..., V) -> log p_O (..., V, 2) (each bit's own z is its evidence)."""
        delta = torch.stack([torch.zeros_like(delta), delta], -1)
        return (z + delta if self.residual else delta).log_softmax(-1)

    def bit_probs(self, log_p):
        return log_p.float().exp()

    def byte_log_probs(self, log_p):
        """log p_O of all 256 byte values: (..., V, 2) -> (..., 256)."""
        table = symbol_bits(self.V, device=log_p.device).to(log_p.dtype)
        return log_p[..., 0] @ (1 - table).T + log_p[..., 1] @ table.T

    def step_kl(self, log_p, v, acc, generator=None, samples=1):
        """Per-byte KL of one step (sec. 6.9), exact quadrature per bit: (...,)."""
        return bfn.step_kl(log_p, v, acc, generator).sum(-1)

    def draw(self, log_p, generator=None):
        """Variables (..., V) drawn from p_O."""
        return bfn.draw_categorical(log_p, generator)

    def reconstruction(self, log_p, v):
        """-log p_O(x) per byte: (...,)."""
        return bfn.reconstruction_loss(log_p, v).sum(-1)


class Bytes(Evidence):
    """One joint K^V-way output per byte, in residual form over the bits' evidence."""
    name = "bytes"

    def __init__(self, V=8, residual=True):
        self.V, self.residual = V, residual
        self.n_out = 2 ** V

    def log_probs(self, z, delta, evidence=None):
        """z (..., V, 2), delta (..., 256) -> log p_O (..., 256); evidence: `evidence(z)` where the caller has it."""
        delta = delta.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
        if not self.residual:
            return delta.log_softmax(-1)
        return ((self.evidence(z) if evidence is None else evidence) + delta).log_softmax(-1)

    def byte_log_probs(self, log_p):
        return log_p

    def bit_probs(self, log_p):
        """The marginals of every bit: (..., 256) -> (..., V, 2)."""
        p = log_p.float().exp()
        with torch.autocast(p.device.type, enabled=False):
            one = (p @ self.table(p)).clamp(0, 1)
        return torch.stack([1 - one, one], -1)

    def step_kl(self, log_p, v, acc, generator=None, samples=1):
        """Monte Carlo KL(p_S || p_R) of a byte's V coordinates (sec. 6.9), averaged over
        `samples` sender samples y ~ p_S: log p_S(y) - log p_R(y) = E(x) - logsumexp_b(log p_O(b)
        + E(b)), with E(b) = sum_d y_{d, b_d} the evidence of y for byte b (components share
        a variance)."""
        v = v.unsqueeze(-2).expand(v.shape[:-1] + (samples, v.shape[-1]))
        e = self.evidence(bfn.sender_sample(v, acc, 2, generator))           # (..., samples, 256)
        kl = bfn.log_ratio(log_p.unsqueeze(-2), to_byte(v), e)
        return kl.mean(-1)

    def draw(self, log_p, generator=None):
        return symbol_bits(self.V, device=log_p.device)[bfn.draw_categorical(log_p.float(), generator)]

    def reconstruction(self, log_p, v):
        return bfn.reconstruction_loss(log_p, to_byte(v))


def to_byte(v):
    """(..., V) binary variables, most significant first -> (...,) symbols."""
    V = v.shape[-1]
    return (v.long() * (2 ** torch.arange(V - 1, -1, -1, device=v.device))).sum(-1)


FAMILIES = {"bits": Bits, "bytes": Bytes}


def family_of(cfg):
    if cfg.K != 2:
        raise ValueError("output families code binary variables (K = 2)")
    return FAMILIES[cfg.output](cfg.V, cfg.residual)


def continuous_loss(family, log_p, v, t, beta1):
    """L^inf per sequence on the bits' marginals (sec. 6.10); see bfn.continuous_loss."""
    return bfn.continuous_loss(family.bit_probs(log_p), v, t, beta1)


def step_term(family, net, v, i, n, beta1, generator=None, samples=1):
    """One term of the n-step loss per byte (sec. 6.9), for every chunk of v (B, C, L, V):
    i (a number or (B, C) integers) in 1..n is step i's KL at theta ~ p_F(. | x; t_{i-1}),
    i = n + 1 the reconstruction -log p_O(x | theta_n, t = 1). net(z, t) -> log p_O."""
    i = torch.as_tensor(i, device=v.device).expand(v.shape[:2])
    t = ((i - 1) / n).clamp(max=1.0)
    log_p = net(bfn.flow_sample(v, t, beta1, 2, generator), t)
    kl = family.step_kl(log_p, v, bfn.alpha(i.float(), n, beta1), generator, samples)
    return torch.where((i > n)[..., None], family.reconstruction(log_p, v), kl)


def n_step_loss(family, net, v, n, beta1, generator=None, samples=1):
    """(L^n, L^r) in nats, summed over all bytes of v (B, C, L, V): every step's KL on a
    fresh sample of the flow, and the reconstruction (sec. 6.9)."""
    kl = sum(step_term(family, net, v, i, n, beta1, generator, samples).sum().item() for i in range(1, n + 1))
    return kl, step_term(family, net, v, n + 1, n, beta1, generator, samples).sum().item()

