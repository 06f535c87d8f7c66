"""Typed run configuration: dataclasses per section, YAML + overrides, validation, docs.

    from ernie_core.config import load_config
    cfg = load_config("run.yaml", ["max_steps=10", "lora=true"])   # raises ConfigError
    cfg.train.learning_rate, cfg.lora.scaling()
"""
from .dump import config_to_yaml
from .loader import config_from_dict, load_config
from .sections_algo import DpoSection, Fp8Section, LoraSection
from .sections_perf import AccelSection, DistSection, MemorySection, MoeSection, PrecisionSection
from .sections_run import BasicSection, CheckpointSection, EvalSection, SftSection, TrainSection
from .support import unsupported_options
from .train_config import ALIASES, KEY_SECTION, TrainConfig, iter_options

__all__ = [
    "TrainConfig", "load_config", "config_from_dict", "config_to_yaml", "unsupported_options",
    "iter_options", "KEY_SECTION", "ALIASES",
    "BasicSection", "EvalSection", "TrainSection", "DistSection", "MemorySection", "CheckpointSection",
    "AccelSection", "PrecisionSection", "SftSection", "LoraSection", "DpoSection", "Fp8Section", "MoeSection",
]
