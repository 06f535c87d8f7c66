"""A pipeline stage is the model with the pieces it does not own removed (one process, no schedule).

Chaining the stages of `split_model` by hand -- the first takes token ids, the last the labels --
must give the full model's loss (dense, fused and sparse heads, with recompute and dropout) and,
summed over the stage copies of a tied embedding, its gradients. The full model stays intact.
"""
from __future__ import annotations

import pytest
import torch

from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM
from ernie_core.parallel.pipeline import split_model, stage_bounds

HEADS = {"dense": {}, "fused": {"use_fused_head_and_loss_fn": True},
         "sparse_fused": {"use_fused_head_and_loss_fn": True, "use_sparse_head_and_loss_fn": True},
         "sparse": {"use_sparse_head_and_loss_fn": True}}


def tiny(tied: bool, **runtime) -> Ernie4_5ForCausalLM:
    cfg = Ernie4_5Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=96, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return Ernie4_5ForCausalLM(cfg, **runtime)


def batch(S: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, S), generator=g)
    labels = torch.randint(0, 96, (2, S), generator=g)
    labels[:, :4] = -100
    return ids, torch.arange(S).expand(2, S), labels


def run_stages(full, pp: int, bounds, ids, pos, labels):
    """Forward + backward through every stage in order, as the schedule would; returns (loss, grads by name)."""
    ranks = [split_model(full, r, pp, bounds) for r in range(pp)]
    chunks = {s: m.chunks[m.stage_ids.index(s)] for m in ranks for s in m.stage_ids}
    x = ids
    for s in range(len(bounds) - 1):
        x = chunks[s](x, pos)
        assert x.shape == (*ids.shape, full.config.hidden_size)  # a stage without head: its hidden state
    out = chunks[len(bounds) - 1](x, pos, labels=labels)
    out.loss.backward()
    grads = {}
    for m in ranks:
        for name, p in m.named_parameters():
            if p.grad is not None:
                grads[name] = grads.get(name, 0) + p.grad
    return out.loss.detach(), grads, ranks


@pytest.mark.parametrize("head,tied", [("dense", True), ("dense", False), ("fused", True), ("sparse_fused", False),
                                       ("sparse", True)])
def test_stages_chain_to_the_full_model(head, tied, monkeypatch):
    import ernie_core.models.ernie4_5 as ernie

    calls = []
    real = ernie.fused_head_ce
    monkeypatch.setattr(ernie, "fused_head_ce", lambda h, *a: calls.append(h.shape[0]) or real(h, *a))
    ids, pos, labels = batch()
    runtime = dict(HEADS[head], recompute=True, recompute_use_reentrant=False)
    want_model = tiny(tied, **runtime)
    want_model.set_dropout(0.0, 0.0)
    want = want_model(ids, pos, labels=labels)
    want.loss.backward()
    want_grads = {n: p.grad.clone() for n, p in want_model.named_parameters()}

    full = tiny(tied, **runtime)
    bounds = stage_bounds(4, 3, "layer:Ernie4_5_DecoderLayer|EmptyLayer", add_tail_layers=2)  # last: tail only
    calls.clear()
    loss, grads, ranks = run_stages(full, 3, bounds, ids, pos, labels)
    # the last stage runs the configured head: fused over the labelled rows only when sparse
    assert calls == ([] if "fused" not in head else [16 if "sparse" in head else 24])
    torch.testing.assert_close(loss, want.loss.detach(), rtol=1e-6, atol=0)
    if tied:  # the last stage's head is a copy of the embedding: its gradient adds to the embedding's
        grads["model.embed_tokens.weight"] = grads["model.embed_tokens.weight"] + grads.pop("lm_head.weight")
    assert grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # the full model keeps every piece; each stage holds only its own
    assert len(full.model.layers) == 4 and full.lm_head is not None and full.model.embed_tokens is not None
    assert (full.lm_head.weight is full.model.embed_tokens.weight) == tied
    first, last = ranks[0].chunks[0], ranks[2].chunks[0]
    assert first.lm_head is None and first.model.norm is None and list(first.model.layers) == ["0", "1"]
    assert last.model.embed_tokens is None and last.lm_head is not None and list(last.model.layers) == []


def test_pipelined_model_names_dropout_and_mode():
    full = tiny(True)
    names = {n for n, _ in full.named_parameters()}
    parts = [split_model(full, r, 2, [(0, 1), (1, 2), (2, 3), (3, 4)]) for r in range(2)]  # 2 stages per rank
    got = [{n for n, _ in m.named_parameters()} for m in parts]
    assert got[0] | got[1] == names | {"lm_head.weight"} and not (got[0] & got[1])
    assert "model.layers.2.mlp.up_proj.weight" in got[0] and "lm_head.weight" in got[1]
    parts[1].set_dropout(0.4, 0.2)  # layer l of L = 4 uses p * l / L, also on a stage holding layers 1 and 3
    layers = parts[1].model.layers
    assert [layers[k].hidden_dropout_p for k in ("1", "3")] == pytest.approx([0.1, 0.3])
    assert [layers[k].self_attn.dropout_p for k in ("1", "3")] == pytest.approx([0.05, 0.15])
    parts[1].eval()
    assert not any(c.training or c.model.training for c in parts[1].chunks)
    parts[1].train()
    assert all(c.training and c.model.training for c in parts[1].chunks)
