"""Read the attention-dropout keep mask back out of a backend's kernels (tests only).

With q = 0 (or k = 0) every score is 0, so on a full (bidirectional, unmasked) mask P = 1/S; one-hot
rows of v, k, q and dO then expose Z[b, h, i, j] directly (r = 1/(1-p), delta_i = sum_d O_id):
  forward        out[b, i, h, j] = r/S Z_ij                    (v_j = e_j)
  dK/dV kernel   dv[b, j, h, i]  = r/S Z_ij                    (dO_i = e_i; one kv head per q head)
                 dk[b, j, h, i]  = scale/S (r Z_ij - delta_i)  (q_i = e_i, dO = 1)
  dQ kernel      dq[b, i, h, j]  = scale/S (r Z_ij - delta_i)  (k_j = e_j, dO = 1)
Needs D >= S. fwd / bwd are kernels with the contract's fwd_dropout / bwd_dropout signatures.
"""
from __future__ import annotations

import torch


def extract_keep_masks(fwd, bwd, *, B, S, D, Hq, Hkv, p, rng, device="cpu", dtype=torch.float32) -> dict:
    """{path: bool [B, Hq, S, S]} for every kernel path the probe reaches."""
    assert D >= S, "the probe needs one-hot rows: D >= S"
    r = 1.0 / (1.0 - p)
    eye = torch.eye(S, D, device=device, dtype=dtype)

    def onehot(h):
        return eye.view(1, S, 1, D).expand(B, S, h, D).contiguous()

    def zeros(h):
        return torch.zeros(B, S, h, D, device=device, dtype=dtype)

    def as_bhij(t):  # [B, S(i), H, D(j)] -> [B, H, i, j], fp32
        return t.float().permute(0, 2, 1, 3)[..., :S]

    idx = torch.zeros(B, 1, S, 2, dtype=torch.int32, device=device)
    idx[..., 0] = S  # bidirectional, nothing masked
    got = {}
    out, lse = fwd(zeros(Hq), zeros(Hkv), onehot(Hkv), idx, False, 1.0, p, rng)
    got["forward"] = as_bhij(out) > r / (2 * S)
    delta = out.float().sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, i, 1] (dO = 1)
    ones = torch.ones(B, S, Hq, D, device=device, dtype=dtype)
    dq, _, _ = bwd(ones, zeros(Hq), onehot(Hkv), onehot(Hkv), out, lse, idx, False, 1.0, dropout_p=p, rng_state=rng)
    got["dq kernel"] = as_bhij(dq) > (r / 2 - delta) / S
    if Hq == Hkv:
        _, _, dv = bwd(onehot(Hq), zeros(Hq), zeros(Hkv), onehot(Hkv), out, lse, idx, False, 1.0, dropout_p=p,
                       rng_state=rng)
        got["dkdv kernel (dv)"] = as_bhij(dv).transpose(-1, -2) > r / (2 * S)
        out2, lse2 = fwd(onehot(Hq), zeros(Hkv), onehot(Hkv), idx, False, 1.0, p, rng)
        delta2 = out2.float().sum(-1).transpose(1, 2).unsqueeze(-2)  # [B, H, 1, i]
        _, dk, _ = bwd(ones, onehot(Hq), zeros(Hkv), onehot(Hkv), out2, lse2, idx, False, 1.0, dropout_p=p,
                       rng_state=rng)
        got["dkdv kernel (dk)"] = (as_bhij(dk) > (r / 2 - delta2) / S).transpose(-1, -2)
    return {k: v.cpu() for k, v in got.items()}


def mismatches(got: dict, want: torch.Tensor, what: str = "") -> list[str]:
    out = []
    for path, keep in got.items():
        bad = keep != want
        if bad.any():
            out.append(f"{what}{path}: {int(bad.sum())} of {bad.numel()} keep flags differ from the reference hash, "
                       f"first at {bad.nonzero()[0].tolist()}")
    return out
