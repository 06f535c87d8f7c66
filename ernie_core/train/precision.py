"""Mixed precision of a training run (docs/behaviour.md#precision-and-parallelism): the AMP level, O2's low-precision
parameters, and the optimizer options that go with them.

| level | parameters                         | forward/backward                  | optimizer update           |
|-------|------------------------------------|-----------------------------------|----------------------------|
| O0    | fp32                               | fp32 (no autocast)                | fp32                       |
| O1    | fp32                               | autocast: matmuls/attention bf16  | fp32, on the parameters    |
| O2    | bf16 (router gate/bias stay fp32)  | bf16 weights, autocast still on   | fp32 master weights        |

compute_type fp32 is O0 whatever fp16_opt_level says. Under O2 the update runs on the fp32 master
copy held by the optimizer (`MixedPrecisionAdamW`) and is rounded into the bf16 parameter;
`amp_master_grad` accumulates and clips the gradients in fp32, otherwise they accumulate in bf16
in `p.grad` and are upcast at the step. Under a parallel layout the master weights are kept once,
sharded like their parameter (FSDP shards, ZeRO-1 slices, TP DTensor shards; parallel/context.py). Ops that need fp32 (cross-entropy, loss sums and divisions,
RoPE sin/cos, softmax statistics, norm statistics) compute in fp32 inside the model and the op
kernels at every level, which is what ERNIEKit's amp_custom_black_list asks for.

LoRA: the frozen base is bf16 already (LoraRun); the adapters are the only trainable weights and
stay fp32 under O2 (they are their own master weights; a bf16 copy would save a few MB and cost
a cast per step), so O2 changes nothing for them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import ConfigError

# Parameters that stay fp32 under O2 (ERNIE's `_keep_in_fp32_modules`: the MoE router; none in the
# dense model) and the LoRA adapters (see the module docstring).
KEEP_FP32 = ("mlp.gate.", "e_score_correction_bias")
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def keeps_fp32(name: str) -> bool:
    return any(k in name for k in KEEP_FP32) or name.endswith(ADAPTER_SUFFIXES)


@dataclass
class AmpPlan:
    level: str = "O1"  # effective level: O0 when there is no low-precision compute dtype
    dtype: torch.dtype | None = torch.bfloat16  # autocast / O2 parameter dtype; None at O0
    master_grad: bool = False
    offload: bool = False
    moment_dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, cfg) -> "AmpPlan":
        p = cfg.precision
        if p.fp16:
            raise ConfigError("compute_type fp16 (fp16 AMP with loss scaling) is not supported yet; use bf16")
        dtype = torch.bfloat16 if p.bf16 else None
        level = p.fp16_opt_level if dtype is not None else "O0"
        if level == "O0":
            dtype = None
        custom = cfg.train.optim == "adamw_custom"
        return cls(level=level, dtype=dtype, master_grad=level == "O2" and bool(p.amp_master_grad),
                   offload=bool(cfg.memory.offload_optim) or (custom and bool(cfg.fp8.tensorwise_offload_optimizer)),
                   moment_dtype=torch.bfloat16 if custom and cfg.fp8.use_lowprecision_moment else torch.float32)

    @property
    def custom_optimizer(self) -> bool:
        """Whether the run needs MixedPrecisionAdamW (anything but plain fp32 AdamW state on device)."""
        return self.level == "O2" or self.offload or self.moment_dtype != torch.float32

    def autocast(self, device_type: str):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.dtype)

    @torch.no_grad()
    def cast_model(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """O2: every floating parameter to the compute dtype in place (identity kept, so tied weights
        stay tied), except KEEP_FP32. Returns {name: fp32 value before the cast} for the trainable
        ones: the master weights start from them, not from the rounded bf16 values."""
        if self.level != "O2":
            return {}
        seeds = {}
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.dtype == self.dtype or keeps_fp32(name):
                continue
            if p.requires_grad and p.dtype == torch.float32:
                seeds[name] = p.data
            p.data = p.data.to(self.dtype)
        return seeds

    def describe(self) -> str:
        if self.level == "O0":
            return "fp32 (O0: no autocast)"
        parts = [f"{self.level} bf16"]
        if self.level == "O2":
            parts.append("fp32 master weights" + (", fp32 gradients" if self.master_grad else ", bf16 gradients"))
        if self.moment_dtype != torch.float32:
            parts.append("bf16 Adam moments")
        if self.offload:
            parts.append("optimizer state in host memory")
        return ", ".join(parts)


def memory_report(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients (incl. fp32 buffers) and optimizer state (incl. master weights)."""
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    grads += sum(g.numel() * g.element_size() for g in getattr(optimizer, "_grads", {}).values())
    state = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {"params": params, "grads": grads, "optimizer_state": state}
