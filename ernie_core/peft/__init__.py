"""LoRA adapters (docs/behaviour.md#lora): apply, save/load in PEFT format, read ERNIEKit's, merge."""
from ernie_core.peft.lora import (LoRALinear, LoraSpec, adapters_disabled, apply_lora, lora_modules,
                                  lora_plus_multiplier, lora_scaling, lora_state, merge_lora, resolve_alpha)
from ernie_core.peft.peft_format import (adapter_format, is_adapter_dir, load_adapter, read_adapter,
                                         read_any_adapter, save_adapter, save_model_adapter)
from ernie_core.peft.erniekit_format import read_erniekit_adapter
from ernie_core.peft.loading import find_lora_base, load_lora_pretrained

__all__ = [
    "LoRALinear", "LoraSpec", "adapter_format", "adapters_disabled", "apply_lora", "find_lora_base",
    "load_lora_pretrained", "is_adapter_dir", "load_adapter",
    "lora_modules", "lora_plus_multiplier", "lora_scaling", "lora_state", "merge_lora", "read_adapter",
    "read_any_adapter", "read_erniekit_adapter", "resolve_alpha", "save_adapter", "save_model_adapter",
]
