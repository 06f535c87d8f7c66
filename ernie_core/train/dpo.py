"""DPO (ernie_reference §7): the preference losses as plain tensor functions, the packed-pair
log-probs, and DPOObjective (data + loss for the trainer).

Loss inputs are per-pair summed token log-probs (fp32), shape [N]. Everything is elementwise over
pairs except `kto_pair`, whose KL terms are means over the N pairs given.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..parallel.pipeline import PipelinedModel
from ..parallel.reference import ShardSnapshot, fsdp_modules, local_pieces_from_checkpoint, run_as_forward
from ..parallel.dtensor import local_tensor as _local
from ..parallel.vocab_parallel import vocab_parallel_token_logps, vocab_sharded

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


# ---- log-probs --------------------------------------------------------------------------------------
def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row of hidden [N, H] under the LM head [V, H], softmax in fp32."""
    logits = F.linear(hidden, weight).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """[N] fp32 token log-probs. With chunk > 0 the head runs `chunk` rows at a time and, under
    autograd, recomputes each chunk's logits in backward, so [N, V] logits never exist at once.
    A vocab-sharded head (tensor parallelism) runs vocab-parallel (parallel/vocab_parallel.py)."""
    fn = vocab_parallel_token_logps if vocab_sharded(weight) else _token_logps
    n = hidden.shape[0]
    if chunk <= 0 or n <= chunk:
        return fn(hidden, weight, targets)
    parts = []
    for lo in range(0, n, chunk):
        h, t = hidden[lo:lo + chunk], targets[lo:lo + chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(fn, h, weight, t, use_reentrant=False))
        else:
            parts.append(fn(h, weight, t))
    return torch.cat(parts)


def scored_pair_sums(model, hidden: torch.Tensor, batch: dict, chunk: int = 0) -> torch.Tensor:
    """[chosen sums | rejected sums], 2 x num_pairs, from the final hidden state [B,S,H] of one packed
    micro-batch: only the scored positions (a compact list, the prompt's last position twice) go
    through the LM head (ERNIE's sparse head for preference pairs)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    k = int(batch["num_pairs"])
    rows = flat.index_select(0, torch.cat([batch["chosen_index"], batch["rejected_index"]]))
    targets = torch.cat([batch["chosen_target"], batch["rejected_target"]])
    logp = token_logps(rows, model.lm_head.weight, targets, chunk)
    owner = torch.cat([batch["chosen_pair"], batch["rejected_pair"] + k])
    return torch.zeros(2 * k, dtype=torch.float32, device=logp.device).index_add(0, owner, logp)


def pair_stage_forward(model, x, batch: dict, chunk: int = 0) -> torch.Tensor:
    """The model (or a pipeline stage of it) on one packed micro-batch: the decoder runs once per row;
    with the LM head, the result is scored_pair_sums, without it the hidden state for the next stage."""
    hidden = model.model(x, batch["position_ids"], batch["attn_mask_startend_row_indices"])
    if model.lm_head is None:
        return hidden
    return scored_pair_sums(model, hidden, batch, chunk)


def pair_logps(model, batch: dict, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs [num_pairs] of one packed micro-batch. Works on the plain
    model and on the data-parallel / sharded / tensor-parallel one: it runs as the model's forward
    (parallel/reference.py run_as_forward), with a vocab-parallel head under tensor parallelism."""
    sums = run_as_forward(model, lambda b, c: pair_stage_forward(model, b["input_ids"], b, c), batch, chunk)
    k = int(batch["num_pairs"])  # split outside: a wrapper's backward hook sits on the whole output
    return sums[:k], sums[k:]


def _lengths(batch: dict, side: str) -> torch.Tensor:
    k = int(batch["num_pairs"])
    owner = batch[f"{side}_pair"]
    return torch.zeros(k, dtype=torch.float32, device=owner.device).index_add(
        0, owner, torch.ones_like(owner, dtype=torch.float32))


# ---- objective ------------------------------------------------------------------------------------
class DPOObjective:
    """Data and loss of DPO (ernie_reference §4, §7): packed share-prompt pairs, one of the §7.2
    losses against a reference that is a frozen copy (full DPO), the same model with adapters off
    (LoRA DPO), or nothing (reference_free)."""

    name = "DPO"

    def __init__(self, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, offset_alpha=0.0,
                 dpop_lambda=50.0, normalize_logps=True, pref_loss_ratio=1.0, sft_loss_ratio=0.0,
                 reference_free=False, ref_model_update_steps=-1, ref_path=None, ref_dtype=None, head_chunk=0):
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.simpo_gamma, self.offset_alpha, self.dpop_lambda = simpo_gamma, offset_alpha, dpop_lambda
        self.normalize_logps, self.pref_loss_ratio, self.sft_loss_ratio = normalize_logps, pref_loss_ratio, sft_loss_ratio
        # simpo and or/orpo never look at a reference (§7.2): skip its forward.
        self.reference_free = reference_free or loss_type in ("simpo", "or", "orpo")
        self.ref_model_update_steps = ref_model_update_steps
        self.ref_path, self.ref_dtype, self.head_chunk = ref_path, ref_dtype, head_chunk
        self.ref_model = None  # full DPO: built at the first loss call
        self._ref_shards = None  # full DPO on an FSDP-wrapped policy: a ShardSnapshot of the reference
        self._pp_ref = None  # under pipeline parallelism: the reference's pair sums of the step's micro-batches

    @classmethod
    def from_config(cls, cfg) -> "DPOObjective":
        d = cfg.dpo
        p = cfg.precision
        ref_dtype = torch.bfloat16 if p.bf16 else (torch.float16 if p.fp16 else None)
        return cls(loss_type=d.loss_type, beta=d.beta, label_smoothing=d.label_smoothing, simpo_gamma=d.simpo_gamma,
                       offset_alpha=d.offset_alpha, dpop_lambda=d.dpop_lambda, normalize_logps=d.normalize_logps,
                       pref_loss_ratio=d.pref_loss_ratio, sft_loss_ratio=d.sft_loss_ratio,
                       reference_free=d.reference_free, ref_model_update_steps=d.ref_model_update_steps,
                       ref_path=cfg.basic.model_name_or_path if cfg.basic.continue_training else None,
                       ref_dtype=ref_dtype, head_chunk=cfg.memory.loss_subbatch_seqlen)

    # -- data
    def validate(self, cfg, tok) -> None:
        from ..data.dpo import validate_preference_datasets

        validate_preference_datasets(cfg)

    def build_stream(self, cfg, tok, *, dp_rank: int, dp_world: int):
        from ..data.dpo import build_dpo_stream

        return build_dpo_stream(cfg, tok, dp_rank=dp_rank, dp_world=dp_world)

    def build_eval_batches(self, cfg, tok) -> list[dict]:
        from ..data.dpo import build_dpo_eval_batches

        return build_dpo_eval_batches(cfg, tok)

    def estimate_max_steps(self, cfg, tok) -> int:
        from ..data.dpo import estimate_dpo_max_steps

        return estimate_dpo_max_steps(cfg, tok)

    # -- reference
    def _reference(self, model):
        """The frozen reference of full DPO, in the compute dtype, no grads, never in an optimizer.
        Its weights come from model_name_or_path (so a resumed run gets the same reference), or,
        for a freshly initialised policy, from the policy before its first update. Under pipeline
        parallelism it is a copy of this rank's stages, laid out like them."""
        if self.ref_model is None:
            ref = copy.deepcopy(model)
            if self.ref_path is not None and isinstance(ref, PipelinedModel):
                with torch.no_grad():
                    for p, t in zip(ref.parameters(), local_pieces_from_checkpoint(ref, self.ref_path)):
                        _local(p).copy_(t)
            elif self.ref_path is not None:
                from ..models.io import iter_hf_tensors, load_hf_tensors

                load_hf_tensors(ref, iter_hf_tensors(Path(self.ref_path), ref.config), self.ref_path)
            for p in ref.parameters():
                p.requires_grad_(False)
                p.grad = None
            if self.ref_dtype is not None:
                ref.to(self.ref_dtype)
            self.ref_model = ref.eval()
        return self.ref_model

    def _reference_shards(self, model) -> ShardSnapshot:
        """Full DPO on an FSDP-wrapped policy (dp = `replicate`, sharding stage2/3), which cannot be
        deep-copied: the reference is this rank's local shards of every parameter, sharded exactly
        like the policy (stage3 holds 1/N of it per rank), swapped into the policy for its pass."""
        if self._ref_shards is None:
            if self.ref_path is not None:
                self._ref_shards = ShardSnapshot.from_checkpoint(model, self.ref_path, self.ref_dtype)
            else:
                self._ref_shards = ShardSnapshot.of(model, self.ref_dtype)
        return self._ref_shards

    @contextlib.contextmanager
    def reference_model(self, model):
        """The model to run for the reference log-probs, in eval mode: the policy with adapters off
        (LoRA DPO, no second copy), the policy with the reference's shards swapped in (FSDP), or the
        frozen copy."""
        from ..peft import adapters_disabled, lora_modules

        if not lora_modules(model) and not fsdp_modules(model):
            yield self._reference(model)
            return
        was_training = model.training
        model.eval()
        try:
            if lora_modules(model):
                with adapters_disabled(model):
                    yield model
            else:
                with self._reference_shards(model).swapped_in(model):
                    yield model
        finally:
            model.train(was_training)

    @torch.no_grad()
    def reference_logps(self, model, batch: dict):
        if self.reference_free:
            return None, None
        with self.reference_model(model) as ref:
            return pair_logps(ref, batch, self.head_chunk)

    # -- loss
    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """pref_loss_ratio · mean per-pair loss + sft_loss_ratio · chosen-token NLL (§7.1-§7.2);
        metrics: rewards/{chosen,rejected,accuracy,margin}, logps/{chosen,rejected}."""
        ref_c, ref_r = self.reference_logps(model, batch)
        pol_c, pol_r = pair_logps(model, batch, self.head_chunk)
        return self.pair_loss(pol_c, pol_r, ref_c, ref_r, batch)

    def pair_loss(self, pol_c, pol_r, ref_c, ref_r, batch: dict) -> tuple[torch.Tensor, dict]:
        """The loss and metrics of one micro-batch from its summed log-probs [num_pairs] (ref None when
        reference-free)."""
        len_c, len_r = _lengths(batch, "chosen"), _lengths(batch, "rejected")
        raw_c, raw_r = pol_c, pol_r
        if self.normalize_logps and self.loss_type not in MEAN_LOGP_TYPES:
            pol_c, pol_r = length_normalize(pol_c, pol_r, len_c, len_r)
            if ref_c is not None:
                ref_c, ref_r = length_normalize(ref_c, ref_r, len_c, len_r)
        per_pair = preference_loss(pol_c, pol_r, ref_c, ref_r, loss_type=self.loss_type, beta=self.beta,
                                   label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
                                   offset_alpha=self.offset_alpha, score_delta=batch["score_delta"],
                                   chosen_lengths=len_c, rejected_lengths=len_r, dpop_lambda=self.dpop_lambda)
        loss = self.pref_loss_ratio * per_pair.mean()
        if self.sft_loss_ratio > 0:
            loss = loss + self.sft_loss_ratio * (-raw_c.sum() / len_c.sum().clamp(min=1))
        if self.loss_type in MEAN_LOGP_TYPES:  # rewards on the values the loss compared
            pol_c, pol_r = pol_c / len_c.clamp(min=1), pol_r / len_r.clamp(min=1)
            if ref_c is not None:
                ref_c, ref_r = ref_c / len_c.clamp(min=1), ref_r / len_r.clamp(min=1)
        metrics = rewards(pol_c, pol_r, ref_c, ref_r, self.beta)
        metrics["logps/chosen"] = float(raw_c.detach().mean())
        metrics["logps/rejected"] = float(raw_r.detach().mean())
        return loss, metrics

    # -- pipeline parallelism (parallel/pipeline.py PipelineRunner)
    def stage_forward(self, model, x, batch: dict):
        """One pipeline stage on a packed micro-batch: the hidden state, or on the last stage the
        scored rows' summed log-probs [2 x num_pairs]."""
        return pair_stage_forward(model, x, batch, self.head_chunk)

    def before_pipeline_step(self, runner, micro_batches: list[dict]) -> None:
        """The reference's pair sums of every micro-batch: one no-grad pass through the pipeline's
        stages (adapters off under LoRA, the reference's shards under FSDP, else the frozen copy
        of this rank's stages), kept on the last stage for stage_loss."""
        self._pp_ref = None
        if self.reference_free:
            return
        with self.reference_model(runner.model) as ref:
            self._pp_ref = runner.forward_only(ref, self, micro_batches)

    def stage_loss(self, output, batch: dict, index: int) -> tuple[torch.Tensor, dict]:
        """The DPO loss of micro-batch `index` on the last stage, from its policy pair sums (output)."""
        k = int(batch["num_pairs"])
        ref_c = ref_r = None
        if self._pp_ref is not None:
            ref = self._pp_ref[index]
            ref_c, ref_r = ref[:k], ref[k:]
        return self.pair_loss(output[:k], output[k:], ref_c, ref_r, batch)

    def on_step_end(self, trainer) -> None:
        """ref_model_update_steps = N > 0: the reference becomes a copy of the policy every N steps."""
        n = self.ref_model_update_steps
        if n <= 0 or trainer.global_step % n:
            return
        with torch.no_grad():
            if self.ref_model is not None:
                for r, p in zip(self.ref_model.parameters(), trainer.model.parameters()):
                    r.copy_(p)
            if self._ref_shards is not None:
                self._ref_shards.refresh(trainer.model)
