"""Paddle AMP op names (amp_custom_white_list / amp_custom_black_list) and what ernie_core's model
does for each (docs/behaviour.md#precision-and-parallelism).

ernie_core's numerics are fixed per op: matmuls, linears, embedding lookups and the attention
kernels run in the compute dtype (bf16) under AMP; the cross-entropy, the loss sums and divisions,
the RoPE sin/cos and the softmax statistics always run in fp32. ERNIEKit's shipped lists say exactly
that, so they are accepted. A list that asks for the opposite of what the model does is an error
(the run could not honour it); a name the model never runs is ignored with a warning.
"""
from __future__ import annotations

import warnings

from ernie_core.errors import ConfigError

LOW, FP32, MIXED = "bf16", "fp32", "mixed"

# op name -> (precision here, what it is in ernie_core's model)
AMP_OPS: dict[str, tuple[str, str]] = {
    "lookup_table": (LOW, "embedding lookup (bf16 table under O2; under O1 the fp32 row, cast by the next matmul)"),
    "lookup_table_v2": (LOW, "embedding lookup (as lookup_table)"),
    "c_embedding": (LOW, "vocab-parallel embedding lookup (as lookup_table)"),
    "embedding": (LOW, "embedding lookup (as lookup_table)"),
    "flash_attn": (LOW, "attention kernels (FlashMask, SDPA): bf16 q/k/v, fp32 softmax statistics"),
    "flash_attn_v2": (LOW, "attention kernels (as flash_attn)"),
    "flash_attn_unpadded": (LOW, "attention kernels (as flash_attn)"),
    "flashmask_attention": (LOW, "attention kernels (as flash_attn)"),
    "matmul": (LOW, "linears, LM head, LoRA products"),
    "matmul_v2": (LOW, "linears, LM head, LoRA products"),
    "mul": (LOW, "linears (Paddle's fc matmul)"),
    "fused_gemm_epilogue": (LOW, "linears with bias (one GEMM)"),
    "fused_linear": (LOW, "linears (fuse_linear)"),
    "reduce_sum": (FP32, "loss sums and token counts"),
    "reduce_mean": (FP32, "means of losses"),
    "softmax_with_cross_entropy": (FP32, "cross-entropy on fp32 logits"),
    "c_softmax_with_cross_entropy": (FP32, "vocab-parallel cross-entropy (fp32)"),
    "cross_entropy": (FP32, "cross-entropy on fp32 logits"),
    "cross_entropy2": (FP32, "cross-entropy on fp32 logits"),
    "log_softmax": (FP32, "DPO log-probabilities (fp32)"),
    "elementwise_div": (FP32, "loss / token count"),
    "divide": (FP32, "loss / token count"),
    "sin": (FP32, "RoPE angles"),
    "cos": (FP32, "RoPE angles"),
    "softmax": (FP32, "attention probabilities (fp32 in every attention path)"),
    "fused_rotary_position_embedding": (FP32, "RoPE rotation (fp32 math, result in the input dtype)"),
    "rms_norm": (MIXED, "RMSNorm: fp32 statistics, result in the input dtype"),
    "fused_rms_norm": (MIXED, "RMSNorm: fp32 statistics, result in the input dtype"),
    "fused_rms_norm_ext": (MIXED, "RMSNorm: fp32 statistics, result in the input dtype"),
    "layer_norm": (MIXED, "RMSNorm: fp32 statistics, result in the input dtype"),
    "swiglu": (MIXED, "SwiGLU in the input dtype"),
    "fused_swiglu": (MIXED, "SwiGLU in the input dtype"),
    "elementwise_add": (MIXED, "residual additions in the input dtype"),
    "elementwise_mul": (MIXED, "elementwise products in the input dtype"),
}


def mapping_text() -> str:
    """The op table in one line, for the option help."""
    low = ", ".join(k for k, (p, _) in AMP_OPS.items() if p == LOW)
    fp32 = ", ".join(k for k, (p, _) in AMP_OPS.items() if p == FP32)
    mixed = ", ".join(k for k, (p, _) in AMP_OPS.items() if p == MIXED)
    return f"bf16 here: {low}. fp32 here: {fp32}. Either list: {mixed}."


def check_amp_lists(white, black, *, warn: bool = True) -> list[str]:
    """ConfigError for a list the model cannot honour; returns (and warns about) unknown names."""
    white, black = list(white or []), list(black or [])
    both = sorted(set(white) & set(black))
    if both:
        raise ConfigError(f"config keys 'amp_custom_white_list' and 'amp_custom_black_list' both name {both}; "
                          "an op runs either in bf16 or in fp32")
    for key, names, wanted in (("amp_custom_white_list", white, LOW), ("amp_custom_black_list", black, FP32)):
        for name in names:
            known = AMP_OPS.get(name)
            if known is None or known[0] in (wanted, MIXED):
                continue
            here = "bf16 (the compute dtype)" if known[0] == LOW else "fp32"
            asked = "bf16" if wanted == LOW else "fp32"
            fix = ("use compute_type fp32 (or fp16_opt_level O0) for fp32 matmuls" if known[0] == LOW
                   else "ernie_core always keeps it in fp32, which is the more precise choice")
            raise ConfigError(f"config key '{key}': {name!r} ({known[1]}) runs in {here} in ernie_core and cannot "
                              f"be switched to {asked}; remove it from the list ({fix})")
    unknown = [n for n in white + black if n not in AMP_OPS]
    if unknown and warn:
        warnings.warn(f"amp_custom_white_list / amp_custom_black_list: {unknown} are not ops ernie_core's model "
                      f"runs; ignored (known: {', '.join(AMP_OPS)})", UserWarning, stacklevel=3)
    return unknown
