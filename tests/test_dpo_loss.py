"""Every DPO loss type against an independent scalar (float64, math module) evaluation of its formula
(docs/behaviour.md#dpo-loss-types, #dpo-score-offset), plus finite gradients at the edges."""
from __future__ import annotations

import math

import pytest
import torch

from ernie_core.train.dpo import LOSS_TYPES, length_normalize, preference_loss, rewards


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def oracle(kind, pc, pr, rc, rr, *, beta, ls=0.0, gamma=0.5, alpha=0.0, gap=1.0, lc=1, lr=1, lam=50.0,
           batch=None):
    """One pair's loss, written from the reference table. `batch` = all pairs (kto_pair KL terms)."""
    if kind in ("ipo", "simpo", "or", "orpo"):
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    d = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        if alpha > 0:
            d -= alpha / beta * math.log(gap + 1e-6)
        return -(1 - ls) * logsig(beta * d) - ls * logsig(-beta * d)
    if kind == "hinge":
        return max(0.0, 1 - beta * d)
    if kind == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if kind == "simpo":
        z = beta * ((pc - pr) - gamma / beta)
        return -(1 - ls) * logsig(z) - ls * logsig(-z)
    if kind == "dpop":
        return -logsig(beta * d) + lam * max(0.0, rc - pc)
    if kind == "kto_pair":
        kl_c = max(0.0, sum(b[0] - b[2] for b in batch) / len(batch))
        kl_r = max(0.0, sum(b[1] - b[3] for b in batch) / len(batch))
        return ((1 - sig(beta * ((pc - rc) - kl_r))) + (1 - sig(beta * (kl_c - (pr - rr))))) / 2
    if kind == "sppo_hard":
        return (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2
    if kind == "nca_pair":
        a, b = beta * (pc - rc), beta * (pr - rr)
        return -logsig(a) - 0.5 * logsig(-a) - 0.5 * logsig(-b)
    if kind in ("or", "orpo"):
        odds = (pc - pr) - (math.log(1 - math.exp(pc)) - math.log(1 - math.exp(pr)))
        return -logsig(odds)
    raise AssertionError(kind)


def pairs(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths_c = torch.randint(1, 30, (n,), generator=g)
    lengths_r = torch.randint(1, 30, (n,), generator=g)
    pc = -torch.rand(n, generator=g, dtype=torch.float64) * lengths_c * 2
    pr = -torch.rand(n, generator=g, dtype=torch.float64) * lengths_r * 2
    rc = -torch.rand(n, generator=g, dtype=torch.float64) * lengths_c * 2
    rr = -torch.rand(n, generator=g, dtype=torch.float64) * lengths_r * 2
    return pc, pr, rc, rr, lengths_c, lengths_r


@pytest.mark.parametrize("kind", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_each_loss_matches_its_formula(kind, beta):
    pc, pr, rc, rr, lc, lr = pairs()
    ls = 0.2 if kind in ("sigmoid", "simpo") else 0.0
    got = preference_loss(pc, pr, rc, rr, loss_type=kind, beta=beta, label_smoothing=ls, simpo_gamma=0.7,
                          chosen_lengths=lc, rejected_lengths=lr, dpop_lambda=3.0)
    batch = list(zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()))
    want = [oracle(kind, *b, beta=beta, ls=ls, gamma=0.7, lc=int(c), lr=int(r), lam=3.0, batch=batch)
            for b, c, r in zip(batch, lc, lr)]
    assert got.shape == (len(want),)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_sigmoid_offset_uses_the_score_gap():
    pc, pr, rc, rr, _, _ = pairs()
    gaps = torch.tensor([0.5, 1.0, 2.0, 3.0, 10.0, 1.0, 0.1], dtype=torch.float64)
    got = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=0.1, offset_alpha=0.3, score_delta=gaps)
    want = [oracle("sigmoid", a, b, c, d, beta=0.1, alpha=0.3, gap=float(g))
            for a, b, c, d, g in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), gaps)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    # gap 1 (the default sort [1, 0]) reduces to plain DPO
    plain = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=0.1)
    assert abs(float(got[1] - plain[1])) < 1e-5


def test_reference_free_means_zero_reference():
    pc, pr, _, _, _, _ = pairs()
    free = preference_loss(pc, pr, None, None, loss_type="sigmoid", beta=0.1)
    zero = preference_loss(pc, pr, torch.zeros_like(pc), torch.zeros_like(pr), loss_type="sigmoid", beta=0.1)
    torch.testing.assert_close(free, zero)


def test_length_normalize_rescales_to_the_mean_length():
    c, r = length_normalize(torch.tensor([-10.0]), torch.tensor([-30.0]), [10], [30])
    assert float(c) == pytest.approx(-20.0) and float(r) == pytest.approx(-20.0)


def test_rewards_metrics():
    m = rewards(torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -2.0]),
                torch.tensor([-2.0, -2.0]), beta=0.5)
    assert m["rewards/chosen"] == pytest.approx(0.5 * (1 - 3) / 2)
    assert m["rewards/rejected"] == pytest.approx(0.5 * (-1 + 0) / 2)
    assert m["rewards/accuracy"] == pytest.approx(0.5)
    assert m["rewards/margin"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"])


EDGES = {
    "equal": (torch.full((4,), -3.0), torch.full((4,), -3.0), torch.full((4,), -3.0), torch.full((4,), -3.0)),
    "large_margin": (torch.tensor([-1e-3, -0.5, -1.0, -2.0]), torch.tensor([-900.0, -5e3, -1e4, -3e3]),
                     torch.tensor([-800.0, -1.0, -1.0, -2.0]), torch.tensor([-1.0, -1.0, -1.0, -2.0])),
    "reversed_margin": (torch.tensor([-900.0, -5e3, -1e4, -3e3]), torch.tensor([-1e-3, -0.5, -1.0, -2.0]),
                        torch.tensor([-1.0, -1.0, -1.0, -2.0]), torch.tensor([-800.0, -1.0, -1.0, -2.0])),
    "probability_one": (torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4)),
}


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_gradients_are_finite_at_the_edges(kind, edge):
    pc, pr, rc, rr = (t.clone() for t in EDGES[edge])
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss = preference_loss(pc, pr, rc, rr, loss_type=kind, beta=0.1, label_smoothing=0.1 if kind == "sigmoid" else 0,
                           chosen_lengths=torch.full((4,), 5), rejected_lengths=torch.full((4,), 7),
                           offset_alpha=0.5 if kind == "sigmoid" else 0.0, score_delta=torch.full((4,), 2.0))
    assert torch.isfinite(loss).all(), loss
    gc, gr = torch.autograd.grad(loss.sum(), (pc, pr))
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all(), (gc, gr)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        preference_loss(torch.zeros(1), torch.zeros(1), None, None, loss_type="nope", beta=0.1)
