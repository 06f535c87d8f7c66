"""AdamW parameter groups, the optimizers and the five learning-rate schedules (docs/behaviour.md#loss-batch-optimizer, #learning-rate; master weights, fp32 gradients, low-precision moments and offloaded state docs/behaviour.md#precision-and-parallelism, #fp8)."""
from __future__ import annotations

import math
import re

import torch

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """ERNIEKit exempts names containing 'bias' or 'norm' from weight decay."""
    return "bias" in name or "norm" in name


def layerwise_ratio(name: str, num_layers: int, bound: float, tied_embedding: bool) -> float:
    """LR multiplier b + depth/(L+2)*(1-b): depth 0 for embeddings, i for layers.i, L+2 for the
    final norm and LM head. The tied embedding/head tensor gets no recorded ratio (1.0)."""
    if bound >= 1.0:
        return 1.0
    match = _LAYER_RE.search(name)
    if match:
        depth = int(match.group(1))
    elif "embed_tokens" in name:
        if tied_embedding:
            return 1.0
        depth = 0
    else:  # final norm, lm_head and anything after the decoder stack
        depth = num_layers + 2
    return bound + depth / (num_layers + 2) * (1.0 - bound)


def param_groups(model: torch.nn.Module, *, weight_decay: float, layerwise_bound: float = 1.0,
                 num_layers: int = 0, tied_embedding: bool = True, lr_multiplier=None) -> list[dict]:
    """One group per (decay?, lr ratio). `lr_multiplier(name) -> float` stacks on top (LoRA+)."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p)
        ratio = layerwise_ratio(name, num_layers, layerwise_bound, tied_embedding)
        if lr_multiplier is not None:
            ratio *= lr_multiplier(name)
        key = (decay, ratio)
        group = groups.setdefault(key, {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                                        "lr_ratio": ratio})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                    master_grad: bool = False, moment_dtype: torch.dtype = torch.float32, offload: bool = False,
                    masters: dict | None = None) -> torch.optim.Optimizer:
    """torch's AdamW, or MixedPrecisionAdamW when a parameter is stored below fp32 (AMP O2) or an
    option needs it (fp32 gradient accumulation, low-precision moments, offloaded state)."""
    for g in groups:
        g["lr"] = lr * g["lr_ratio"]
    low = any(p.dtype != torch.float32 for g in groups for p in g["params"])
    if low or offload or moment_dtype != torch.float32:
        return MixedPrecisionAdamW(groups, lr=lr, betas=betas, eps=eps, master_grad=master_grad,
                                   moment_dtype=moment_dtype, offload=offload, masters=masters)
    # foreach=False keeps the update bitwise identical across resumes and layouts on CPU.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


MOMENTS = ("exp_avg", "exp_avg_sq")


def _pinned_host() -> bool:
    return torch.cuda.is_available()


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """AdamW whose update always runs in fp32, whatever the parameter dtype (ERNIEKit AMP O2 and
    `adamw_custom`). Per parameter the state holds `step`, `exp_avg`, `exp_avg_sq` (fp32, or bf16
    with moment_dtype=bf16: stored rounded, updated in fp32) and, for a parameter stored below fp32,
    `master`: its fp32 master weight. The update is applied to the master, then rounded into the
    parameter. For fp32 parameters with fp32 moments the arithmetic is torch.optim.AdamW's
    (foreach=False) step for step, so results are bitwise the same.

    master_grad (amp_master_grad): a hook moves every micro-batch's low-precision gradient out of
    `p.grad` into an fp32 buffer as soon as backward produced it, so gradient accumulation, the norm,
    clipping and the update all see fp32 gradients. Without it the gradients accumulate in the
    parameter dtype in `p.grad` and are upcast at the step (the clip factor is applied to the fp32 copy).

    offload (offload_optim / tensorwise_offload_optimizer): between steps every state tensor,
    master weights included, lives in host memory (pinned when CUDA is available); `step()` moves one
    parameter's state to that parameter's device, updates it and moves it back before the next
    parameter, so the device holds one tensor's state at a time. With the parameters on the CPU the
    moves are no-ops by construction. `clip_grad_norm_` + `step` replace the layout's optimizer step
    on one process; under a parallel layout the layout's global-norm clip runs on `_grad(p)` instead."""

    clips_own_grads = True

    def __init__(self, params, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 master_grad: bool = False, moment_dtype: torch.dtype = torch.float32, offload: bool = False,
                 masters: dict | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.master_grad, self.moment_dtype, self.offload = master_grad, moment_dtype, offload
        self._grads: dict[int, torch.Tensor] = {}  # id(param) -> fp32 accumulated gradient (master_grad)
        self._clip_coef: torch.Tensor | None = None  # applied to upcast p.grad at the step (no master_grad)
        self._hooks = []
        masters = masters or {}
        for group in self.param_groups:
            names = group.get("names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"]):
                if p.dtype == torch.float32:
                    continue
                seed = masters.get(name)  # the fp32 value the parameter had before it was rounded (O2 cast)
                master = _like(seed.detach(), p) if seed is not None and seed.shape == p.shape else p.detach().float()
                self.state[p]["master"] = self._to_storage(master.to(torch.float32))
                if master_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(_accumulate_hook(self)))

    # ------------------------------------------------------------------ where state lives
    def _storage_device(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.offload else p.device

    def _to_storage(self, t: torch.Tensor, *, like: torch.Tensor | None = None) -> torch.Tensor:
        """`t` as it is kept between steps (host memory, pinned when CUDA is available, when offloading)."""
        device = self._storage_device(like if like is not None else t)
        if not _is_plain(t):  # a DTensor shard (TP, FSDP): moved as a whole, placements kept
            return t.to(device) if t.device != device else t
        if not self.offload or t.device == device and (not _pinned_host() or t.is_pinned()):
            return t.to(device) if t.device != device else t
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=_pinned_host())
        out.copy_(t)
        return out

    def _fetch(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A state tensor on the compute device (the tensor itself when it is already there)."""
        return t if t.device == device else t.to(device, non_blocking=True)

    def _store(self, stored: torch.Tensor, computed: torch.Tensor) -> None:
        if computed is not stored:
            stored.copy_(computed, non_blocking=True)

    @torch.no_grad()
    def conform_state(self) -> None:
        """After loading a checkpoint: state tensors back to their storage place and dtype; a
        master weight for a parameter stored in fp32 is adopted as the parameter (an O2 checkpoint
        resumed under O1) and dropped; a missing one is rebuilt from the parameter at the next step."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                master = adopt_master(p, st)
                if master is not None:
                    st["master"] = self._to_storage(master.to(torch.float32), like=p)
                for k in MOMENTS:
                    if k in st:
                        st[k] = self._to_storage(st[k].to(self.moment_dtype), like=p)
                if "step" in st:
                    st["step"] = st["step"].to("cpu", torch.float32)

    def remove_hooks(self) -> None:
        """Stop routing gradients into this optimizer (before building another one on the same model)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ gradients
    def _accumulate(self, p: torch.Tensor) -> None:
        """post-accumulate-grad hook: this micro-batch's gradient -> the fp32 buffer."""
        g = p.grad
        if g is None:
            return
        acc = self._grads.get(id(p))
        if acc is None:
            self._grads[id(p)] = g.to(torch.float32)
        else:
            acc.add_(g)
        p.grad = None

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        g = self._grads.get(id(p))
        return g if g is not None else p.grad

    def grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gradient) for every parameter that has one: fp32 buffers under master_grad."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                g = self._grad(p)
                if g is not None:
                    out.append((p, g))
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm of the gradients, computed in fp32; with max_norm > 0 the gradients are
        scaled by min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does (fp32
        gradients in place, low-precision ones on their fp32 copy at the step). Returns the norm."""
        grads = [g for _, g in self.grads()]
        self._clip_coef = None
        if not grads:
            return 0.0
        norms = [torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads]
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2)
        if max_norm and max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            low = False
            for g in grads:
                if g.dtype == torch.float32:
                    g.mul_(coef.to(g.device))
                else:
                    low = True
            self._clip_coef = coef if low else None
        return float(total)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if set_to_none:
            self._grads.clear()
        else:
            for g in self._grads.values():
                g.zero_()
        self._clip_coef = None

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MixedPrecisionAdamW.step takes no closure")
        coef = self._clip_coef
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                g = self._grad(p)
                if g is None:
                    continue
                self._update(p, g, coef, lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=wd)
        if self.offload and torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies back to pinned host memory are complete
        self._clip_coef = None
        return None

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
        for k in MOMENTS:
            if k not in st:
                st[k] = self._to_storage(torch.zeros_like(p, dtype=self.moment_dtype), like=p)  # DTensor if p is
        if p.dtype != torch.float32 and "master" not in st:  # e.g. saved with remove_master_weight
            st["master"] = self._to_storage(p.detach().to(torch.float32), like=p)
        return st

    def _update(self, p, g, coef, *, lr, beta1, beta2, eps, wd) -> None:
        st = self._state(p)
        dev = p.device
        if g.dtype != torch.float32:  # bf16 gradient (no master_grad): upcast, clip on the copy
            g = g.to(torch.float32)
            if coef is not None:
                g.mul_(coef.to(dev))
        g = self._fetch(g, dev)
        w = self._fetch(st["master"], dev) if "master" in st else p
        m = self._fetch(st["exp_avg"], dev)
        v = self._fetch(st["exp_avg_sq"], dev)
        m32 = m if m.dtype == torch.float32 else m.to(torch.float32)
        v32 = v if v.dtype == torch.float32 else v.to(torch.float32)
        # torch.optim.adam._single_tensor_adam with decoupled weight decay, operation for operation
        st["step"] += 1
        if wd != 0:
            w.mul_(1 - lr * wd)
        m32.lerp_(g, 1 - beta1)
        v32.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = st["step"].item()
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = (v32.sqrt() / bias_correction2 ** 0.5).add_(eps)
        w.addcdiv_(m32, denom, value=-step_size)
        if m32 is not m:
            m.copy_(m32)
            v.copy_(v32)
        self._store(st["exp_avg"], m)
        self._store(st["exp_avg_sq"], v)
        if w is not p:
            p.copy_(w)  # the parameter is the master rounded to its dtype
            self._store(st["master"], w)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader would cast every state tensor to the parameter dtype (the fp32 master to
        bf16); this one keeps what was saved, then conform_state puts it in place."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                self.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved[i].items()}
        self.conform_state()

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)


@torch.no_grad()
def adopt_master(p: torch.Tensor, st: dict) -> torch.Tensor | None:
    """Take a saved master weight out of a parameter's optimizer state. An fp32 parameter is its own
    master: the saved value is copied into it (an O2 checkpoint resumed under O1 or a sharded layout)
    and None returned; a low-precision parameter gets the master back to keep."""
    master = st.pop("master", None)
    if master is None or p.dtype != torch.float32:
        return master
    p.copy_(master.to(p.device))
    return None


def _is_plain(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return not isinstance(t, DTensor)


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like parameter p: p's own shard when p is a DTensor (tensor parallel), so
    the master weight is sharded exactly like its parameter. No communication (every rank has `full`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor) and not isinstance(full, DTensor):
        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return full


def _accumulate_hook(optimizer: MixedPrecisionAdamW):
    """The gradient hook holds the optimizer weakly: a dropped optimizer leaves p.grad alone."""
    import weakref

    ref = weakref.ref(optimizer)

    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._accumulate(p)

    return hook


@torch.no_grad()
def conform_loaded_state(optimizer) -> None:
    """After a resume: MixedPrecisionAdamW places its state itself; torch's AdamW (fp32 parameters)
    adopts saved master weights as the parameters and takes moments in the parameter dtype."""
    if isinstance(optimizer, MixedPrecisionAdamW):
        optimizer.conform_state()
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            adopt_master(p, st)
            for k in MOMENTS:
                if k in st and st[k].dtype != p.dtype:
                    st[k] = st[k].to(p.dtype)


def strip_master_weights(opt_state: dict | None) -> dict | None:
    """remove_master_weight: a saved optimizer state without the fp32 master copies (rebuilt from
    the saved low-precision weights on load)."""
    if not opt_state or "state" not in opt_state:
        return opt_state
    state = {name: {k: v for k, v in st.items() if k != "master"} for name, st in opt_state["state"].items()}
    return {**opt_state, "state": state}


def lr_factor(step: int, *, kind: str, warmup: int, total: int, base_lr: float, min_lr: float = 0.0,
              num_cycles: float = 0.5, lr_end: float = 1e-7, power: float = 1.0) -> float:
    """Multiplier on the base LR at `step` (0-based count of optimizer steps taken)."""
    if kind != "constant" and step < warmup:
        return step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        r = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))
        floor = min_lr / base_lr if base_lr > 0 else 0.0
        return r * (1.0 - floor) + floor
    if kind == "polynomial":
        if base_lr <= lr_end:
            raise ValueError(f"polynomial schedule needs learning_rate ({base_lr}) > lr_end ({lr_end})")
        if step > total:
            return lr_end / base_lr
        remaining = 1.0 - (step - warmup) / max(1, total - warmup)
        return ((base_lr - lr_end) * remaining**power + lr_end) / base_lr
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup: int, total: int, base_lr: float,
                    min_lr: float, num_cycles: float, lr_end: float, power: float):
    def fn(step: int) -> float:
        return lr_factor(step, kind=kind, warmup=warmup, total=total, base_lr=base_lr, min_lr=min_lr,
                         num_cycles=num_cycles, lr_end=lr_end, power=power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
