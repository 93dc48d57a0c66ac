"""The Bayesian flow math (bfn.py) against its definitions."""
import math

import pytest
import torch

from bfn_codec import bfn, families


@pytest.mark.parametrize("n", [1, 3, 10, 257])
def test_alphas_sum_to_beta1(n):
    total = sum(bfn.alpha(i, n, 2.5) for i in range(1, n + 1))
    assert total == pytest.approx(2.5, rel=1e-12)
    assert bfn.beta(1.0, 2.5) == pytest.approx(2.5)


@pytest.mark.parametrize("K", [2, 5])
def test_flow_matches_sequential_updates(K):
    """z after i of n sender updates has the law of one flow sample at t = i/n (means, variances)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, K, (100000,), generator=g)
    n, i, beta1 = 10, 7, 3.0
    z = torch.zeros(100000, K)
    for step in range(1, i + 1):
        z = z + bfn.sender_sample(x, bfn.alpha(step, n, beta1), K, g)
    flow = bfn.flow_sample(x, torch.full((100000,), i / n), beta1, K, g)
    for a, b in [(z, flow)]:
        for cls in range(K):
            sel = x == cls
            assert torch.allclose(a[sel].mean(0), b[sel].mean(0), atol=0.1)
            assert torch.allclose(a[sel].var(0), b[sel].var(0), rtol=0.05)
    # and both have the analytic moments: mean beta (K e_x - 1), variance beta K
    b_t = bfn.beta(i / n, beta1)
    sel = x == 0
    assert flow[sel][:, 0].mean().item() == pytest.approx(b_t * (K - 1), abs=0.05)
    assert flow[sel][:, 0].var().item() == pytest.approx(b_t * K, rel=0.05)


@pytest.mark.parametrize("acc", [0.01, 0.3, 2.0, 9.0])
def test_quadrature_kl_matches_monte_carlo(acc):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (4000,), generator=g)
    log_p = torch.log_softmax(2 * torch.randn(4000, 2, generator=g), -1)
    exact = bfn.step_kl_binary(log_p, x, acc)
    mc = torch.stack([bfn.step_kl_sample(log_p, x, acc, g) for _ in range(400)]).mean(0)
    assert (exact >= 0).all()
    assert exact.mean().item() == pytest.approx(mc.mean().item(), rel=0.02)
    # per variable too, for a few variables with many samples
    few = torch.stack([bfn.step_kl_sample(log_p[:6], x[:6], acc, g) for _ in range(20000)])
    assert torch.allclose(exact[:6], few.mean(0), rtol=0.03, atol=5 * few.std(0).max().item() / 141)


def prior_net(prior_logit):
    """A stand-in network that knows the marginal of x: p_O = softmax(z + prior)."""
    return lambda z, t: torch.log_softmax(z + prior_logit, -1)


def n_step_loss(net, x, n, beta1, g, reps=4):
    total = 0.0
    for _ in range(reps):
        for i in range(1, n + 1):
            t = torch.full((len(x),), (i - 1) / n)
            z = bfn.flow_sample(x, t, beta1, 2, g)
            total += bfn.step_kl(net(z, t), x, bfn.alpha(i, n, beta1)).sum().item()
    return total / reps / len(x)


def test_n_step_loss_approaches_continuous_loss():
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(20000, generator=g) < 0.8).long()
    prior = torch.tensor([0.0, 0.5])
    net = lambda z, t: torch.log_softmax(2.0 * z + prior, -1)       # a miscalibrated network
    beta1 = 3.0
    cont = 0.0
    for _ in range(20):
        t = (torch.arange(len(x)) + torch.rand(len(x), generator=g)) / len(x)
        z = bfn.flow_sample(x, t, beta1, 2, g)
        cont += bfn.continuous_loss(net(z, t)[:, None, :].exp(), x[:, None], t, beta1).mean().item() / 20
    losses = {n: n_step_loss(net, x, n, beta1, g, reps=max(1, 64 // n)) for n in (1, 2, 4, 64)}
    gap = {n: abs(loss - cont) for n, loss in losses.items()}
    assert gap[64] < 0.01 * cont
    assert gap[1] > gap[2] > 2 * gap[64]
    assert gap[1] > 5 * gap[64]


def test_losses_finite_and_non_negative():
    g = torch.Generator().manual_seed(3)
    for K in (2, 27):
        x = torch.randint(0, K, (8, 3, 5), generator=g)
        log_p = torch.log_softmax(3 * torch.randn(8, 3, 5, K, generator=g), -1)
        t = torch.rand(8, 3, generator=g)
        for loss in (bfn.continuous_loss(log_p.exp(), x, t, 3.0), bfn.reconstruction_loss(log_p, x).flatten(1).sum(1)):
            assert torch.isfinite(loss).all() and (loss >= 0).all()
        d = bfn.step_kl(log_p, x, bfn.alpha(torch.randint(1, 11, (8, 3), generator=g).float(), 10, 3.0), g)
        assert torch.isfinite(d).all()
        if K == 2:   # exact KL: non-negative per variable
            assert (d >= 0).all()


def test_sampling_shapes_and_prior():
    """With the prior network, n-step samples follow the prior's class frequencies."""
    g = torch.Generator().manual_seed(4)
    net = prior_net(torch.tensor([0.0, math.log(4.0)]))      # p(1) = 0.8
    x = bfn.sample(lambda z, t: net(z, t[:, None]), (4000, 1), 10, 3.0, 2, g)
    assert x.shape == (4000, 1)
    assert x.float().mean().item() == pytest.approx(0.8, abs=0.03)


# ---- output families ----

def independent_bytes(bit_logit):
    """log p_O of 256 bytes whose 8 bits are independent with these log-odds (..., 8)."""
    table = families.symbol_bits(8).float()
    return (table @ torch.nn.functional.logsigmoid(bit_logit).unsqueeze(-1)
            + (1 - table) @ torch.nn.functional.logsigmoid(-bit_logit).unsqueeze(-1)).squeeze(-1)


def test_joint_byte_kl_equals_the_bits_kl_for_independent_bits():
    """A joint byte output that factorises over its bits has the same step KL as the
    independent-bits family (Monte Carlo against quadrature), at several accuracies."""
    g = torch.Generator().manual_seed(5)
    bit_logit = 2 * torch.randn(64, 8, generator=g)
    v = torch.randint(0, 2, (64, 8), generator=g)
    bits_lp = torch.stack([torch.nn.functional.logsigmoid(-bit_logit), torch.nn.functional.logsigmoid(bit_logit)], -1)
    for acc in (0.05, 0.5, 3.0):
        exact = families.Bits().step_kl(bits_lp, v, acc).sum()
        mc = families.Bytes().step_kl(independent_bytes(bit_logit), v, acc, g, samples=4000).sum()
        assert mc.item() == pytest.approx(exact.item(), rel=0.03, abs=0.02)


@pytest.mark.parametrize("n", [1, 4, 10])
def test_exact_posterior_pays_the_prior_cross_entropy_at_any_n(n):
    """p_O = the Bayesian posterior of a fixed 256-way prior (the autoregressive limit):
    the n-step loss plus reconstruction is the prior's cross-entropy, whatever n."""
    g = torch.Generator().manual_seed(6)
    prior = torch.log_softmax(3 * torch.randn(256, generator=g), -1)
    x = torch.multinomial(prior.exp(), 3000, replacement=True, generator=g)
    v = families.to_vars(x, model_cfg()).reshape(3000, 1, 1, 8)
    fam = families.Bytes()
    net = lambda z, t: fam.log_probs(z, prior.expand(z.shape[:-2] + (256,)))
    kl, rec = families.n_step_loss(fam, net, v, n, 3.0, g, samples=16)
    ce = -prior[x].sum().item()
    assert (kl + rec) == pytest.approx(ce, rel=0.02)


def model_cfg():
    from bfn_codec.model import ModelConfig
    return ModelConfig()
