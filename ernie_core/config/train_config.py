"""`TrainConfig`: one attribute per section, and the index from flat YAML keys to sections."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator

from .sections_algo import DpoSection, Fp8Section, LoraSection
from .sections_perf import AccelSection, DistSection, MemorySection, MoeSection, PrecisionSection
from .sections_run import BasicSection, CheckpointSection, EvalSection, SftSection, TrainSection


@dataclass
class TrainConfig:
    """The whole run configuration. Read it as `cfg.<section>.<key>`; build it with `load_config`."""

    basic: BasicSection = field(default_factory=BasicSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)
    memory: MemorySection = field(default_factory=MemorySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    accel: AccelSection = field(default_factory=AccelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    sft: SftSection = field(default_factory=SftSection)
    lora: LoraSection = field(default_factory=LoraSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    fp8: Fp8Section = field(default_factory=Fp8Section)
    moe: MoeSection = field(default_factory=MoeSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {key: value}} with every option, defaults included (lists copied)."""
        return {name: {f.name: _copy(getattr(getattr(self, name), f.name)) for f in fields}
                for name, fields in SECTION_FIELDS.items()}

    def get(self, key: str) -> Any:
        """Value of a flat key, e.g. cfg.get('learning_rate')."""
        return getattr(getattr(self, KEY_SECTION[key]), key)


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, list) else v


SECTION_CLASSES: dict[str, type] = {f.name: f.default_factory().__class__  # type: ignore[misc]
                                    for f in dataclasses.fields(TrainConfig)}
SECTION_FIELDS: dict[str, tuple[dataclasses.Field, ...]] = {
    name: dataclasses.fields(cls) for name, cls in SECTION_CLASSES.items()}
# resolved annotations per key (the section modules use postponed annotations)
KEY_TYPE: dict[str, Any] = {}
KEY_FIELD: dict[str, dataclasses.Field] = {}
KEY_SECTION: dict[str, str] = {}
for _name, _cls in SECTION_CLASSES.items():
    _hints = typing.get_type_hints(_cls)
    for _f in SECTION_FIELDS[_name]:
        if _f.name in KEY_SECTION:  # a flat YAML file needs every key to be unique
            raise RuntimeError(f"config key {_f.name!r} is defined in {KEY_SECTION[_f.name]} and {_name}")
        KEY_SECTION[_f.name], KEY_FIELD[_f.name], KEY_TYPE[_f.name] = _name, _f, _hints[_f.name]

# ERNIEKit / PaddleFormers spellings that mean the same option
ALIASES: dict[str, str] = {
    "batch_size": "per_device_train_batch_size",
    "use_attn_mask_startend_row_indices": "use_attn_mask_start_row_indices",
    "sharding_degree": "sharding_parallel_degree",
}


def iter_options() -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(section, field, resolved type) for every option, in section order."""
    for name, fields in SECTION_FIELDS.items():
        for f in fields:
            yield name, f, KEY_TYPE[f.name]
