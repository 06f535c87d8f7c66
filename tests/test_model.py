"""Ernie4_5ForCausalLM: parity with transformers, packed rows, every attention path, fused linear,
fused/sparse heads, recompute, dropout, bf16 autocast, generate, config round trip."""
import json

import pytest
import torch
import transformers

from ernie_core.errors import UserError
from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM
from ernie_core.models.io import hf_views, load_hf_tensors

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=128, intermediate_size=96)
ATTENTION_PATHS = {
    "flashmask": {},
    "dense_bool": dict(use_sparse_flash_attn=False),
    "dense_block_causal": dict(use_attn_mask_start_row_indices=False),
    "eager": dict(use_flash_attention=False),
}


def tiny_config(**overrides) -> Ernie4_5Config:
    return Ernie4_5Config(**{**TINY, **overrides})


def hf_model(tie=True, seed=0, std=0.2):
    """transformers' Ernie4_5ForCausalLM with weights bigger than its init, so mistakes show."""
    torch.manual_seed(seed)
    model = transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(**TINY, tie_word_embeddings=tie))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def ours_from(hf, **runtime) -> Ernie4_5ForCausalLM:
    model = Ernie4_5ForCausalLM(tiny_config(tie_word_embeddings=hf.config.tie_word_embeddings), **runtime)
    load_hf_tensors(model, hf.state_dict().items(), "hf")
    return model


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close(a, b, atol, what=""):
    diff = (a.float() - b.float()).abs()
    assert diff.max() <= atol, f"{what}: max diff {diff.max():.3g}, mean {diff.mean():.3g}, first bad at " \
                               f"{tuple(torch.nonzero(diff > atol)[0].tolist())}"


def packed_batch(lengths_per_row, S, vocab=128, seed=1):
    """Rows of packed samples, right-padded: input_ids, restarted position_ids, FlashMask LTS indices
    (a sample in [off, off+n) gets start_row off+n; a pad column j gets j), labels (-100 on pads)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths_per_row)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    pos = torch.zeros(B, S, dtype=torch.long)
    idx = torch.arange(S, dtype=torch.int32).repeat(B, 1)
    for b, lengths in enumerate(lengths_per_row):
        off = 0
        for n in lengths:
            pos[b, off:off + n] = torch.arange(n)
            idx[b, off:off + n] = off + n
            off += n
        labels[b, off:] = -100
    return dict(input_ids=ids, position_ids=pos, attn_mask_startend_row_indices=idx.view(B, 1, S, 1), labels=labels)


def grads_hf_named(model) -> dict:
    return {k: g.clone() for k, g in hf_views(model, grads=True).items()}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, grads_hf_named(model)


# ---- parity with transformers -------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_logits_and_loss_match_transformers(tie):
    hf = hf_model(tie=tie)
    ours = ours_from(hf).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    pos = torch.randint(0, 60, (2, 24), generator=g)  # arbitrary ids: RoPE must use them as given
    assert_close(ours(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits, 1e-4, "logits")
    # Our labels are aligned to positions; transformers shifts internally: ours[:, p] == hf[:, p+1].
    labels = torch.randint(0, 128, (2, 24), generator=g)
    labels[0, :5] = -100
    labels[:, -1] = -100
    hf_labels = torch.full_like(labels, -100)
    hf_labels[:, 1:] = labels[:, :-1]
    assert_close(ours(ids, labels=labels).loss, hf(ids, labels=hf_labels).loss, 1e-5, "loss")


def test_fresh_init_std_and_tying():
    torch.manual_seed(0)
    model = Ernie4_5ForCausalLM(tiny_config(hidden_size=256, head_dim=64))
    std = model.model.layers["0"].mlp.up_proj.weight.std().item()
    assert abs(std - (0.3333 / 256) ** 0.5) < 0.003
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = Ernie4_5ForCausalLM(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert all(p.abs().sum() == 0 for n, p in Ernie4_5ForCausalLM(tiny_config(use_bias=True)).named_parameters()
               if n.endswith("bias"))


# ---- attention paths and packing ----------------------------------------------------------------
@pytest.mark.parametrize("path", ATTENTION_PATHS)
def test_packed_row_equals_samples_run_alone(path):
    hf = hf_model()
    model = ours_from(hf, **ATTENTION_PATHS[path]).eval()
    batch = packed_batch([[7, 9]], S=20)  # two samples and 4 pads
    packed = model(batch["input_ids"], batch["position_ids"], batch["attn_mask_startend_row_indices"]).logits
    for off, n in ((0, 7), (7, 9)):
        alone = model(batch["input_ids"][:, off:off + n]).logits
        assert_close(packed[:, off:off + n], alone, 1e-5, f"{path} sample at {off}")
    assert packed[:, 16:].isfinite().all()


def test_all_attention_paths_give_the_same_values_and_grads():
    hf = hf_model()
    batch = packed_batch([[5, 11, 3], [19], [4, 4]], S=19)
    ref_out, ref_grads = loss_and_grads(ours_from(hf, **ATTENTION_PATHS["eager"]).train(), batch)
    for name, runtime in ATTENTION_PATHS.items():
        out, grads = loss_and_grads(ours_from(hf, **runtime).train(), batch)
        assert_close(out.logits, ref_out.logits, 2e-5, f"{name} logits")  # pads included: 0-output rows
        for k in ref_grads:
            assert_close(grads[k], ref_grads[k], 2e-5, f"{name} grad {k}")


@pytest.mark.parametrize("path", ATTENTION_PATHS)
def test_attention_paths_agree_on_per_head_and_two_index_masks(path):
    hf = hf_model()
    batch = packed_batch([[6, 6]], S=12)
    idx = batch["attn_mask_startend_row_indices"]
    per_head = idx.repeat(1, 2, 1, 1)  # [B, Hkv, S, 1]
    per_head[:, 1, :6] = 3  # kv head 1: rows >= 3 of the first sample cannot see its columns
    lte = torch.full_like(idx, 12)  # LTS, LTE: masked lower rows in [LTS, LTE)
    for indices in (per_head, torch.cat([idx, lte], dim=-1)):
        ref = ours_from(hf, **ATTENTION_PATHS["eager"]).eval()
        model = ours_from(hf, **ATTENTION_PATHS[path]).eval()
        args = (batch["input_ids"], batch["position_ids"], indices)
        assert_close(model(*args).logits, ref(*args).logits, 2e-5, f"{path} {tuple(indices.shape)}")


def test_no_indices_is_plain_causal_on_every_path():
    hf = hf_model()
    ids = torch.randint(0, 128, (2, 16))
    expected = hf(ids).logits
    for name, runtime in ATTENTION_PATHS.items():
        assert_close(ours_from(hf, **runtime).eval()(ids).logits, expected, 1e-4, name)


# ---- fused linear, heads, recompute --------------------------------------------------------------
def test_fuse_linear_gives_the_same_values_and_grads():
    hf = hf_model(tie=False)
    batch = packed_batch([[9, 7], [16]], S=16)
    plain_out, plain_grads = loss_and_grads(ours_from(hf).train(), batch)
    fused = ours_from(hf, fuse_linear=True, fuse_rope=True).train()
    assert {n.split(".")[-2] for n, _ in fused.named_parameters()} >= {"qkv_proj", "up_gate_proj"}
    fused_out, fused_grads = loss_and_grads(fused, batch)
    assert_close(fused_out.logits, plain_out.logits, 1e-5, "logits")
    assert fused_grads.keys() == plain_grads.keys()
    for k in plain_grads:
        assert_close(fused_grads[k], plain_grads[k], 1e-5, f"grad {k}")


@pytest.mark.parametrize("head", [dict(use_fused_head_and_loss_fn=True), dict(use_sparse_head_and_loss_fn=True),
                                  dict(use_fused_head_and_loss_fn=True, use_sparse_head_and_loss_fn=True)])
@pytest.mark.parametrize("tie", [True, False])
def test_fused_and_sparse_heads_match_the_plain_loss(head, tie):
    hf = hf_model(tie=tie)
    batch = packed_batch([[9, 7], [12]], S=16)
    batch["labels"][0, :4] = -100  # a prompt
    plain_out, plain_grads = loss_and_grads(ours_from(hf).train(), batch)
    out, grads = loss_and_grads(ours_from(hf, **head).train(), batch)
    assert out.logits is None
    assert_close(out.loss, plain_out.loss, 1e-5, "loss")
    assert out.num_label_tokens == plain_out.num_label_tokens == (batch["labels"] != -100).sum()
    for k in plain_grads:
        assert_close(grads[k], plain_grads[k], 1e-5, f"grad {k}")


def test_loss_without_labelled_tokens_is_zero_not_nan():
    model = Ernie4_5ForCausalLM(tiny_config(), use_sparse_head_and_loss_fn=True)
    ids = torch.randint(0, 128, (1, 8))
    out = model(ids, labels=torch.full_like(ids, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_recompute_granularities_give_the_same_grads(reentrant):
    hf = hf_model()
    batch = packed_batch([[9, 7]], S=16)
    _, expected = loss_and_grads(ours_from(hf).train(), batch)
    for granularity in ("full", "full_attn", "core_attn"):
        model = ours_from(hf, recompute=True, recompute_granularity=granularity,
                          recompute_use_reentrant=reentrant).train()
        _, grads = loss_and_grads(model, batch)
        for k in expected:
            assert_close(grads[k], expected[k], 1e-6, f"{granularity} grad {k}")


def test_recompute_with_frozen_embedding_still_trains_the_layers():
    # LoRA freezes the embedding: the reentrant checkpoint must still produce layer gradients.
    model = Ernie4_5ForCausalLM(tiny_config(), recompute=True, recompute_use_reentrant=True).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    ids = torch.randint(0, 128, (1, 8))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers["0"].self_attn.q_proj.weight.grad is not None


def test_bad_recompute_granularity_is_a_user_error():
    with pytest.raises(UserError, match="recompute_granularity"):
        Ernie4_5ForCausalLM(tiny_config(), recompute=True, recompute_granularity="selective")


# ---- dropout -------------------------------------------------------------------------------------
def test_set_dropout_scales_per_layer_and_zero_is_deterministic():
    model = Ernie4_5ForCausalLM(tiny_config(num_hidden_layers=4)).train()
    model.set_dropout(0.4, 0.2)
    assert [l.hidden_dropout_p for l in model.model.layers.values()] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [l.self_attn.dropout_p for l in model.model.layers.values()] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    ids = torch.randint(0, 128, (2, 12))
    assert max_diff(model(ids).logits, model(ids).logits) > 0  # dropout is on in train mode
    model.eval()
    assert max_diff(model(ids).logits, model(ids).logits) == 0
    model.train()
    model.set_dropout(0.0, 0.0)
    assert max_diff(model(ids).logits, model(ids).logits) == 0


@pytest.mark.parametrize("path", ["flashmask", "dense_bool", "eager"])
def test_dropout_under_recompute_replays_the_same_masks(path):
    hf = hf_model()
    batch = packed_batch([[9, 7]], S=16)
    results = []
    for recompute in (False, True):
        model = ours_from(hf, recompute=recompute, **ATTENTION_PATHS[path]).train()
        model.set_dropout(0.3, 0.3)
        torch.manual_seed(7)
        results.append(loss_and_grads(model, batch))
    (out_a, grads_a), (out_b, grads_b) = results
    assert_close(out_a.loss, out_b.loss, 1e-6, "loss")
    for k in grads_a:
        assert_close(grads_a[k], grads_b[k], 1e-5, f"grad {k}")


# ---- precision, generate -------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", [{}, dict(use_fused_head_and_loss_fn=True, fuse_linear=True),
                                     dict(use_sparse_flash_attn=False, use_sparse_head_and_loss_fn=True)])
def test_bf16_autocast_forward_backward_runs(runtime):
    hf = hf_model(std=0.05)
    batch = packed_batch([[9, 7]], S=16)
    model = ours_from(hf, **runtime).train()
    fp32_loss = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.loss.isfinite()
    assert abs(out.loss.item() - fp32_loss.item()) < 0.05
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_bf16_parameters_run():
    model = Ernie4_5ForCausalLM(tiny_config()).to(torch.bfloat16)
    batch = packed_batch([[9, 7]], S=16)
    assert model(**batch).loss.isfinite()


def test_generate_is_greedy_and_stops_at_eos():
    model = Ernie4_5ForCausalLM(tiny_config()).train()
    prompt = torch.randint(0, 128, (1, 5))
    tokens = model.generate(prompt, max_new_tokens=6, eos_token_id=-1)
    assert len(tokens) == 6 and all(isinstance(t, int) for t in tokens)
    with torch.no_grad():
        assert tokens[0] == int(model.eval()(prompt).logits[0, -1].argmax())
    assert model.generate(prompt, max_new_tokens=6, eos_token_id=tokens[0]) == []
    assert model.generate(prompt, max_new_tokens=6, eos_token_id=[-5, tokens[0]]) == []


# ---- config --------------------------------------------------------------------------------------
def test_config_reads_both_rope_forms_and_keeps_extra_keys(tmp_path):
    paddle_era = {**TINY, "rope_theta": 10000, "torch_dtype": "bfloat16", "use_flash_attention": True,
                  "compression_ratio": 1.0, "model_type": "ernie4_5"}
    (tmp_path / "config.json").write_text(json.dumps(paddle_era))
    cfg = Ernie4_5Config.from_pretrained(tmp_path)
    assert cfg.rope_theta == 10000.0 and cfg.dtype == "bfloat16" and cfg.head_dim == 16
    cfg.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_theta"] == 10000.0
    assert written["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert written["use_flash_attention"] is True and written["compression_ratio"] == 1.0
    assert Ernie4_5Config.from_pretrained(tmp_path / "out") == cfg
    v5 = {**TINY, "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"}}
    assert Ernie4_5Config.from_dict(v5).rope_theta == 1234.0
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert hf_cfg.rope_parameters["rope_theta"] == 10000.0 and hf_cfg.head_dim == 16


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Ernie4_5Config.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        Ernie4_5Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        Ernie4_5Config.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="MoE"):
        Ernie4_5ForCausalLM(Ernie4_5Config.from_dict({**TINY, "model_type": "ernie4_5_moe"}))
