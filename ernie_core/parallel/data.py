"""`distributed_dataloader`: one rank reads and packs the data, every rank gets its slice.

Without it every rank builds the same deterministic stream and keeps its own slice of each global
batch (docs/behaviour.md#mixing-and-virtual-epochs), which costs every rank the tokenization and packing of all data.
With it, global rank 0 alone builds the stream of whole global batches (bs x dp x sharding rows)
and scatters to each rank the rows of its data-parallel slot; ranks that share a slot (the tp and
pp ranks of one replica) receive the same rows. The batches are identical to the per-rank streams,
so a run may switch between the two modes on resume.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

_ROW_KEYS = ("input_ids", "labels", "position_ids", "attn_mask_startend_row_indices")


def real_tokens(batch: dict) -> int:
    """Non-pad tokens of a packed batch: a pad column j has start row j (no row sees it)."""
    idx = batch["attn_mask_startend_row_indices"][:, 0, :, 0]
    cols = torch.arange(idx.shape[-1], dtype=idx.dtype)
    return int((idx > cols).sum())


def slice_rows(batch: dict, lo: int, hi: int) -> dict:
    out = {k: batch[k][lo:hi].clone() for k in _ROW_KEYS if k in batch}
    out["num_tokens"] = real_tokens(out) if "attn_mask_startend_row_indices" in out else int(batch["num_tokens"])
    return out


class ScatteredStream:
    """Drop-in for the train stream (iterator, state_dict, packing_efficiency) fed by rank 0."""

    def __init__(self, reader, data_rank_of: list[int], batch_size: int):
        self.reader = reader  # the global-batch stream on rank 0, None elsewhere
        self.data_rank_of, self.bs = data_rank_of, batch_size
        self._consumed = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        slices = None
        if self.reader is not None:
            batch = next(self.reader)
            slices = [slice_rows(batch, d * self.bs, (d + 1) * self.bs) for d in self.data_rank_of]
        out = [None]
        dist.scatter_object_list(out, slices, src=0)
        self._consumed += 1
        return out[0]

    @property
    def packing_efficiency(self) -> float:
        return self.reader.packing_efficiency if self.reader is not None else 1.0

    def state_dict(self) -> dict:
        # Global batches consumed = micro-batches of every per-rank stream: the same state either way.
        return self.reader.state_dict() if self.reader is not None else {"micro_batches": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._consumed = int(state["micro_batches"])
        if self.reader is not None:
            self.reader.load_state_dict(state)

    def close(self) -> None:
        if self.reader is not None and hasattr(self.reader, "close"):
            self.reader.close()


def build_scattered_stream(objective, cfg, tok, data_rank_of: list[int], data_world: int) -> ScatteredStream:
    """Rank 0 builds the stream of whole global batches; `data_rank_of[g]` is global rank g's slot."""
    bs = cfg.train.per_device_train_batch_size
    reader = None
    if dist.get_rank() == 0:
        whole = copy.deepcopy(cfg)
        whole.train.per_device_train_batch_size = bs * data_world
        reader = objective.build_stream(whole, tok, dp_rank=0, dp_world=1)
    return ScatteredStream(reader, data_rank_of, bs)
