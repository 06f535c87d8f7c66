"""ernie_core: SFT, LoRA and DPO training for ERNIE 4.5 models on PyTorch, with hand-written kernels."""
__version__ = "0.1.0"
