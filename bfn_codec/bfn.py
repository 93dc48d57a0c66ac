"""Bayesian flow for discrete data (Graves et al. 2023, arXiv 2308.07037, section 6).

Everything lives in logit space: a variable with K classes carries logits z of shape
(..., K) and the input distribution is theta = softmax(z) (sec. 6.1), with z_0 = 0 the
uniform prior. A sender sample y ~ N(alpha (K e_x - 1), alpha K I) (sec. 6.2) updates the
belief by plain addition, z <- z + y, which is the Bayesian update theta' ~ e^y theta
(sec. 6.3). Data are integer tensors x of shape (..., V) with values in [0, K); the
network `net(z, t)` returns log p_O(. | theta, t) of shape (..., V, K) (sec. 6.6).

Losses are returned in nats per sequence (summed over variables); `bits` converts.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def beta(t, beta1):
    """Accuracy schedule beta(t) = beta1 t^2 (sec. 6.8)."""
    return beta1 * (t * t)


def alpha(i, n, beta1):
    """Accuracy of step i of n: alpha_i = beta(i/n) - beta((i-1)/n) = beta1 (2i - 1) / n^2 (sec. 6.8)."""
    return beta1 * (2 * i - 1) / (n * n)


def sender_sample(x, acc, K, generator=None):
    """y ~ p_S(y | x; acc) = N(acc (K e_x - 1), acc K I) (sec. 6.2); acc broadcasts against x."""
    acc = torch.as_tensor(acc, dtype=torch.float32, device=x.device)
    acc = acc.reshape(acc.shape + (1,) * (x.dim() - acc.dim())).unsqueeze(-1)
    mean = acc * (K * F.one_hot(x, K).float() - 1)
    noise = torch.randn(mean.shape, generator=generator, device=x.device)
    return mean + (acc * K).sqrt() * noise


def flow_sample(x, t, beta1, K, generator=None):
    """z ~ p_F(. | x; t): the logits after the Bayesian flow up to time t (sec. 6.4).

    One sender sample of accuracy beta(t) carries the same information as all the
    sequential updates before t, since accuracies add (sec. 6.3).
    """
    return sender_sample(x, beta(t, beta1), K, generator)


def continuous_loss(probs, x, t, beta1):
    """L^inf(x) = K beta1 t ||e_x - e_hat(theta, t)||^2, summed over variables (sec. 6.10).

    probs: e_hat, the output probabilities of every variable, (B, ..., V, K); t: (B, ...)
    times matching the leading dims.
    """
    K = probs.shape[-1]
    err = (F.one_hot(x, K).float() - probs).pow(2).sum(-1)
    t = t.reshape(t.shape + (1,) * (err.dim() - t.dim()))
    return (K * beta1 * t * err).flatten(1).sum(1)


_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(64)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def step_kl_binary(log_p, x, acc):
    """KL(p_S(. | x; acc) || p_R(. | theta; acc)) for K = 2 by Gauss-Hermite quadrature (sec. 6.9).

    Only the informative coordinate u = y_1 - y_0 differs between sender and receiver; with
    u = 2 acc c + 2 sqrt(acc) xi and w the output probability of the true class,
    KL = -E_xi log(w + (1 - w) exp(-2 acc - 2 sqrt(acc) xi)).  Returns (B, ..., V).
    """
    log_p = log_p.double()               # the two terms nearly cancel when w is close to 1
    log_w = log_p.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    log_not_w = log_p.gather(-1, (1 - x).unsqueeze(-1)).squeeze(-1)
    acc = torch.as_tensor(acc, dtype=torch.float64, device=x.device)
    acc = acc.reshape(acc.shape + (1,) * (x.dim() - acc.dim())).unsqueeze(-1)
    xi = torch.as_tensor(_GH_NODES, dtype=torch.float64, device=x.device)
    wts = torch.as_tensor(_GH_WEIGHTS, dtype=torch.float64, device=x.device)
    other = log_not_w.unsqueeze(-1) - 2 * acc - 2 * acc.sqrt() * xi
    kl = -(torch.logaddexp(log_w.unsqueeze(-1), other) * wts).sum(-1)
    return kl.clamp(min=0).float()


def log_ratio(log_p, x, y):
    """log p_S(y | x) - log p_R(y | theta) for a sender sample y (..., K) of class x (sec. 6.9):
    the receiver's components share the sender's variance, so the ratio is
    y_x - logsumexp(log p_O + y)."""
    return y.gather(-1, x.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(log_p.float() + y, -1)


def step_kl_sample(log_p, x, acc, generator=None):
    """One-sample Monte Carlo estimate of the same KL for any K (sec. 6.9)."""
    return log_ratio(log_p, x, sender_sample(x, acc, log_p.shape[-1], generator))


def step_kl(log_p, x, acc, generator=None):
    """Per-variable KL of one step: exact quadrature for K = 2, Monte Carlo otherwise."""
    if log_p.shape[-1] == 2:
        return step_kl_binary(log_p, x, acc)
    return step_kl_sample(log_p, x, acc, generator)


def reconstruction_loss(log_p, x):
    """L^r(x) = -log p_O(x | theta_1; 1) per variable (sec. 6.9): log_p (..., K), x (...)."""
    return -log_p.float().gather(-1, x.unsqueeze(-1)).squeeze(-1)


def bits(nats):
    return nats / LN2


def draw_categorical(log_p, generator=None):
    """One class per variable from independent categoricals: (..., K) -> (...)."""
    K = log_p.shape[-1]
    return torch.multinomial(log_p.exp().reshape(-1, K), 1, generator=generator).reshape(log_p.shape[:-1])


@torch.no_grad()
def sample(net, shape, n, beta1, K, generator=None, draw=draw_categorical):
    """n-step generation (sec. 6.11): draw k ~ p_O, then y ~ p_S(. | k), update, repeat.

    net(z, t) -> log p_O with t a float tensor of shape (B,); shape = (B, ..., V);
    draw(log_p, generator) -> variables of that shape (an output family's `draw`).
    """
    B = shape[0]
    z = torch.zeros(shape + (K,))
    for i in range(1, n + 1):
        t = torch.full((B,), (i - 1) / n)
        k = draw(net(z, t), generator)
        z = z + sender_sample(k, alpha(i, n, beta1), K, generator)
    return draw(net(z, torch.ones(B)), generator)
