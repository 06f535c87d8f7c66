"""AMP O2 (bf16 weights + fp32 master weights), fp32 gradient accumulation (amp_master_grad),
low-precision moments, offloaded optimizer state, and the ERNIEKit 0.3B configs that use them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ernie_core.config import load_config
from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM
from ernie_core.train.cli import main
from ernie_core.train.loggers import read_log
from ernie_core.train.optim import MixedPrecisionAdamW, build_optimizer, param_groups
from ernie_core.train.precision import AmpPlan

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"
CONFIG = str(ROOT / "examples/configs/sft_tiny.yaml")


def tiny_model(seed=0, **runtime):
    torch.manual_seed(seed)
    cfg = Ernie4_5Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=97)
    return Ernie4_5ForCausalLM(cfg, **runtime)


def batch(seed, B=2, S=24, V=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    return ids, ids.roll(-1, dims=1)


def o2_optimizer(model, *, master_grad=True, lr=1e-3, **kw):
    plan = AmpPlan(level="O2", dtype=torch.bfloat16, master_grad=master_grad)
    seeds = plan.cast_model(model)
    groups = param_groups(model, weight_decay=0.1, num_layers=2)
    return build_optimizer(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, master_grad=master_grad, masters=seeds, **kw)


# ---------------------------------------------------------------- the optimizer
def test_fp32_update_is_bitwise_torch_adamw_with_clipping():
    """For fp32 parameters MixedPrecisionAdamW (offloaded or not) is torch's AdamW + clip_grad_norm_."""
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1, "lr": 1e-2}, {"params": ps[2:], "weight_decay": 0.0,
                                                                                 "lr": 3e-2}]
    t = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    m = MixedPrecisionAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, offload=True)
    for step in range(6):
        grads = [torch.randn(s) * (10 if step % 2 else 0.1) for s in shapes]  # clipping active on odd steps
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=False)
        n_ours = m.clip_grad_norm_(1.0)
        assert float(n_ref) == n_ours
        t.step()
        m.step()
        t.zero_grad()
        m.zero_grad()
        for p, q in zip(ref, ours):
            assert torch.equal(p, q)
    for p, q in zip(ref, ours):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(t.state[p][k], m.state[q][k])


def test_o2_params_bf16_master_fp32_from_the_unrounded_weights():
    model = tiny_model()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = o2_optimizer(model)
    assert isinstance(opt, MixedPrecisionAdamW)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the cast
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and torch.equal(master, fp32[name])  # not the rounded value
    ids, labels = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=labels).loss.backward()
    opt.clip_grad_norm_(1.0)
    opt.step()
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32
        assert torch.equal(p.detach(), st["master"].to(torch.bfloat16))  # the weight is the rounded master


def test_master_weights_keep_updates_that_vanish_in_bf16():
    """Adam moves every weight by about lr per step. At lr 1e-4 that is below half a bf16 ulp of
    weights near 1 (norm weights) or 0.05: pure bf16 AdamW never moves them, the master does."""
    def run(master: bool):
        p = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
        q = torch.nn.Parameter(torch.full((64,), 0.05, dtype=torch.bfloat16))
        groups = [{"params": [p, q], "weight_decay": 0.0, "lr": 1e-4}]
        opt = (MixedPrecisionAdamW(groups, lr=1e-4, betas=(0.9, 0.95)) if master else
               torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=False))
        for _ in range(40):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
            opt.step()
        return p.detach().float(), q.detach().float(), opt

    p_bf16, q_bf16, _ = run(master=False)
    assert torch.all(p_bf16 == 1.0)  # 40 updates of -1e-4 all rounded away
    p_o2, q_o2, opt = run(master=True)
    masters = [opt.state[t]["master"] for t in opt.param_groups[0]["params"]]
    assert masters[0][0].item() == pytest.approx(1.0 - 40e-4, rel=1e-5)  # every update kept
    q0 = torch.tensor(0.05, dtype=torch.bfloat16).item()
    assert masters[1][0].item() == pytest.approx(q0 - 40e-4, rel=1e-5)
    assert p_o2[0].item() == pytest.approx(0.996, abs=0.004)  # the weight follows the master
    assert abs(q_o2[0].item() - (q0 - 40e-4)) < 2e-4 < abs(q_bf16[0].item() - (q0 - 40e-4))


def test_master_grad_accumulates_in_fp32_over_micro_batches():
    """amp_master_grad: each micro-batch's bf16 gradient goes into an fp32 buffer, p.grad stays empty;
    the sum matches the fp64 sum of the per-micro-batch gradients to fp32 precision, while bf16
    accumulation in p.grad (amp_master_grad false) is off by bf16 rounding."""
    model = tiny_model()
    opt = o2_optimizer(model, master_grad=True)
    per_micro = []
    for i in range(4):
        ids, labels = batch(i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss / 4
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        per_micro.append(grads)
        loss.backward()
    params = list(model.parameters())
    assert all(p.grad is None for p in params)
    buffers = dict(opt.grads())
    for j, p in enumerate(params):
        g = buffers[p]
        assert g.dtype == torch.float32
        exact = sum(m[j].double() for m in per_micro)
        assert torch.allclose(g.double(), exact, rtol=1e-6, atol=1e-9), j
    # the same micro-batches accumulated in bf16
    model2 = tiny_model()
    o2_optimizer(model2, master_grad=False)
    for i in range(4):
        ids, labels = batch(i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (model2(ids, labels=labels).loss / 4).backward()
    err32 = err16 = 0.0
    for j, (p, p2) in enumerate(zip(params, model2.parameters())):
        exact = sum(m[j].double() for m in per_micro)
        assert p2.grad.dtype == torch.bfloat16
        err32 = max(err32, float((buffers[p].double() - exact).abs().max() / exact.abs().max()))
        err16 = max(err16, float((p2.grad.double() - exact).abs().max() / exact.abs().max()))
    assert err32 < 1e-6 < 1e-3 < err16
    # zero_grad frees the buffers; the step consumed them
    opt.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert opt.grads() == []


def test_lowprecision_moments_are_bf16_and_update_in_fp32():
    model = tiny_model()
    opt = o2_optimizer(model, moment_dtype=torch.bfloat16)
    ids, labels = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=labels).loss.backward()
    opt.step()
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
        assert st["master"].dtype == torch.float32
        assert st["exp_avg_sq"].float().sum() > 0


def test_offload_moves_one_tensor_state_at_a_time(monkeypatch):
    """Offloaded state lives on the CPU (pinned with CUDA) between steps; the step fetches one
    parameter's state to the parameter's device, updates it and stores it back before the next."""
    events = []
    real_fetch, real_store = MixedPrecisionAdamW._fetch, MixedPrecisionAdamW._store

    def fetch(self, t, device):
        events.append(("fetch", id(t)))
        return real_fetch(self, t, device)

    def store(self, stored, computed):
        events.append(("store", id(stored)))
        return real_store(self, stored, computed)

    monkeypatch.setattr(MixedPrecisionAdamW, "_fetch", fetch)
    monkeypatch.setattr(MixedPrecisionAdamW, "_store", store)
    model = tiny_model()
    ref_model = tiny_model()
    opt = o2_optimizer(model, offload=True)
    ref = o2_optimizer(ref_model, offload=False)
    for m in (model, ref_model):
        ids, labels = batch(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(ids, labels=labels).loss.backward()
    events.clear()
    opt.clip_grad_norm_(1.0)
    opt.step()
    params = [p for g in opt.param_groups for p in g["params"]]
    # per parameter: fetch grad, master, exp_avg, exp_avg_sq; store exp_avg, exp_avg_sq, master
    assert len(events) == 7 * len(params)
    for i, p in enumerate(params):
        chunk = events[7 * i:7 * i + 7]
        st = opt.state[p]
        assert [e[0] for e in chunk] == ["fetch"] * 4 + ["store"] * 3
        assert {e[1] for e in chunk[4:]} == {id(st["master"]), id(st["exp_avg"]), id(st["exp_avg_sq"])}
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert st[k].device.type == "cpu"
            assert st[k].is_pinned() == torch.cuda.is_available()
    ref.clip_grad_norm_(1.0)
    ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.gpu
def test_offload_on_gpu_matches_state_on_gpu():
    """Parameters on CUDA, offloaded state in pinned host memory: the same update as state on the GPU."""
    model, ref_model = tiny_model().cuda(), tiny_model().cuda()
    opt = o2_optimizer(model, offload=True)
    ref = o2_optimizer(ref_model, offload=False)
    for step in range(3):
        for m in (model, ref_model):
            ids, labels = batch(step)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                m(ids.cuda(), labels=labels.cuda()).loss.backward()
        assert opt.clip_grad_norm_(1.0) == pytest.approx(ref.clip_grad_norm_(1.0), rel=1e-6)
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert p.device.type == "cuda" and torch.equal(p, q)
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert opt.state[p][k].device.type == "cpu" and opt.state[p][k].is_pinned()
            assert ref.state[q][k].device.type == "cuda"
            assert torch.equal(opt.state[p][k].cuda(), ref.state[q][k])


def test_state_dict_round_trip_keeps_fp32_master():
    model = tiny_model()
    opt = o2_optimizer(model, moment_dtype=torch.bfloat16)
    ids, labels = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=labels).loss.backward()
    opt.step()
    sd = opt.state_dict()
    model2 = tiny_model(seed=1)
    opt2 = o2_optimizer(model2, moment_dtype=torch.bfloat16)
    opt2.load_state_dict(sd)
    for p, q in zip(model.parameters(), model2.parameters()):
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert opt2.state[q][k].dtype == opt.state[p][k].dtype
            assert torch.equal(opt2.state[q][k], opt.state[p][k])


def test_amp_plan_levels():
    def plan(*o):
        return AmpPlan.from_config(load_config(None, ["fine_tuning=Full", *o]))

    assert plan().level == "O1" and plan().dtype == torch.bfloat16 and not plan().custom_optimizer
    assert plan("fp16_opt_level=O0").dtype is None
    assert plan("compute_type=fp32", "fp16_opt_level=O2").level == "O0"  # no AMP at all
    p = plan("fp16_opt_level=O2", "amp_master_grad=true")
    assert p.level == "O2" and p.master_grad and p.custom_optimizer
    assert not plan("fp16_opt_level=O1", "amp_master_grad=true").master_grad  # fp32 weights have fp32 grads
    assert plan("offload_optim=true").offload
    assert not plan("tensorwise_offload_optimizer=true").offload  # only with optim adamw_custom
    p = plan("optim=adamw_custom", "tensorwise_offload_optimizer=true", "use_lowprecision_moment=true")
    assert p.offload and p.moment_dtype == torch.bfloat16


class _OpDtypes:
    """Records (op, floating input dtypes, floating output dtypes) of everything dispatched."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        rec = self.ops = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                floats = lambda x: tuple(t.dtype for t in tree_leaves(x) if torch.is_tensor(t) and t.is_floating_point())
                rec.setdefault(str(func), set()).add((floats(args), floats(out)))
                return out

        self.mode = Mode()


@pytest.mark.parametrize("runtime", [{}, {"use_flash_attention": False}], ids=["flashmask", "eager"])
def test_o2_forward_runs_the_shipped_amp_lists(runtime):
    """ERNIEKit's white list (lookup_table*, flash_attn, matmul*, fused_gemm_epilogue) runs in bf16 and
    its black list (softmax_with_cross_entropy, reduce_sum, elementwise_div, sin, cos) in fp32 in
    ernie_core's model under O2, so the shipped lists describe what the model does."""
    bf16, fp32 = torch.bfloat16, torch.float32
    model = tiny_model(**runtime)
    AmpPlan(level="O2").cast_model(model)
    ids, labels = batch(0)
    probe = _OpDtypes()
    with torch.autocast("cpu", dtype=bf16), probe.mode:
        loss = model(ids, labels=labels).loss
    ops = probe.ops
    assert loss.dtype == fp32  # elementwise_div: loss sum / token count in fp32
    assert ops["aten.embedding.default"] == {((bf16,), (bf16,))}  # lookup_table(_v2)
    for mm in ("aten.mm.default", "aten.bmm.default"):  # matmul(_v2), fused_gemm_epilogue, eager attention
        assert ops.get(mm, {((bf16, bf16), (bf16,))}) == {((bf16, bf16), (bf16,))}
    if not runtime:  # flash_attn: bf16 q/k/v, fp32 softmax statistics (lse)
        assert ops["ernie_core.flashmask_attention.default"] == {((bf16, bf16, bf16), (bf16, fp32))}
    else:  # eager attention probabilities in fp32
        assert ops["aten._softmax.default"] == {((fp32,), (fp32,))}
    for trig in ("aten.sin.default", "aten.cos.default"):  # RoPE angles
        assert ops[trig] == {((fp32,), (fp32,))}
    assert {o for _, o in ops["aten._log_softmax.default"]} == {(fp32,)}  # softmax_with_cross_entropy
    assert {o[0] for _, o in ops["aten.nll_loss_forward.default"]} == {fp32}  # reduce_sum of the CE


def test_attention_dropout_under_autocast_keeps_fp32_scores():
    """Attention dropout (the reference path) under bf16 autocast: fp32 scores and softmax inside,
    as the kernels (it used to build bf16 scores and overflow on the fp32 mask fill)."""
    from ernie_core.ops import flashmask_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flashmask_attention(q, k, v, None, causal=True, dropout_p=0.1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------- training runs
def args(out, *extra):
    return [CONFIG, f"output_dir={out}", f"model_name_or_path={ROOT / 'examples/tiny_model'}",
            f"train_dataset_path={ROOT / 'examples/data/sft-train.jsonl'}", "train_dataset_type=erniekit",
            "train_dataset_prob=1.0", "max_seq_len=64", "per_device_train_batch_size=2", "logging_steps=1",
            "do_eval=false", "disable_tqdm=true", "num_samples_each_epoch=400", "compute_type=bf16", *extra]


def losses(out):
    return [r["loss"] for r in read_log(out) if "loss" in r]


def test_o2_tracks_o1_and_beats_bf16_without_master_weights(tmp_path, monkeypatch):
    """30 steps at a small learning rate (5e-5: Adam moves weights by about that much per step, less
    than half a bf16 ulp of most weights): O2 (bf16 weights, fp32 masters) follows O1 (fp32
    weights) step by step; the same bf16 weights updated by a plain bf16 AdamW lose most updates to
    rounding and learn about half as much."""
    common = ("max_steps=30", "learning_rate=5e-5", "warmup_steps=0", "lr_scheduler_type=constant",
              "save_strategy=no", "weight_decay=0.0")
    assert main(args(tmp_path / "o1", *common, "fp16_opt_level=O1")) == 0
    assert main(args(tmp_path / "o2", *common, "fp16_opt_level=O2", "amp_master_grad=true")) == 0

    def bf16_adamw(groups, *, lr, betas, eps, **_):  # O2's bf16 weights, no master copy
        for g in groups:
            g["lr"] = lr * g["lr_ratio"]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)

    monkeypatch.setattr("ernie_core.train.trainer.build_optimizer", bf16_adamw)
    assert main(args(tmp_path / "bf16", *common, "fp16_opt_level=O2")) == 0
    o1, o2, bf16 = (losses(tmp_path / k) for k in ("o1", "o2", "bf16"))
    assert len(o1) == len(o2) == len(bf16) == 30
    drop = lambda curve: sum(curve[:5]) / 5 - sum(curve[-5:]) / 5
    assert drop(o1) > 0.8  # measured 1.10
    assert max(abs(a - b) for a, b in zip(o1, o2)) < 0.02  # measured 0.0027
    assert abs(drop(o2) - drop(o1)) < 0.02
    assert drop(bf16) < 0.7 * drop(o2)  # measured 0.51 vs 1.10: master weights matter


def test_o2_resume_continues_the_same_losses(tmp_path, monkeypatch):
    """Crash after checkpoint-3 and resume under O2 + amp_master_grad + offload + accumulation: the
    master weights come back from the checkpoint, the loss curve is bitwise the uninterrupted one."""
    extra = ("max_steps=6", "save_steps=3", "learning_rate=1e-3", "warmup_steps=2", "fp16_opt_level=O2",
             "amp_master_grad=true", "gradient_accumulation_steps=2", "offload_optim=true",
             "optim=adamw_custom", "use_lowprecision_moment=true")
    assert main(args(tmp_path / "a", *extra)) == 0
    ref = losses(tmp_path / "a")
    saved = torch.load(tmp_path / "a" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    st = saved["state"]["model.norm.weight"]
    assert st["master"].dtype == torch.float32 and st["exp_avg"].dtype == torch.bfloat16

    from ernie_core.train.trainer import Trainer

    real_step = Trainer.optimizer_step

    def dying_step(self):
        if self.global_step == 4:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(Trainer, "optimizer_step", dying_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args(tmp_path / "b", *extra, "overwrite_output_dir=false"))
    monkeypatch.setattr(Trainer, "optimizer_step", real_step)
    assert main(args(tmp_path / "b", *extra, "overwrite_output_dir=false")) == 0
    assert losses(tmp_path / "b") == ref  # bitwise on CPU


def test_remove_master_weight_rebuilds_masters_from_bf16_weights(tmp_path):
    """remove_master_weight: checkpoints hold no master weights; a resume rebuilds them from the saved
    bf16 weights (so sub-ulp progress is lost: close to, not equal to, the uninterrupted run)."""
    from ernie_core.train.sft import SFTObjective
    from ernie_core.train.trainer import Trainer

    extra = ("max_steps=4", "save_steps=2", "learning_rate=1e-3", "warmup_steps=0", "fp16_opt_level=O2",
             "amp_master_grad=true", "unified_checkpoint_config=remove_master_weight")
    assert main(args(tmp_path / "a", *extra)) == 0
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["state"] and not any("master" in st for st in saved["state"].values())
    assert all("exp_avg" in st for st in saved["state"].values())
    ref = losses(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    (tmp_path / "b" / "trainer_log.jsonl").unlink()
    config, *overrides = args(tmp_path / "b", *extra, "overwrite_output_dir=false")
    trainer = Trainer(load_config(config, overrides), SFTObjective())
    trainer.setup()
    assert trainer.global_step == 2
    for p in trainer.model.parameters():
        st = trainer.optimizer.state[p]
        assert p.dtype == torch.bfloat16 and "exp_avg" in st
        assert "master" not in st or torch.equal(st["master"], p.detach().float())
    trainer.train()
    resumed = losses(tmp_path / "b")
    assert len(resumed) == 2 and resumed[0] == ref[2]  # step 3 runs on the same bf16 weights
    assert resumed[1] == pytest.approx(ref[3], abs=0.1)
    assert all(opt_st["master"].dtype == torch.float32 for opt_st in trainer.optimizer.state.values())


def test_o1_resume_of_an_o2_checkpoint_adopts_the_master_weights(tmp_path):
    o2 = ("max_steps=2", "save_steps=2", "learning_rate=1e-3", "fp16_opt_level=O2")
    assert main(args(tmp_path, *o2)) == 0
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    master = saved["state"]["model.norm.weight"]["master"]
    from ernie_core.train.sft import SFTObjective
    from ernie_core.train.trainer import Trainer

    config, *overrides = args(tmp_path, "max_steps=3", "fp16_opt_level=O1", "overwrite_output_dir=false")
    trainer = Trainer(load_config(config, overrides), SFTObjective())
    trainer.setup()
    assert trainer.global_step == 2
    p = trainer.model.model.norm.weight
    assert p.dtype == torch.float32 and torch.equal(p.detach(), master)  # fp32, not the bf16 file values
    assert all("master" not in st for st in trainer.optimizer.state.values())


# ---------------------------------------------------------------- the shipped ERNIEKit configs
def _weights(tmp_path) -> Path:
    """examples/tiny_model with saved weights (the ERNIEKit configs continue from model weights)."""
    model_dir = tmp_path / "tiny_model"
    shutil.copytree(ROOT / "examples/tiny_model", model_dir)
    torch.manual_seed(0)
    Ernie4_5ForCausalLM(Ernie4_5Config.from_pretrained(str(model_dir))).save_pretrained(str(model_dir))
    return model_dir


@pytest.mark.slow
def test_erniekit_0_3b_sft_config_runs_unchanged(tmp_path):
    """O2 + amp_master_grad + white/black lists + adamw_custom with tensorwise offload + unified
    checkpoint options, max_seq_len 8192 and 8 accumulation steps: only paths and max_steps differ."""
    model_dir = _weights(tmp_path)
    out = tmp_path / "out"
    assert main([str(FIXTURES / "erniekit_0.3b_sft_8k.yaml"), f"model_name_or_path={model_dir}",
                 f"train_dataset_path={ROOT / 'examples/data/sft-train.jsonl'}",
                 f"eval_dataset_path={ROOT / 'examples/data/sft-eval.jsonl'}", f"output_dir={out}",
                 f"logging_dir={out}", "max_steps=2"]) == 0
    lines = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2] and all(r["loss"] > 0 for r in lines)
    model = Ernie4_5ForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.model.norm.weight.dtype == torch.bfloat16  # O2 weights are bf16


@pytest.mark.slow
def test_erniekit_0_3b_dpo_lora_config_runs_unchanged(tmp_path):
    """LoRA DPO with O2 + offload_optim + async_save; 36 accumulation steps of 8192-token rows."""
    data = ROOT / "examples/data/dpo-train.jsonl"
    if not data.is_file():
        pytest.skip("examples/data/dpo-train.jsonl not generated")
    model_dir = _weights(tmp_path)
    out = tmp_path / "out"
    assert main([str(FIXTURES / "erniekit_0.3b_dpo_lora_8k.yaml"), f"model_name_or_path={model_dir}",
                 f"train_dataset_path={data}", f"eval_dataset_path={ROOT / 'examples/data/dpo-eval.jsonl'}",
                 f"output_dir={out}", f"logging_dir={out}", "max_steps=3"]) == 0
    lines = [r for r in read_log(out) if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in lines] == [1, 2, 3] and "rewards/accuracy" in lines[0]
    assert (out / "adapter_model.safetensors").is_file()
