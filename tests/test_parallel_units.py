"""Parallel building blocks: degree validation, pipeline splits, option parsing, communication
accounting, data-position conversion, failing ranks, and the vocab-parallel CE's traffic."""
from __future__ import annotations

import pytest
import torch

from ernie_core.errors import ConfigError
from ernie_core.parallel import resolve_dims
from ernie_core.parallel.comm_stats import wire_bytes
from ernie_core.parallel.context import ParallelContext, ParallelOptions
from ernie_core.parallel.data import real_tokens, slice_rows
from ernie_core.parallel.data_parallel import parse_sharding_options
from ernie_core.parallel.pipeline import parse_pp_options, stage_bounds
from ernie_core.parallel.tensor_parallel import parse_tp_options
from ernie_core.parallel.testing import spawn


@pytest.mark.parametrize("world,kw,want", [
    (8, dict(tensor_parallel_degree=2), (4, 1, 1, 2, 0)),
    (8, dict(tensor_parallel_degree=2, sharding="stage1"), (1, 4, 1, 2, 1)),  # -1: all data ranks shard
    (8, dict(pipeline_parallel_degree=2, sharding_parallel_degree=2, sharding="stage3"), (2, 2, 2, 1, 3)),
    (4, dict(sharding_parallel_degree=1, sharding="stage2"), (4, 1, 1, 1, 0)),  # one rank shards nothing
    (1, {}, (1, 1, 1, 1, 0)),
])
def test_resolve_dims(world, kw, want):
    d = resolve_dims(world, **kw)
    assert (d.dp, d.sharding, d.pp, d.tp, d.sharding_stage) == want
    assert d.dp * d.sharding * d.pp * d.tp == world


@pytest.mark.parametrize("world,kw,key", [
    (6, dict(tensor_parallel_degree=4), "tensor_parallel_degree"),
    (8, dict(sharding_parallel_degree=3, sharding="stage1"), "sharding_parallel_degree=3"),
    (4, dict(sharding_parallel_degree=2), "needs a sharding stage"),
])
def test_resolve_dims_errors_name_the_key(world, kw, key):
    with pytest.raises(ConfigError, match=key):
        resolve_dims(world, **kw)


def test_single_process_with_model_parallel_degrees_asks_for_torchrun():
    from ernie_core.config import config_from_dict

    cfg = config_from_dict({"tensor_parallel_degree": 2, "train_dataset_path": "x.jsonl", "max_steps": 1})
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        ParallelContext.from_config(cfg)


def test_stage_bounds_by_layer_count_puts_extra_layers_last():
    assert stage_bounds(18, 2, "layer:Ernie4_5_DecoderLayer|EmptyLayer") == [(0, 9), (9, 18)]
    assert stage_bounds(10, 4, "layer:Ernie4_5_DecoderLayer|EmptyLayer") == [(0, 2), (2, 4), (4, 7), (7, 10)]
    # tail layers count in the split: 18 + 2 empty layers -> 4 equal stages
    assert stage_bounds(18, 4, "layer:Ernie4_5_DecoderLayer|EmptyLayer", add_tail_layers=2) == \
        [(0, 5), (5, 10), (10, 15), (15, 20)]


def test_stage_bounds_explicit_and_uniform():
    assert stage_bounds(57, 2, [0, 29, 57]) == [(0, 29), (29, 57)]
    # uniform also counts the embedding and the head: the end stages get one layer fewer
    assert stage_bounds(6, 2, "uniform") == [(0, 3), (3, 6)]
    assert stage_bounds(8, 4, "uniform") == [(0, 1), (1, 3), (3, 6), (6, 8)]  # items 2,2,3,3


@pytest.mark.parametrize("n,stages,seg,match", [
    (18, 2, [0, 10], "expected 3 increasing bounds"),
    (18, 2, [0, 9, 17], "from 0 to 18"),
    (2, 4, "layer:Ernie4_5_DecoderLayer", "cannot fill 4 pipeline stages"),
    (8, 2, "layer:MLP", "names no decoder layer"),
    (8, 2, "by_param", "expected 'layer:"),
])
def test_stage_bounds_errors(n, stages, seg, match):
    with pytest.raises(ConfigError, match=match):
        stage_bounds(n, stages, seg)


def test_option_strings():
    assert parse_tp_options("sync_param sync_grad sync_moment") == {"sync_param", "sync_grad", "sync_moment"}
    assert parse_pp_options("disable_partial_send_recv enable_clear_every_step_cache enable_delay_scale_loss "
                            "enable_overlap_p2p_comm best_unbalanced_scheduler")
    assert parse_sharding_options("enable_stage1_overlap enable_release_grads")
    for parse, key in ((parse_tp_options, "tensor_parallel_config"), (parse_pp_options, "pipeline_parallel_config"),
                       (parse_sharding_options, "sharding_parallel_config")):
        with pytest.raises(ConfigError, match=key):
            parse("no_such_option")


def test_wire_bytes_ring_model():
    assert wire_bytes("all_reduce", 1000, 4) == 1500  # 2 (n-1)/n S
    assert wire_bytes("all_gather", 1000, 4) == 750
    assert wire_bytes("reduce_scatter", 1000, 2) == 500
    assert wire_bytes("send", 1000, 2) == 1000 and wire_bytes("recv", 1000, 2) == 0
    assert wire_bytes("all_reduce", 1000, 1) == 0


def test_scattered_slices_count_their_own_tokens():
    S = 8
    idx = torch.arange(S, dtype=torch.int32).repeat(2, 1)
    idx[0, :5] = 5  # row 0: one 5-token sample then pads; row 1: all pads
    idx[1, :2] = 2
    batch = {"input_ids": torch.zeros(2, S, dtype=torch.long), "labels": torch.zeros(2, S, dtype=torch.long),
             "position_ids": torch.zeros(2, S, dtype=torch.long),
             "attn_mask_startend_row_indices": idx.view(2, 1, S, 1), "num_tokens": 7}
    assert real_tokens(batch) == 7
    assert slice_rows(batch, 0, 1)["num_tokens"] == 5 and slice_rows(batch, 1, 2)["num_tokens"] == 2


class _Stream:
    def __init__(self):
        self.loaded = None

    def load_state_dict(self, d):
        self.loaded = d


def test_data_position_converts_between_data_worlds():
    ctx = ParallelContext(resolve_dims(1), ParallelOptions())
    s = _Stream()
    # saved by 1 replica (bs 1) after 10 global batches = 10 rows; this run: 1 replica, bs 2 -> 5 batches
    ctx.restore_data_state(s, {"micro_batches": 10, "data_world": 1, "batch_size": 1}, batch_size=2)
    assert s.loaded["micro_batches"] == 5
    with pytest.raises(ConfigError, match="whole number"):
        ctx.restore_data_state(s, {"micro_batches": 3, "data_world": 1, "batch_size": 1}, batch_size=2)
    ctx.restore_data_state(s, {"micro_batches": 4}, batch_size=1)  # older checkpoints: same world assumed
    assert s.loaded["micro_batches"] == 4


def _failing_job(fail_rank: int):
    import time

    import torch.distributed as dist

    from ernie_core.parallel.launch import rank_failure_guard

    rank = dist.get_rank()
    t0 = time.perf_counter()
    try:
        with rank_failure_guard(rank, dist.get_world_size(), owns_group=False):
            if rank == fail_rank:
                raise RuntimeError("injected failure")
            time.sleep(0.5)  # let the failing rank go first
            dist.all_reduce(torch.ones(1))
    except RuntimeError as e:
        return {"error": str(e)[:200], "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


@pytest.mark.distributed
def test_failing_rank_stops_the_others_long_before_the_timeout():
    out = spawn(_failing_job, 2, 1, timeout_s=120)
    assert out[1]["error"] == "injected failure"
    assert out[0]["error"], "the healthy rank's collective should fail once its peer is gone"
    assert out[0]["seconds"] < 30, out[0]


def _vocab_parallel_traffic():
    import torch.distributed as dist

    from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM
    from ernie_core.parallel.comm_stats import CommCounter

    out = {}
    for sharded_logits in (True, False):
        ctx = ParallelContext(resolve_dims(dist.get_world_size(), tensor_parallel_degree=2),
                              ParallelOptions(tensor_parallel_output=sharded_logits), rank=dist.get_rank())
        torch.manual_seed(0)
        cfg = Ernie4_5Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=32)
        model = ctx.parallelize(Ernie4_5ForCausalLM(cfg))
        ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))
        with CommCounter() as counter, ctx.loss_context():
            loss = model(ids, labels=ids).loss
            loss.backward()
        out[sharded_logits] = (float(loss), counter.largest_payload)
    return out


@pytest.mark.distributed
def test_vocab_parallel_cross_entropy_never_gathers_logits():
    """tensor_parallel_output: the largest message is an activation [B,S,H], never logits [B,S,V]."""
    out = spawn(_vocab_parallel_traffic, 2)[0]
    (loss_sharded, biggest_sharded), (loss_gathered, biggest_gathered) = out[True], out[False]
    logits_bytes = 2 * 16 * 4096 * 4
    assert loss_sharded == pytest.approx(loss_gathered, rel=1e-6)
    assert biggest_gathered >= logits_bytes  # the plain path does gather them: the counter sees it
    assert biggest_sharded < logits_bytes / 8, biggest_sharded
