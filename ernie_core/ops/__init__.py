"""Op front doors. Each op picks its backend per call (see _backend.py) and has a pure-PyTorch
reference in reference.py, which is also the fallback."""
from .api import flashmask_attention, fused_head_ce, rms_norm, rope, swiglu

__all__ = ["flashmask_attention", "fused_head_ce", "rms_norm", "rope", "swiglu"]
