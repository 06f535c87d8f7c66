"""LoRA (ernie_reference §6): shapes, init, scaling rules, rsLoRA / LoRA+, merge math, adapters off,
and parity with Hugging Face PEFT on transformers' Ernie 4.5 in both directions."""
from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn

from ernie_core.peft import (LoRALinear, adapters_disabled, apply_lora, load_adapter, lora_modules,
                             lora_plus_multiplier, lora_scaling, merge_lora, save_model_adapter)
from ernie_core.peft.merge import merge_stream
from ernie_core.peft.peft_format import read_adapter
from ernie_core.models.io import to_hf_state_dict
from ernie_core.train.optim import build_optimizer, param_groups
from test_model import assert_close, hf_model, ours_from

IDS = torch.arange(48).remainder(128).view(2, 24)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_adapters(model, seed=0, std=0.3):
    """B starts at zero (the adapted model equals the base); give every adapter weights that show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("rank,alpha,rslora,expected", [
    (32, -1, False, 2.0), (8, -1, False, 2.0), (32, 128, True, 128 / math.sqrt(32)), (16, -1, True, 4 / 4.0),
    (8, 32, False, 4.0),
])
def test_scaling_rules(rank, alpha, rslora, expected):
    assert lora_scaling(rank, alpha, rslora) == pytest.approx(expected)


def test_targets_shapes_init_and_freezing():
    torch.manual_seed(0)
    model = ours_from(hf_model())
    base = logits(model)
    spec = apply_lora(model, rank=4, alpha=-1)
    mods = lora_modules(model)
    assert sorted({n.rpartition(".")[2] for n in mods}) == sorted(HF_TARGETS)
    assert len(mods) == 7 * 2 and sorted(spec.modules) == sorted(mods)
    attn = model.model.layers["0"].self_attn
    assert attn.q_proj.lora_A.shape == (4, 64) and attn.q_proj.lora_B.shape == (64, 4)
    assert attn.k_proj.lora_B.shape == (32, 4) and attn.o_proj.lora_A.shape == (4, 64)
    # one A for q|k|v and one for gate|up (ERNIEKit's fused adapters), separate B rows
    assert attn.k_proj.lora_A is attn.q_proj.lora_A and attn.v_proj.lora_A is attn.q_proj.lora_A
    mlp = model.model.layers["0"].mlp
    assert mlp.up_proj.lora_A is mlp.gate_proj.lora_A and mlp.down_proj.lora_A is not mlp.gate_proj.lora_A
    bound = 1 / math.sqrt(64)  # Kaiming-uniform a=sqrt(5) on fan_in 64
    assert attn.q_proj.lora_A.abs().max() <= bound and attn.q_proj.lora_A.std() > bound / 3
    assert all(float(m.lora_B.detach().abs().max()) == 0 for m in mods.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    assert_close(logits(model), base, 0.0, "B = 0 leaves the model unchanged")


def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(1)
    lin = nn.Linear(10, 6, bias=True)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    m = LoRALinear.wrap(lin, rank=3, scaling=2.5)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(5, 10)
    want = x @ w.T + b + 2.5 * (x @ m.lora_A.detach().T) @ m.lora_B.detach().T
    assert_close(m(x).detach(), want, 1e-5, "lora linear")
    assert_close(m.weight.detach() + m.delta_weight(), w + 2.5 * m.lora_B.detach() @ m.lora_A.detach(), 1e-6, "delta")


def test_rslora_changes_exactly_the_scale():
    def adapted(rslora):
        torch.manual_seed(0)
        model = ours_from(hf_model())
        apply_lora(model, rank=16, alpha=8, rslora=rslora)
        randomize_adapters(model)
        return model

    plain, rs = adapted(False), adapted(True)
    for (n, a), (_, b) in zip(lora_modules(plain).items(), lora_modules(rs).items()):
        assert a.scaling == pytest.approx(8 / 16) and b.scaling == pytest.approx(8 / 4), n
        torch.testing.assert_close(a.lora_A, b.lora_A)
        torch.testing.assert_close(a.lora_B, b.lora_B)
    lin_p = plain.model.layers["0"].self_attn.q_proj
    lin_r = rs.model.layers["0"].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        up_p = lin_p(x) - nn.functional.linear(x, lin_p.weight)
        up_r = lin_r(x) - nn.functional.linear(x, lin_r.weight)
    assert_close(up_r, up_p * math.sqrt(16), 1e-4, "rsLoRA update = sqrt(r) x plain update here")


def test_lora_plus_scales_only_the_b_learning_rate():
    torch.manual_seed(0)
    model = ours_from(hf_model())
    apply_lora(model, rank=4)
    groups = param_groups(model, weight_decay=0.1, lr_multiplier=lora_plus_multiplier(12.0),
                          num_layers=2, tied_embedding=True)
    opt = build_optimizer(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    lr_of = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lr_of and all(n.endswith(("lora_A", "lora_B")) for n in lr_of)
    for n, lr in lr_of.items():
        assert lr == pytest.approx(12e-3 if n.endswith("lora_B") else 1e-3), n
    # one Adam step moves each B by ~lr*12 and each A by ~lr (first step: |update| = lr per element)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            step = (before[n] * (1 - lr_of[n] * 0.1) - p.detach()).abs().max().item()
            assert step == pytest.approx(lr_of[n], rel=1e-3), n


def test_adapters_disabled_gives_the_base_model():
    torch.manual_seed(0)
    model = ours_from(hf_model())
    base = logits(model)
    apply_lora(model, rank=4)
    randomize_adapters(model)
    assert (logits(model) - base).abs().max() > 1e-3
    with adapters_disabled(model):
        assert_close(logits(model), base, 0.0, "adapters off")
    assert (logits(model) - base).abs().max() > 1e-3


def test_base_dtype_keeps_adapters_fp32():
    torch.manual_seed(0)
    model = ours_from(hf_model())
    apply_lora(model, rank=4, base_dtype=torch.bfloat16)
    q = model.model.layers["0"].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    assert q.lora_A.dtype == torch.float32 and q.lora_B.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IDS).logits
    assert torch.isfinite(out).all()
    assert torch.isfinite(model(IDS).logits).all()  # no autocast: bf16 activations meet fp32 adapters


@pytest.mark.parametrize("fuse_linear", [False, True])
def test_merge_equals_base_plus_scaled_ba(fuse_linear):
    torch.manual_seed(0)
    model = ours_from(hf_model(), fuse_linear=fuse_linear)
    base_state = {k: v.clone() for k, v in to_hf_state_dict(model).items()}
    apply_lora(model, rank=4, alpha=12)
    randomize_adapters(model)
    adapted = logits(model)
    deltas = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scaling) for n, m in lora_modules(model).items()}
    merge_lora(model)
    assert not lora_modules(model)
    merged = to_hf_state_dict(model)
    for name, (a, b, s) in deltas.items():
        w = model.get_submodule(name).weight
        parent, _, leaf = name.rpartition(".")
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "up_gate_proj": ["gate_proj", "up_proj"]}.get(leaf, [leaf])
        base_w = torch.cat([base_state[f"{parent}.{p}.weight"] for p in parts])  # fused rows = split parts stacked
        assert_close(w, base_w + s * b @ a, 1e-6, f"merged {name}")
    assert_close(logits(model), adapted, 2e-5, "merged model = base + adapter")
    assert set(merged) == set(base_state)


def test_peft_parity_ours_to_peft(tmp_path):
    """Adapters we save run in PEFT on transformers' model with the same logits."""
    hf = hf_model()
    ours = ours_from(hf)
    apply_lora(ours, rank=4, alpha=-1, rslora=True)
    randomize_adapters(ours)
    (tmp_path / "adapter").mkdir()
    save_model_adapter(ours, tmp_path / "adapter", base_model_name_or_path="base")
    cfg, tensors = read_adapter(tmp_path / "adapter")
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4.0 and cfg["use_rslora"] is True
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in tensors
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    assert_close(logits(wrapped), logits(ours), 1e-4, "PEFT on transformers vs ernie_core")


def test_peft_parity_peft_to_ours(tmp_path):
    """A PEFT-trained adapter (its own A per projection) loads into our model with the same logits."""
    hf = hf_model()
    ours = ours_from(hf)
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    apply_lora(ours, rank=4, alpha=8)
    load_adapter(ours, tmp_path / "adapter")
    attn = ours.model.layers["0"].self_attn
    assert attn.k_proj.lora_A is not attn.q_proj.lora_A  # per-projection A's could not stay shared
    assert_close(logits(ours), logits(pm), 1e-4, "ernie_core vs PEFT")
    # a round trip through our writer keeps the function
    (tmp_path / "again").mkdir()
    save_model_adapter(ours, tmp_path / "again")
    fresh = ours_from(hf_model())
    apply_lora(fresh, rank=4, alpha=8)
    load_adapter(fresh, tmp_path / "again")
    assert_close(logits(fresh), logits(pm), 1e-4, "reloaded")


def test_load_adapter_rejects_a_different_rank(tmp_path):
    from ernie_core.errors import UserError

    ours = ours_from(hf_model())
    apply_lora(ours, rank=4)
    (tmp_path / "a").mkdir()
    save_model_adapter(ours, tmp_path / "a")
    other = ours_from(hf_model())
    apply_lora(other, rank=8)
    with pytest.raises(UserError, match="lora_rank"):
        load_adapter(other, tmp_path / "a")


def test_merge_stream_matches_merge_lora(tmp_path):
    hf = hf_model()
    ours = ours_from(hf)
    base = {k: v.clone() for k, v in to_hf_state_dict(ours).items()}
    apply_lora(ours, rank=4, alpha=6)
    randomize_adapters(ours)
    (tmp_path / "a").mkdir()
    save_model_adapter(ours, tmp_path / "a")
    cfg, tensors = read_adapter(tmp_path / "a")
    streamed = dict(merge_stream(base.items(), cfg, tensors))
    merge_lora(ours)
    for k, v in to_hf_state_dict(ours).items():
        assert_close(streamed[k], v, 1e-6, k)


def test_shared_a_input_cache_keeps_values_and_gradients():
    """q|k|v reuse one x Aᵀ; values and gradients equal those of separate products."""
    from ernie_core.peft.lora import _ACache

    torch.manual_seed(0)
    model = ours_from(hf_model())
    apply_lora(model, rank=4)
    randomize_adapters(model)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(IDS).logits
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    cached_out, cached = grads()
    for m in lora_modules(model).values():
        m._a_cache = _ACache()  # every module computes its own product
    plain_out, plain = grads()
    assert_close(cached_out, plain_out, 1e-6, "logits")
    for n in plain:
        assert_close(cached[n], plain[n], 1e-6, n)
    x = torch.randn(3, 64)
    q = model.model.layers["0"].self_attn.q_proj
    before = q(x).detach()
    with torch.no_grad():
        q.lora_A.add_(1.0)  # an updated A must not reuse the old product
    assert (q(x).detach() - before).abs().max() > 1e-3


# ---- the fused LoRA linear (one autograd node, low-rank term added in place) ---------------------
class _Block(nn.Module):
    """q/k/v share one A (ERNIEKit's fused q|k|v adapter); o_proj has its own and reads q."""

    def __init__(self, bias: bool, dim=12):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, 10, bias=bias), nn.Linear(dim, 6, bias=bias), \
            nn.Linear(dim, 6, bias=bias)
        self.o_proj = nn.Linear(10, dim, bias=bias)

    def forward(self, x):
        q = self.q_proj(x)
        return q, self.k_proj(x), self.v_proj(x), self.o_proj(q)


def _block_and_reference(bias=True, train_base=False, base_dtype=None, seed=0):
    """An adapted _Block with random B's, and a plain-PyTorch copy of its weights (fp32 leaves)."""
    torch.manual_seed(seed)
    block = _Block(bias)
    apply_lora(block, rank=3, alpha=5, base_dtype=base_dtype)
    randomize_adapters(block, seed=seed, std=0.5)
    if train_base:
        for n, p in block.named_parameters():
            if not n.endswith(("lora_A", "lora_B")):
                p.requires_grad_(True)
    ref = {n: p.detach().float().clone().requires_grad_(True) for n, p in block.named_parameters()}
    return block, ref


def _reference_forward(ref, x, scaling):
    """The textbook formulation: F.linear(x, W, b) + s · (x Aᵀ) Bᵀ, each module on its own."""
    def lin(name, inp, a_name):
        base = nn.functional.linear(inp, ref[f"{name}.weight"], ref.get(f"{name}.bias"))
        return base + scaling * nn.functional.linear(nn.functional.linear(inp, ref[a_name]), ref[f"{name}.lora_B"])

    q = lin("q_proj", x, "q_proj.lora_A")
    return q, lin("k_proj", x, "q_proj.lora_A"), lin("v_proj", x, "q_proj.lora_A"), lin("o_proj", q, "o_proj.lora_A")


def _outputs_and_grads(fn, x, params, seed=3):
    """Run fn(x), contract every output with fixed random weights, return outputs and d/d(x, params)."""
    outs = fn(x)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    names = list(params)
    grads = torch.autograd.grad(loss, [x] + [params[n] for n in names])
    return [o.detach() for o in outs], dict(zip(["x"] + names, grads))


def _rel_close(got, want, rtol, what):
    scale = want.detach().float().abs().max().clamp_min(1e-6)
    err = (got.detach().float() - want.detach().float()).abs().max()
    assert err <= rtol * scale, f"{what}: max diff {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


@pytest.mark.parametrize("bias,train_base", [(True, False), (False, False), (True, True)])
def test_fused_lora_linear_matches_reference_fp32(bias, train_base):
    """Values and gradients (x, the A shared by q/k/v, each B, and W/b when the base trains) equal the
    plain formulation in fp32."""
    block, ref = _block_and_reference(bias=bias, train_base=train_base)
    scaling = block.q_proj.scaling
    x = torch.randn(2, 7, 12, requires_grad=True)
    trained = {n: p for n, p in block.named_parameters() if p.requires_grad}
    assert ("q_proj.weight" in trained) == train_base and "k_proj.lora_A" not in trained  # one shared A
    outs, grads = _outputs_and_grads(block, x, trained)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_outs, ref_grads = _outputs_and_grads(lambda t: _reference_forward(ref, t, scaling), x_ref,
                                             {n: ref[n] for n in trained})
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == torch.float32
        assert_close(o, r, 2e-5, f"output {i}")
    assert set(grads) == set(ref_grads)
    for n in grads:
        assert grads[n].dtype == torch.float32 and grads[n].shape == ref_grads[n].shape, n
        assert_close(grads[n], ref_grads[n], 5e-5, f"grad {n}")
    assert float(grads["q_proj.lora_A"].abs().max()) > 0 and float(grads["k_proj.lora_B"].abs().max()) > 0


@pytest.mark.parametrize("base_dtype", [None, torch.bfloat16])
def test_fused_lora_linear_under_bf16_autocast(base_dtype):
    """Under CPU bf16 autocast the fused node computes in bf16 (fp32 base or bf16 base) and returns
    each gradient in its input's own dtype (fp32 adapters, fp32 x); values stay near fp32."""
    block, ref = _block_and_reference(base_dtype=base_dtype)
    scaling = block.q_proj.scaling
    x = torch.randn(2, 7, 12, requires_grad=True)
    trained = {n: p for n, p in block.named_parameters() if p.requires_grad}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs, grads = _outputs_and_grads(block, x, trained)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_outs, ref_grads = _outputs_and_grads(lambda t: _reference_forward(ref, t, scaling), x_ref,
                                             {n: ref[n] for n in trained})
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == torch.bfloat16, f"output {i} is {o.dtype}"
        _rel_close(o, r, 3e-2, f"output {i}")
    for n in grads:
        assert grads[n].dtype == (torch.float32 if n != "x" else x.dtype), n
        _rel_close(grads[n], ref_grads[n], 3e-2, f"grad {n}")


def test_fused_lora_linear_bf16_base_without_autocast():
    """bf16 activations meeting fp32 adapters without autocast: output in the activation dtype,
    adapter gradients in fp32, close to the fp32 formulation."""
    block, ref = _block_and_reference(base_dtype=torch.bfloat16)
    scaling = block.q_proj.scaling
    x = torch.randn(2, 7, 12).bfloat16().requires_grad_(True)
    trained = {n: p for n, p in block.named_parameters() if p.requires_grad}
    outs, grads = _outputs_and_grads(block, x, trained)
    x_ref = x.detach().float().requires_grad_(True)
    ref_outs, ref_grads = _outputs_and_grads(lambda t: _reference_forward(ref, t, scaling), x_ref,
                                             {n: ref[n] for n in trained})
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == torch.bfloat16
        _rel_close(o, r, 3e-2, f"output {i}")
    assert grads["x"].dtype == torch.bfloat16
    for n in grads:
        assert grads[n].dtype == (torch.bfloat16 if n == "x" else torch.float32), n
        _rel_close(grads[n], ref_grads[n], 3e-2, f"grad {n}")


def test_fused_lora_linear_gradcheck_float64():
    from ernie_core.peft.lora import _ACache, lora_linear

    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    x, w, b, a, lb = leaf(2, 3, 5), leaf(4, 5), leaf(4), leaf(2, 5), leaf(4, 2)

    def fn(x, w, b, a, lb, s=1.7):  # h = x Aᵀ without a path to x: the node returns x's whole gradient
        return lora_linear(x, w, b, nn.functional.linear(x.detach(), a), a, lb, s)

    assert torch.autograd.gradcheck(fn, (x, w, b, a, lb))
    assert torch.autograd.gradcheck(lambda x, a, lb: fn(x, w.detach(), None, a, lb, 0.3), (x, a, lb))

    # through the modules: shared A via _ACache, per-module B, an unfrozen base weight
    block, _ = _block_and_reference(bias=True, seed=1)
    block.double()
    block.q_proj.weight.requires_grad_(True)
    assert block.k_proj.lora_A is block.q_proj.lora_A and block.q_proj.lora_A.dtype == torch.float64
    x = leaf(2, 3, 12)
    params = [block.q_proj.lora_A, block.q_proj.lora_B, block.v_proj.lora_B, block.o_proj.lora_A,
              block.o_proj.lora_B, block.q_proj.weight]

    def run(x, *_):
        # gradcheck perturbs inputs through .data, which the x Aᵀ cache cannot see: a fresh cache per
        # call (still one for q|k|v, so the shared A's gradient is summed over the three)
        shared = _ACache()
        for m in (block.q_proj, block.k_proj, block.v_proj):
            m._a_cache = shared
        block.o_proj._a_cache = _ACache()
        return torch.cat([o.flatten() for o in block(x)])

    assert torch.autograd.gradcheck(run, (x, *params))


def test_fused_lora_linear_saves_only_what_backward_needs():
    """Frozen base: the node keeps W, A, h and B for backward, not x (x Aᵀ's own node keeps x once)."""
    from ernie_core.peft.lora import lora_linear

    x = torch.randn(6, 5, requires_grad=True)
    w, a, lb = torch.randn(4, 5), torch.randn(2, 5, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    h = nn.functional.linear(x.detach(), a)

    def saved(fn):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            fn()
        return kept

    kept = saved(lambda: lora_linear(x, w, None, h, a, lb, 2.0))
    assert not any(t.data_ptr() == x.data_ptr() for t in kept), "x saved although W is frozen"
    assert sum(t.numel() for t in kept) == w.numel() + a.numel() + h.numel() + lb.numel()  # W, A, h, B
    w.requires_grad_(True)
    kept = saved(lambda: lora_linear(x, w, None, h, a, lb, 2.0))
    assert any(t.data_ptr() == x.data_ptr() for t in kept), "W trains: x must be kept for its gradient"
    # frozen B (never in training, but allowed): h is not needed
    lb.requires_grad_(False)
    kept = saved(lambda: lora_linear(x, w, None, h, a, lb, 2.0))
    assert not any(t.data_ptr() == h.data_ptr() for t in kept)
    # nothing needs a gradient: nothing is kept
    assert not saved(lambda: lora_linear(x.detach(), w.detach(), None, h.detach(), a.detach(), lb, 2.0))


def test_adapters_off_is_a_plain_linear_and_adapters_get_no_gradient():
    block, _ = _block_and_reference()
    x = torch.randn(2, 7, 12, requires_grad=True)
    with adapters_disabled(block):
        out = block(x)
        sum(o.sum() for o in out).backward()
    want = nn.functional.linear(x.detach(), block.q_proj.weight, block.q_proj.bias)
    assert_close(out[0].detach(), want, 0.0, "adapters off")
    assert all(p.grad is None for n, p in block.named_parameters() if n.endswith(("lora_A", "lora_B")))


@pytest.mark.parametrize("granularity,reentrant", [("full", True), ("full", False), ("full_attn", True)])
def test_fused_lora_linear_under_recompute(granularity, reentrant):
    """Activation recompute re-runs the adapted linears (and the x Aᵀ cache) in backward: the
    adapter gradients equal those of a plain run."""
    def adapter_grads(**runtime):
        torch.manual_seed(0)
        model = ours_from(hf_model(), **runtime).train()
        apply_lora(model, rank=4)
        randomize_adapters(model)
        out = model(IDS).logits
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want_out, want = adapter_grads()
    got_out, got = adapter_grads(recompute=True, recompute_granularity=granularity, recompute_use_reentrant=reentrant)
    assert_close(got_out, want_out, 1e-6, "logits")
    assert set(got) == set(want) and all(g is not None for g in got.values())
    for n in want:
        assert_close(got[n], want[n], 1e-6, n)
