"""Every Triton kernel under TRITON_INTERPRET=1 (CPU tensors) against its reference, values and
gradients, at small sizes with small tiles so that masks cross many tiles.

TRITON_INTERPRET is read when a kernel is decorated, so the cases run in ONE child process
(`python tests/test_triton_interp.py --worker out.json`) with the variable set before Triton is
imported; this pytest process stays untouched. The child also patches the interpreter's `tl.dot`
for bf16 operands (upstream triton-lang/triton#11584 multiplies their raw bit patterns), so bf16
cases run too; everything else in the kernels is fp32 math, which the interpreter computes right.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---- cases (run in the child) -------------------------------------------------------------------

SMALL_TILES = dict(block_m=16, block_n=16, num_warps=1, num_stages=1)


def _rel_err(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _close(name, x, ref, tol):
    import torch

    if not torch.isfinite(x).all():
        raise AssertionError(f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(x))[:3].tolist()}")
    err = _rel_err(x, ref)
    if err > tol:
        diff = (x.detach().double() - ref.detach().double()).abs()
        first = torch.nonzero(diff == diff.max())[0].tolist()
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:g}; max abs diff {diff.max():.3g} "
                             f"(mean {diff.mean():.3g}) at {first}")


def _mask_indices(mode, B, S, Hm, gen):
    from ernie_core.ops.triton._mask import example_indices

    return example_indices(mode, B, S, Hm, gen)


ATTN_CASES = {
    # name: (mode, causal, B, S, Hq, Hkv, Hm, D, dtype)
    "attn_causal_none_fp32": (None, True, 1, 37, 2, 1, 1, 32, "float32"),
    "attn_full_none_fp32": (None, False, 1, 29, 2, 2, 1, 16, "float32"),
    "attn_causal_doc_fp32_gqa": ("causal_doc", True, 2, 53, 4, 2, 1, 32, "float32"),
    "attn_causal_doc_fp32_headmask": ("causal_doc", True, 1, 45, 4, 2, 2, 24, "float32"),
    "attn_share_prompt_fp32": ("share_prompt", True, 2, 40, 2, 1, 1, 32, "float32"),
    "attn_prefix_lm_fp32": ("prefix_lm", False, 1, 41, 2, 2, 1, 16, "float32"),
    "attn_global_docs_fp32": ("global_docs", False, 1, 35, 2, 1, 1, 32, "float32"),
    "attn_random4_fp32": ("random4", False, 2, 33, 2, 1, 1, 16, "float32"),
    "attn_causal_doc_bf16": ("causal_doc", True, 1, 48, 2, 1, 1, 64, "bfloat16"),
    "attn_share_prompt_bf16": ("share_prompt", True, 1, 40, 4, 2, 1, 32, "bfloat16"),
}
# Attention dropout (same cases, a dropout rate; the reference applies the same keep mask).
DROPOUT_CASES = {
    "attn_dropout_causal_doc_fp32_gqa": ("attn_causal_doc_fp32_gqa", 0.3),
    "attn_dropout_share_prompt_fp32": ("attn_share_prompt_fp32", 0.6),
    "attn_dropout_random4_fp32": ("attn_random4_fp32", 0.5),
    "attn_dropout_causal_doc_bf16": ("attn_causal_doc_bf16", 0.1),
}


def case_attention(name, dropout_p=0.0):
    """Forward (out, lse) and backward vs autograd through the fp64 reference; the backward gets a
    gradient on lse too (dlse), and dropout_p > 0 uses the reference's keep mask of one rng_state."""
    import torch

    from ernie_core.ops.reference import flashmask_attention_reference
    from ernie_core.ops.triton.flashmask import flashmask_bwd, flashmask_fwd

    mode, causal, B, S, Hq, Hkv, Hm, D, dt = ATTN_CASES[name]
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    q = torch.randn(B, S, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, S, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, S, Hkv, D, generator=gen).to(dtype)
    idx = None if mode is None else _mask_indices(mode, B, S, Hm, gen)
    scale = 0.3 if mode == "random4" else None
    rng = torch.tensor([-(2**63) + 977, 2**40 + 3])  # seed with the top bit set: uint64 hashing
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = flashmask_attention_reference(qr, kr, vr, idx, causal, scale, dropout_p, return_lse=True,
                                                 rng_state=rng)
    out, lse = flashmask_fwd(q, k, v, idx, causal, scale, dropout_p, rng, config=SMALL_TILES)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    _close("out", out, ref, tol)
    if not torch.equal(torch.isinf(lse), torch.isinf(ref_lse)):
        raise AssertionError("lse: -inf (fully masked rows) differ from the reference")
    fin = torch.isfinite(ref_lse)
    _close("lse", lse[fin], ref_lse[fin].float(), 1e-5 if dtype == torch.float32 else 1e-2)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    dlse = torch.randn(lse.shape, generator=gen) * fin  # rows that attend nothing have no lse gradient
    objective = (ref * dout.double()).sum() + (torch.where(fin, ref_lse, 0.0) * dlse.double()).sum()
    gq, gk, gv = torch.autograd.grad(objective, (qr, kr, vr))
    dq, dk, dv = flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale, dlse, dropout_p, rng, config=SMALL_TILES)
    for n_, x, r in (("dq", dq, gq), ("dk", dk, gk), ("dv", dv, gv)):
        _close(n_, x, r, 1e-4 if dtype == torch.float32 else 4e-2)
    return f"S={S} tiles 16x16"


def case_rope(dt):
    import torch

    from ernie_core.ops.reference import rope_reference_one
    from ernie_core.ops.triton.pointwise import rope_fwd

    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 3, 16, generator=gen).to(dtype)
    pos = torch.randint(0, 32768, (2, 9), generator=gen)
    for inverse in (False, True):
        _close(f"rope inverse={inverse}", rope_fwd(x, pos, 500000.0, inverse),
               rope_reference_one(x, pos, 500000.0, inverse), 1e-6 if dtype == torch.float32 else 8e-3)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous [B, S, H, D]
    _close("rope strided", rope_fwd(xt, pos, 1e4), rope_reference_one(xt, pos, 1e4), 1e-6 if dt == "float32" else 8e-3)
    # Several programs of 8 tokens, the last one partial, and a partial head block (5 of 8).
    x = torch.randn(3, 50, 5, 64, generator=gen).to(dtype)
    pos = torch.randint(0, 32768, (3, 50), generator=gen)
    _close("rope multi-program", rope_fwd(x, pos, 500000.0), rope_reference_one(x, pos, 500000.0),
           1e-6 if dtype == torch.float32 else 8e-3)


def case_rms_norm(dt):
    import torch

    from ernie_core.ops.reference import rms_norm_reference
    from ernie_core.ops.triton.pointwise import rms_norm_bwd, rms_norm_fwd

    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(2)
    for shape in ((3, 7, 48), (5, 37, 200)):  # one program; 12 programs of 16 rows, the last partial
        _rms_case(torch, dtype, gen, shape, rms_norm_reference, rms_norm_fwd, rms_norm_bwd)


def _rms_case(torch, dtype, gen, shape, rms_norm_reference, rms_norm_fwd, rms_norm_bwd):
    x = torch.randn(*shape, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = rms_norm_reference(xr, wr, 1e-6)
    y, rstd = rms_norm_fwd(x, w, 1e-6)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    _close("y", y, ref, tol)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    gx, gw = torch.autograd.grad(ref, (xr, wr), dy.double())
    dx, dw = rms_norm_bwd(dy, x, w, rstd, n_programs=4)
    _close("dx", dx, gx, 1e-5 if dtype == torch.float32 else 1e-2)
    _close("dw", dw, gw, 1e-5 if dtype == torch.float32 else 1e-2)


def case_swiglu(dt):
    import torch

    from ernie_core.ops.reference import swiglu_reference
    from ernie_core.ops.triton.pointwise import swiglu_bwd, swiglu_fwd

    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(3)
    g, u = (torch.randn(5, 333, generator=gen).mul(3).to(dtype) for _ in range(2))
    gr, ur = g.double().requires_grad_(), u.double().requires_grad_()
    ref = swiglu_reference(gr, ur)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    _close("y", swiglu_fwd(g, u), ref, tol)
    dy = torch.randn(g.shape, generator=gen).to(dtype)
    rg, ru = torch.autograd.grad(ref, (gr, ur), dy.double())
    dg, du = swiglu_bwd(dy, g, u)
    _close("dg", dg, rg, tol * 2)
    _close("du", du, ru, tol * 2)


def case_head_ce(dt):
    import torch

    from ernie_core.ops.reference import fused_head_ce_reference
    from ernie_core.ops.triton.head_ce import fused_head_ce_fwd_bwd

    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(4)
    N, H, V = 37, 24, 5000  # V > the kernel's 4096-wide vocabulary block: two blocks, one partial
    h = torch.randn(N, H, generator=gen).to(dtype)
    w = (0.2 * torch.randn(V, H, generator=gen)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = -100
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    ref_loss, ref_n = fused_head_ce_reference(hr, wr, labels)
    rh, rw = torch.autograd.grad(ref_loss, (hr, wr))
    loss, n, dh, dw = fused_head_ce_fwd_bwd(h, w, labels, -100, 16)  # 3 chunks, the last partial
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    _close("loss", loss.reshape(1), ref_loss.reshape(1), tol)
    if int(n) != int(ref_n):
        raise AssertionError(f"n_tokens {int(n)} != {int(ref_n)}")
    _close("dhidden", dh, rh, tol)
    _close("dweight", dw, rw, tol)


def case_dropout_keep_mask(S, D, Hq, Hkv, tiles):
    """The keep mask read back out of the forward, dK/dV and dQ kernels (tests/_dropout_probe.py)
    equals reference.dropout_keep_mask and the C++ CPU kernel's mask, bit for bit, for two seeds
    (one with the top bit set: the uint64 hashing)."""
    import functools

    import torch

    from _dropout_probe import extract_keep_masks, mismatches
    from ernie_core.ops import reference as ref
    from ernie_core.ops.triton.flashmask import flashmask_bwd, flashmask_fwd

    try:
        import ernie_core._C  # noqa: F401
    except ImportError:
        raise AssertionError("ernie_core._C is not built: no CPU kernel mask to compare with") from None
    B, p = 2, 0.5
    cfg = dict(block_m=tiles[0], block_n=tiles[1], num_warps=1, num_stages=1)
    fwd, bwd = functools.partial(flashmask_fwd, config=cfg), functools.partial(flashmask_bwd, config=cfg)

    def cpu_fwd(q, k, v, idx, causal, scale, dropout_p, rng):
        return torch.ops.ernie_core_C.flashmask_fwd(q, k, v, idx, causal, scale, dropout_p, *map(int, rng.tolist()))

    def cpu_bwd(dout, q, k, v, out, lse, idx, causal, scale, dropout_p, rng_state):
        return torch.ops.ernie_core_C.flashmask_bwd(dout, q, k, v, out, lse, idx, causal, scale, None, dropout_p,
                                                    *map(int, rng_state.tolist()))

    problems, n = [], 0
    for rng in (torch.tensor([-(2**63) + 12345, 2**40 + 7]), torch.tensor([7, -3])):
        want = ref.dropout_keep_mask(rng, B, Hq, S, p)
        shape = dict(B=B, S=S, D=D, Hq=Hq, Hkv=Hkv, p=p, rng=rng)
        got = extract_keep_masks(fwd, bwd, **shape)
        problems += mismatches(got, want, "triton ")
        problems += mismatches({"forward": extract_keep_masks(cpu_fwd, cpu_bwd, **shape)["forward"]}, want, "cpu ")
        n = len(got)
        frac = float(want.float().mean())
        if abs(frac - (1 - p)) > 0.05:
            problems.append(f"keep fraction {frac} for p={p}")
    if problems:
        raise AssertionError("; ".join(problems))
    return f"{n} triton paths + the cpu kernel x 2 seeds bit-equal, {B}x{Hq}x{S}x{S}"


CASES = {name: (case_attention, (name,)) for name in ATTN_CASES}
for _name, (_base, _p) in DROPOUT_CASES.items():
    CASES[_name] = (case_attention, (_base, _p))
CASES["dropout_keep_mask_bits"] = (case_dropout_keep_mask, (80, 80, 2, 2, (32, 32)))
CASES["dropout_keep_mask_bits_gqa"] = (case_dropout_keep_mask, (64, 64, 4, 2, (32, 16)))
for _dt in ("float32", "bfloat16"):
    CASES[f"rope_{_dt}"] = (case_rope, (_dt,))
    CASES[f"rms_norm_{_dt}"] = (case_rms_norm, (_dt,))
    CASES[f"swiglu_{_dt}"] = (case_swiglu, (_dt,))
    CASES[f"head_ce_{_dt}"] = (case_head_ce, (_dt,))


# ---- the child ----------------------------------------------------------------------------------

def _patch_bf16_dot():
    """Make the interpreter's dot read bf16 operands as numbers (triton-lang/triton#11584)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    orig = interpreter.InterpreterBuilder.create_dot

    def as_f32(h):
        if h.dtype.scalar == tl.bfloat16:  # stored as uint16 bit patterns: widen to fp32 bits
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _worker(out_path):
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, ROOT)
    import torch  # noqa: F401
    import triton  # noqa: F401

    _patch_bf16_dot()
    results = {}
    for name, (fn, args) in CASES.items():
        t0 = time.time()
        try:
            note = fn(*args)
            results[name] = {"ok": True, "msg": note or "", "s": round(time.time() - t0, 2)}
        except Exception as e:  # reported per case by the parent
            results[name] = {"ok": False, "msg": f"{type(e).__name__}: {e}", "s": round(time.time() - t0, 2)}
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


# ---- the parent (pytest) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_triton_kernel_interpreted(interp_results, case):
    r = interp_results[case]
    assert r["ok"], r["msg"]


def test_bf16_dot_patch_is_needed_and_works():
    """Guards the patch: drop it (and this test) once the interpreter gets bf16 dots right."""
    code = (
        "import os; os.environ['TRITON_INTERPRET']='1'\n"
        "import sys; sys.path.insert(0, %r)\n"
        "import torch, triton, triton.language as tl\n"
        "from test_triton_interp import _patch_bf16_dot\n"
        "@triton.jit\n"
        "def k(a, b, c):\n"
        "    r = tl.arange(0, 16)\n"
        "    x = tl.load(a + r[:, None] * 16 + r[None, :]); y = tl.load(b + r[:, None] * 16 + r[None, :])\n"
        "    tl.store(c + r[:, None] * 16 + r[None, :], tl.dot(x, y))\n"
        "a = torch.randint(-2, 3, (16, 16)).bfloat16(); b = torch.randint(-2, 3, (16, 16)).bfloat16()\n"
        "c = torch.zeros(16, 16); k[(1,)](a, b, c); bad = not torch.equal(c, a.float() @ b.float())\n"
        "_patch_bf16_dot(); k[(1,)](a, b, c); print(bad, torch.equal(c, a.float() @ b.float()))\n"
    ) % HERE
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    unpatched_wrong, patched_right = proc.stdout.split()
    assert patched_right == "True"
    if unpatched_wrong == "False":
        pytest.xfail("the interpreter computes bf16 dots right now: the patch can go")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
