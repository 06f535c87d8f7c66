"""Preference losses of DPO and its relatives (ernie_reference §7.1-§7.3) as plain tensor functions.

Inputs are per-pair summed token log-probs (fp32), shape [N]. Everything here is elementwise over
pairs except `kto_pair`, whose KL terms are means over the N pairs given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "dpop", "kto_pair", "sppo_hard", "nca_pair", "or", "orpo")
# These compare per-token means π/L instead of sums (§7.1).
MEAN_LOGP_TYPES = ("ipo", "simpo", "or", "orpo")
# A log-prob mean of exactly 0 (probability 1) makes log(1 - e^π) -inf; one fp32 ulp below 0 keeps
# the odds ratio and its gradient finite.
_MAX_MEAN_LOGP = -1e-6


def _mean(logps: torch.Tensor, lengths) -> torch.Tensor:
    if lengths is None:
        return logps
    return logps / torch.as_tensor(lengths, dtype=logps.dtype, device=logps.device).clamp(min=1)


def _sigmoid_form(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ls)·logσ(z) - ls·logσ(-z): the conservative DPO loss (ls = assumed flip rate)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 (expm1) and finite at x = 0."""
    return torch.log(-torch.expm1(x.clamp(max=_MAX_MEAN_LOGP)))


def length_normalize(chosen: torch.Tensor, rejected: torch.Tensor, chosen_lengths, rejected_lengths):
    """normalize_logps (§7.1): with L̄ = (L_c + L_r)/2, π_c·L̄/L_c and π_r·L̄/L_r, so a longer answer
    is not favoured or penalised just for having more tokens."""
    lc = torch.as_tensor(chosen_lengths, dtype=chosen.dtype, device=chosen.device).clamp(min=1)
    lr = torch.as_tensor(rejected_lengths, dtype=rejected.dtype, device=rejected.device).clamp(min=1)
    mean_len = (lc + lr) / 2
    return chosen * mean_len / lc, rejected * mean_len / lr


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                    loss_type: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                    offset_alpha: float = 0.0, score_delta=None, chosen_lengths=None, rejected_lengths=None,
                    dpop_lambda: float = 50.0) -> torch.Tensor:
    """Per-pair preference losses [N] (ernie_reference §7.2).

    policy_*/ref_* [N]: summed log-probs of the chosen / rejected answers (ref may be 0 or None for
    reference-free runs). For ipo, simpo and or/orpo, `chosen_lengths` / `rejected_lengths` [N] turn
    the sums into per-token means (pass None if the inputs already are means); the other types use the
    inputs as given (apply `length_normalize` first for normalize_logps). `score_delta` [N] > 0 is the
    data's score gap for the sigmoid offset (§7.3). kto_pair returns (l_c + l_r)/2 per pair, whose
    mean equals the mean of ERNIEKit's concatenated 2N losses.
    """
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else torch.as_tensor(ref_chosen_logps, dtype=pc.dtype)
    rr = torch.zeros_like(pr) if ref_rejected_logps is None else torch.as_tensor(ref_rejected_logps, dtype=pr.dtype)
    if loss_type in MEAN_LOGP_TYPES:
        pc, pr = _mean(pc, chosen_lengths), _mean(pr, rejected_lengths)
        rc, rr = _mean(rc, chosen_lengths), _mean(rr, rejected_lengths)
    delta = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        if offset_alpha > 0:
            if score_delta is None:
                raise ValueError("offset_alpha > 0 needs score_delta (the data's score gap per pair)")
            gap = torch.as_tensor(score_delta, dtype=delta.dtype, device=delta.device)
            # A bigger score gap demands a bigger margin (§7.3); delta 1 (sort [1, 0]) adds nothing.
            delta = delta - (offset_alpha / beta) * torch.log(gap + 1e-6)
        return _sigmoid_form(beta * delta, label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * delta)
    if loss_type == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "simpo":  # reference-free by definition: the reference terms are ignored
        return _sigmoid_form(beta * ((pc - pr) - simpo_gamma / beta), label_smoothing)
    if loss_type == "dpop":  # the penalty sits outside the sigmoid (§7.2)
        return -F.logsigmoid(beta * delta) + dpop_lambda * torch.relu(rc - pc)
    if loss_type == "kto_pair":
        kl_c = (pc - rc).mean().clamp(min=0)
        kl_r = (pr - rr).mean().clamp(min=0)
        chosen = 1.0 - torch.sigmoid(beta * ((pc - rc) - kl_r))
        rejected = 1.0 - torch.sigmoid(beta * (kl_c - (pr - rr)))
        return (chosen + rejected) / 2
    if loss_type == "sppo_hard":
        a, b = pc - rc, pr - rr
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        r_c, r_r = beta * (pc - rc), beta * (pr - rr)
        return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    if loss_type in ("or", "orpo"):
        log_odds = (pc - pr) - (_log1m_exp(pc) - _log1m_exp(pr))
        return -F.logsigmoid(log_odds)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """The implicit rewards β(π − ref) averaged over pairs, and how often chosen beats rejected."""
    with torch.no_grad():
        rc = beta * (policy_chosen - (0.0 if ref_chosen is None else ref_chosen))
        rr = beta * (policy_rejected - (0.0 if ref_rejected is None else ref_rejected))
        return {"rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
                "rewards/accuracy": float((rc > rr).float().mean()), "rewards/margin": float((rc - rr).mean())}
