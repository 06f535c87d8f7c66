"""Op front doors, one module per op. Each is a `torch.library.custom_op("ernie_core::<op>")` with
a fake kernel and autograd (the backward is its own op), picks its backend per call
(`_backend.choose_backend`: C++ CPU kernels for CPU tensors where built, CUDA/Triton kernels for
CUDA tensors once registered, else the pure-PyTorch reference in reference.py), and documents its
dtype policy under autocast (see _dtypes.py)."""
from .flashmask_attention import flashmask_attention
from .fused_head_ce import fused_head_ce
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = ["flashmask_attention", "fused_head_ce", "rms_norm", "rope", "swiglu"]
