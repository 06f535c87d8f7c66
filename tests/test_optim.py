"""LR schedules and parameter groups against the formulas of docs/behaviour.md#loss-batch-optimizer, #learning-rate."""
import math

import pytest
import torch

from ernie_core.train.optim import layerwise_ratio, lr_factor, param_groups


def lr(step, kind, **kw):
    base = kw.pop("base_lr", 1.0)
    return base * lr_factor(step, kind=kind, base_lr=base, **kw)


@pytest.mark.parametrize("kind", ["linear", "cosine", "polynomial", "constant_with_warmup"])
def test_warmup_is_linear_and_reaches_base(kind):
    kw = dict(warmup=10, total=100, min_lr=0.1, lr_end=1e-7)
    assert lr(0, kind, **kw) == 0.0
    assert lr(5, kind, **kw) == pytest.approx(0.5)
    assert lr(10, kind, **kw) == pytest.approx(1.0)  # ends at base even with min_lr


def test_constant_has_no_warmup():
    assert lr(0, "constant", warmup=10, total=100) == 1.0


def test_linear_decay_formula():
    for s in (10, 40, 99, 100, 120):
        assert lr(s, "linear", warmup=10, total=100) == pytest.approx(max(0.0, (100 - s) / 90))


@pytest.mark.parametrize("num_cycles,min_lr", [(0.5, 0.0), (0.5, 0.2), (1.0, 0.0)])
def test_cosine_formula(num_cycles, min_lr):
    base = 2.0
    for s in (10, 30, 55, 100):
        prog = (s - 10) / 90
        r = max(0.0, 0.5 * (1 + math.cos(math.pi * 2 * num_cycles * prog)))
        want = base * (r * (1 - min_lr / base) + min_lr / base)
        got = lr(s, "cosine", warmup=10, total=100, base_lr=base, min_lr=min_lr, num_cycles=num_cycles)
        assert got == pytest.approx(want)
    # one half-wave ends at min_lr
    assert lr(100, "cosine", warmup=10, total=100, base_lr=base, min_lr=0.2) == pytest.approx(0.2)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_polynomial_formula(power):
    base, end = 1e-3, 1e-5
    for s in (10, 50, 100):
        want = (base - end) * (1 - (s - 10) / 90) ** power + end
        assert lr(s, "polynomial", warmup=10, total=100, base_lr=base, lr_end=end, power=power) == pytest.approx(want)
    assert lr(150, "polynomial", warmup=10, total=100, base_lr=base, lr_end=end, power=power) == pytest.approx(end)


def test_layerwise_ratio_matches_reference_example():
    # ERNIE-4.5-0.3B (18 layers), bound 0.5: embeddings and layer 0 -> 0.5, layer 9 -> 0.725,
    # layer 17 -> 0.925, final norm / head -> 1.0.
    L, b = 18, 0.5
    assert layerwise_ratio("model.embed_tokens.weight", L, b, tied_embedding=False) == pytest.approx(0.5)
    assert layerwise_ratio("model.layers.0.mlp.up_proj.weight", L, b, False) == pytest.approx(0.5)
    assert layerwise_ratio("model.layers.9.self_attn.q_proj.weight", L, b, False) == pytest.approx(0.725)
    assert layerwise_ratio("model.layers.17.input_layernorm.weight", L, b, False) == pytest.approx(0.925)
    assert layerwise_ratio("model.norm.weight", L, b, False) == pytest.approx(1.0)
    assert layerwise_ratio("lm_head.weight", L, b, False) == pytest.approx(1.0)
    assert layerwise_ratio("model.embed_tokens.weight", L, b, tied_embedding=True) == 1.0
    assert layerwise_ratio("model.layers.3.mlp.up_proj.weight", L, 1.0, False) == 1.0


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 4, bias=True)
    model.input_layernorm = torch.nn.LayerNorm(4)
    groups = param_groups(model, weight_decay=0.1)
    by_name = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert by_name == {"proj.weight": 0.1, "proj.bias": 0.0, "input_layernorm.weight": 0.0,
                       "input_layernorm.bias": 0.0}
