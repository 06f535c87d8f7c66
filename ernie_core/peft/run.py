"""LoRA in a training run: where the base weights come from, and what checkpoints hold.

A LoRA checkpoint (and the final output_dir) holds the PEFT adapter (adapter_config.json +
adapter_model.safetensors, `peft_format`) plus the optimizer/trainer state the trainer writes. The
frozen base is not copied into every checkpoint: it is model_name_or_path. Only when the base was
freshly initialised (continue_training: false, demos) is it saved next to the adapter, so resume and
`python -m ernie_core.export --merge-lora` find it there. Either way
`Ernie4_5ForCausalLM.from_pretrained(output_dir)` and `python -m ernie_core.eval` load base + adapter.

`lora_path` starts the adapters from a PEFT adapter or from ERNIEKit's (lora_config.json +
peft_model*.safetensors / lora_model_state.pdparams, `erniekit_format`). ERNIEKit's r, lora_alpha
and rslora must equal the run's lora_rank / lora_alpha / rslora (alpha compared after -1 -> 2r);
the run stops with the key and both values otherwise, rather than silently adopting them, since they
also decide the shapes and scale of what is trained next. lora_plus_scale is only a learning-rate
multiplier and is taken from the run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .lora import LoraSpec, apply_lora
from ..errors import UserError
from ..models.io import write_hf_checkpoint
from .peft_format import adapter_format, load_adapter, save_adapter

LORA_SUFFIXES = (".lora_A", ".lora_B")


def _has_model_files(path: Path) -> bool:
    return (path / "model.safetensors.index.json").is_file() or any(path.glob("model*.safetensors"))


def lora_base_source(resume_dir, model_name_or_path, continue_training: bool) -> tuple[str, bool]:
    """(where the base config/weights are, whether to load weights from there) for a LoRA run."""
    if resume_dir is not None and _has_model_files(Path(resume_dir)):
        return str(resume_dir), True
    return str(model_name_or_path), bool(continue_training)


def _base_name(model_name_or_path) -> str:
    """Absolute path for a local base, so the adapter still finds it from another directory."""
    path = Path(model_name_or_path)
    return str(path.resolve()) if path.exists() else str(model_name_or_path)


class LoraRun:
    """The adapters of one run and how to write them."""

    def __init__(self, spec: LoraSpec, model_config, base_path: str, save_base: bool):
        self.spec, self.model_config = spec, model_config
        self.base_name, self.save_base = _base_name(base_path), save_base

    @classmethod
    def setup(cls, model, *, rank: int, alpha: float, rslora: bool, bf16_base: bool, adapter_path, base_path,
              save_base: bool) -> "LoraRun":
        """Freeze the base (bf16 when training in bf16: no fp32 copy of frozen weights), add adapters,
        and start them from `adapter_path` (a checkpoint being resumed, or lora_path) when given."""
        spec = apply_lora(model, rank=rank, alpha=alpha, rslora=rslora,
                          base_dtype=torch.bfloat16 if bf16_base else None)
        if adapter_path is not None:
            if not Path(adapter_path).is_dir():
                raise UserError(f"lora_path {adapter_path}: no such directory")
            if adapter_format(adapter_path) is None:
                raise UserError(f"lora_path {adapter_path}: no LoRA adapter there (expected adapter_config.json + "
                                "adapter_model.safetensors as ernie_core and peft save them, or ERNIEKit's "
                                "lora_config.json + peft_model*.safetensors / lora_model_state.pdparams)")
            load_adapter(model, adapter_path)
        return cls(spec, model.config, base_path, save_base)

    def write(self, path, model_state: dict[str, torch.Tensor]) -> None:
        """Adapter files (and the base, when it exists nowhere else) into the existing dir `path`.
        model_state: the trainer's full {name: tensor} state (HF names plus `<module>.lora_A/B`)."""
        adapter = {k: v for k, v in model_state.items() if k.endswith(LORA_SUFFIXES)}
        save_adapter(path, adapter, self.spec, model_config=self.model_config, base_model_name_or_path=self.base_name)
        if self.save_base:
            base = {k: v for k, v in model_state.items() if not k.endswith(LORA_SUFFIXES)}
            write_hf_checkpoint(base, self.model_config, path)
