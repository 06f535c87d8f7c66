"""DPO under every parallel layout reproduces the single-process run (gloo, 2 and 4 processes).

Five fp32 DPO steps of the tiny example model (examples/configs/dpo_tiny.yaml, full and LoRA) per
layout through the real CLI entry point: data parallel, sharding stage1/2/3, tensor parallel (with
and without sequence parallel / tensor_parallel_output), TP x stage3, and pipeline parallel (PP2
full / LoRA / continued from a checkpoint, PP2 x TP2, PP2 x stage2): the pipeline runs a no-grad
reference pass through its stages, then the policy's schedule with the DPO loss on the last stage. Per step, the loss, the
chosen/rejected log-probs and the gradient norm agree with the single-process run on the same global
batch within 1e-5 relative, reward accuracy is identical, the eval losses agree, and the saved
model equals it. Full DPO runs refresh the reference (ref_model_update_steps=3), so both the initial
and the copied reference are covered.

The rewards β(π − ref) are differences of nearly equal log-probs (about 1e-3 against log-probs of
about 20 here), so their tolerance is 1e-5 relative to the log-probs they come from:
|Δ reward| <= 1e-5 · β · |logp|.

Besides the numbers, every run reports (from inside the trainer, on every rank) how the reference
is held: a frozen copy sharded exactly like the policy (TP placements, FSDP shards), never in the
optimizer, never requiring grad; LoRA runs hold no second copy at all.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ernie_core.parallel.testing import spawn
from ernie_core.train.testing import run_cli
from test_parallel_layouts import _summary, assert_close_rel, assert_same_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-5
BETA = 0.1

FULL = ["fine_tuning=Full", "learning_rate=1e-3", "ref_model_update_steps=3"]
LORA = ["fine_tuning=LoRA"]
ACCUM4 = ["gradient_accumulation_steps=4"]
# Full DPO after SFT: continue_training from a trained checkpoint (one of the runs here), whose weights
# the reference loads from model_name_or_path (under FSDP: every rank cuts its own shards of it).
CONT = FULL + ["continue_training=true", "model_name_or_path={root}/ref_full_accum2"]
REFERENCES = {"ref_full_accum2": FULL, "ref_full_accum4": FULL + ACCUM4, "ref_lora_accum4": LORA + ACCUM4,
              "ref_lora_accum2": LORA,
              "ref_cont_accum4": CONT + ACCUM4}  # after ref_full_accum2, whose output it starts from
TP2 = ["tensor_parallel_degree=2"]
PP2 = ["pipeline_parallel_degree=2"]
# name: (processes, single-process reference, how the reference model is held, overrides).
# Data-parallel layouts read two slices per global batch: their reference accumulates 4 micro-batches.
LAYOUTS = {
    "dp2_full": (2, "ref_full_accum4", "shards", FULL),
    "dp2_lora": (2, "ref_lora_accum4", "adapters", LORA),
    "stage1_full": (2, "ref_full_accum4", "copy", FULL + ["sharding=stage1"]),
    "stage1_lora": (2, "ref_lora_accum4", "adapters", LORA + ["sharding=stage1"]),
    "stage2_full": (2, "ref_full_accum4", "shards", FULL + ["sharding=stage2"]),
    "stage2_lora": (2, "ref_lora_accum4", "adapters", LORA + ["sharding=stage2"]),
    "stage3_full": (2, "ref_full_accum4", "shards", FULL + ["sharding=stage3"]),
    "stage3_cont": (2, "ref_cont_accum4", "shards", CONT + ["sharding=stage3"]),
    "stage3_lora": (2, "ref_lora_accum4", "adapters", LORA + ["sharding=stage3"]),
    "tp2_full": (2, "ref_full_accum2", "copy", FULL + TP2),
    "tp2_sp_full": (2, "ref_full_accum2", "copy",
                    FULL + TP2 + ["sequence_parallel=true", "tensor_parallel_output=false"]),
    "tp2_stage3_full": (4, "ref_full_accum4", "shards", FULL + TP2 + ["sharding=stage3"]),
    "pp2_full": (2, "ref_full_accum2", "copy", FULL + PP2),
    "pp2_lora": (2, "ref_lora_accum2", "adapters", LORA + PP2),
    "pp2_cont": (2, "ref_cont_accum4", "copy", CONT + ACCUM4 + PP2),  # the reference's stages cut from a checkpoint
    "pp2_tp2_full": (4, "ref_full_accum2", "copy", FULL + PP2 + TP2),
    "pp2_stage2_full": (4, "ref_full_accum4", "shards", FULL + PP2 + ["sharding=stage2"]),
}


def argv(out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "examples/configs/dpo_tiny.yaml"), f"output_dir={out}",
            f"model_name_or_path={ROOT / 'examples/tiny_model'}",
            f"train_dataset_path={ROOT / 'examples/data/dpo-train.jsonl'}",
            f"eval_dataset_path={ROOT / 'examples/data/dpo-eval.jsonl'}", "max_seq_len=64",
            "per_device_train_batch_size=1", "gradient_accumulation_steps=2", "max_steps=5", "logging_steps=1",
            "warmup_steps=1", "num_samples_each_epoch=400", "do_eval=true", "evaluation_strategy=no",
            "per_device_eval_batch_size=2", "max_evaluate_steps=1", "save_strategy=no", "disable_tqdm=true",
            "overwrite_output_dir=true", *(e.format(root=out.parent) for e in extra)]


def reference_facts(trainer) -> dict:
    """How this rank holds the DPO reference, read at the end of training (before the final save)."""
    from ernie_core.parallel.reference import reshard
    from ernie_core.parallel.dtensor import local_tensor as _local

    model, obj = trainer.model, trainer.objective
    reshard(model)  # the sharded parameters are the registered ones
    params = list(model.parameters())
    opt = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    placements_match = True
    if obj.ref_model is not None:
        kind, ref = "copy", list(obj.ref_model.parameters())
        placements_match = all(getattr(r, "placements", None) == getattr(p, "placements", None)
                               and _local(r).shape == _local(p).shape for r, p in zip(ref, params))
    elif obj._ref_shards is not None:
        kind, ref = "shards", list(obj._ref_shards.tensors)
        placements_match = [t.shape for t in ref] == [_local(p).shape for p in params]
    else:
        kind, ref = "adapters", []
    ref_ptrs = {_local(t).data_ptr() for t in ref}
    return {
        "kind": kind, "placements_match": placements_match, "stages": list(getattr(model, "stage_ids", [0])), "n_ref": len(ref), "n_params": len(params),
        "ref_local": sum(_local(t).numel() for t in ref), "policy_local": sum(_local(p).numel() for p in params),
        "full": sum(p.numel() for p in params),
        "trainable_local": sum(_local(p).numel() for p in params if p.requires_grad),
        "opt_local": sum(_local(p).numel() for p in opt),
        "opt_holds_ref": any(_local(p).data_ptr() in ref_ptrs for p in opt),
        "ref_requires_grad": any(t.requires_grad for t in ref),
    }


def run_and_inspect(runs: list[list[str]]) -> dict:
    """run_cli on this rank, recording reference_facts of every run (by output folder name)."""
    from ernie_core.train.trainer import Trainer

    facts, real_finish = {}, Trainer.finish

    def finish(self):
        facts[self.output_dir.name] = reference_facts(self)
        return real_finish(self)

    Trainer.finish = finish
    try:
        run_cli(runs)
    finally:
        Trainer.finish = real_finish
    return facts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_layouts")
    run_cli([argv(root / name, *extra) for name, extra in REFERENCES.items()])
    facts = {}
    for world in (4, 2):
        jobs = [argv(root / name, *extra) for name, (n, _, _, extra) in LAYOUTS.items() if n == world]
        for rank_facts in spawn(run_and_inspect, world, jobs):
            for name, f in rank_facts.items():
                facts.setdefault(name, []).append(f)
    return root, facts


def train_lines(out: Path) -> dict[int, dict]:
    from ernie_core.train.loggers import read_log

    return {r["step"]: r for r in read_log(out) if "loss" in r}


def assert_rewards_close(got: dict[int, dict], want: dict[int, dict], what: str) -> None:
    bad = {}
    for step, w in want.items():
        g = got[step]
        tol = REL * BETA * max(abs(w["logps/chosen"]), abs(w["logps/rejected"]))
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
            if abs(g[key] - w[key]) > tol:
                bad[(step, key)] = (g[key], w[key], tol)
        if g["rewards/accuracy"] != w["rewards/accuracy"]:
            bad[(step, "rewards/accuracy")] = (g["rewards/accuracy"], w["rewards/accuracy"])
    assert not bad, f"{what}: (got, single-process, tolerance) differ at {bad}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dpo_layout_matches_single_process(runs, name):
    root, _ = runs
    _, ref, _, _ = LAYOUTS[name]
    want, got = train_lines(root / ref), train_lines(root / name)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5]
    assert want[1]["rewards/accuracy"] == 0.0  # policy == reference at step 1: no margin yet
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert_close_rel({s: r[key] for s, r in got.items()}, {s: r[key] for s, r in want.items()}, f"{name} {key}")
    assert_rewards_close(got, want, name)
    got_eval, want_eval = _summary(root / name), _summary(root / ref)
    for key in ("eval_before", "eval_after"):
        assert_close_rel({key: got_eval[key]["eval_loss"]}, {key: want_eval[key]["eval_loss"]}, f"{name} {key}")
    assert_same_model(root / name, root / ref)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reference_is_sharded_like_the_policy_and_not_trained(runs, name):
    _, facts = runs
    world, _, kind, extra = LAYOUTS[name]
    ranks = facts[name]
    assert len(ranks) == world
    for f in ranks:
        assert f["kind"] == kind, f
        assert not f["opt_holds_ref"] and not f["ref_requires_grad"], f
        if kind == "adapters":  # LoRA: the base with adapters off is the reference, no second copy
            assert f["n_ref"] == 0
            continue
        # one frozen tensor per policy parameter, with the policy's local shape (and DTensor placements)
        assert f["n_ref"] == f["n_params"] and f["placements_match"], f
        assert f["ref_local"] == f["policy_local"], f
        if "sharding=stage1" not in extra:  # stage1's optimizer holds slices instead of the parameters
            assert f["opt_local"] == f["trainable_local"], f
    if kind == "shards" and ("sharding=stage3" in extra or "sharding=stage2" in extra):
        tp = 2 if "tensor_parallel_degree=2" in extra else 1
        # each sharding rank holds 1/N of the reference of its pipeline stages (all of the model
        # without PP); TP ranks split it further (norms replicated)
        for stages in {tuple(f["stages"]) for f in ranks}:
            group = [f for f in ranks if tuple(f["stages"]) == stages]
            total_ref, full = sum(f["ref_local"] for f in group), group[0]["full"]
            assert total_ref <= full * tp and total_ref >= full, (stages, total_ref, full)
            assert max(f["ref_local"] for f in group) < full * 0.75
