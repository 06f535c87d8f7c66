"""DPOObjective pieces (docs/behaviour.md#dpo-log-probs, #dpo-reference-model): reference handling (frozen copy, adapters off,
reference-free, periodic refresh), loss composition (normalize_logps, sft_loss_ratio) and metrics."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ernie_core.data import load_tokenizer
from ernie_core.data.dpo import build_dpo_batch, tokenize_pair
from ernie_core.data.testing import make_word_tokenizer
from ernie_core.models import Ernie4_5ForCausalLM
from ernie_core.peft import adapters_disabled, apply_lora
from ernie_core.train.dpo import DPOObjective, length_normalize, pair_logps, preference_loss
from test_dpo_data import WORDS, example
from test_lora import randomize_adapters
from test_model import tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(make_word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS))
    pairs = [tokenize_pair(tok, example(src=(w,), chosen=("x y z",), rejected=("p",)), 64, 54) for w in "abc"]
    batch = build_dpo_batch([pairs[:2], pairs[2:]], 32, tok.pad_id)
    return tok, batch


def model_for(tok, seed=0):
    torch.manual_seed(seed)
    return Ernie4_5ForCausalLM(tiny_config(vocab_size=tok.vocab_size))


def test_full_reference_is_a_frozen_copy_refreshed_every_n_steps(setup):
    tok, batch = setup
    model = model_for(tok)
    obj = DPOObjective(ref_model_update_steps=2)
    loss, m = obj.loss(model, batch)
    ref = obj.ref_model
    assert ref is not None and ref is not model and not any(p.requires_grad for p in ref.parameters())
    assert not ref.training and m["rewards/margin"] == 0.0  # policy == reference before any update
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    trainer = SimpleNamespace(model=model, global_step=1)
    obj.on_step_end(trainer)
    assert not torch.equal(ref.lm_head.weight, model.lm_head.weight)  # step 1: not due
    trainer.global_step = 2
    obj.on_step_end(trainer)
    assert all(torch.equal(r, p) for r, p in zip(ref.parameters(), model.parameters()))


def test_reference_dtype_is_the_compute_dtype(setup):
    tok, batch = setup
    obj = DPOObjective(ref_dtype=torch.bfloat16)
    obj.loss(model_for(tok), batch)
    assert {p.dtype for p in obj.ref_model.parameters()} == {torch.bfloat16}


def test_lora_reference_is_the_base_without_a_copy(setup):
    tok, batch = setup
    model = model_for(tok)
    apply_lora(model, rank=4)
    randomize_adapters(model, std=0.05)
    obj = DPOObjective()
    ref_c, ref_r = obj.reference_logps(model.train(), batch)
    assert obj.ref_model is None and model.training
    with adapters_disabled(model), torch.no_grad():
        base_c, base_r = pair_logps(model.eval(), batch)
    torch.testing.assert_close(ref_c, base_c)
    torch.testing.assert_close(ref_r, base_r)


@pytest.mark.parametrize("loss_type", ["simpo", "or", "orpo"])
def test_reference_free_types_build_no_reference(setup, loss_type):
    tok, batch = setup
    obj = DPOObjective(loss_type=loss_type)
    loss, _ = obj.loss(model_for(tok), batch)
    assert obj.ref_model is None and torch.isfinite(loss)


def test_loss_composition_normalize_and_sft_term(setup):
    tok, batch = setup
    model = model_for(tok)
    ref = model_for(tok, seed=1)
    obj = DPOObjective(beta=0.2, sft_loss_ratio=0.5, pref_loss_ratio=0.7)
    obj.ref_model = ref.eval()
    loss, metrics = obj.loss(model, batch)
    with torch.no_grad():
        pc, pr = pair_logps(model, batch)
        rc, rr = pair_logps(ref, batch)
    lc = torch.bincount(batch["chosen_pair"]).float()
    lr = torch.bincount(batch["rejected_pair"]).float()
    npc, npr = length_normalize(pc, pr, lc, lr)
    nrc, nrr = length_normalize(rc, rr, lc, lr)
    pref = preference_loss(npc, npr, nrc, nrr, loss_type="sigmoid", beta=0.2).mean()
    want = 0.7 * pref + 0.5 * (-pc.sum() / lc.sum())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx((0.2 * (npc - nrc)).mean().item(), rel=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(pc.mean().item(), rel=1e-5)
