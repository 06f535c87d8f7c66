"""Config layer: every option present, ERNIEKit configs load, overrides, errors, derived values,
round trip, generated docs, unsupported options."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_core.config import (KEY_SECTION, TrainConfig, config_from_dict, config_to_yaml, iter_options,
                               load_config, unsupported_options)
from ernie_core.config import docs
from ernie_core.config.support import is_unsupported
from ernie_core.errors import ConfigError, UserError

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
REFERENCE = Path(__file__).parents[2] / "shared" / "spec" / "training_config_reference.md"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def raises(overrides: list[str], match: str, path=None) -> ConfigError:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)  # the CLI prints errors on one line
    return info.value


# ---------------------------------------------------------------- schema


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"parameter table not found at {REFERENCE} (shared/ absent)")
def test_every_reference_option_is_a_config_key():
    names = re.findall(r"^\| `([a-z0-9_]+)` \|", REFERENCE.read_text(encoding="utf-8"), flags=re.M)
    assert len(names) > 80  # the table parsed
    missing = sorted(set(names) - set(KEY_SECTION))
    assert not missing, f"options of the reference table without a config field: {missing}"


def test_every_field_has_help_and_implemented_flag():
    for section, f, _ in iter_options():
        assert f.metadata["help"].strip(), f.name
        assert isinstance(f.metadata["implemented"], bool), f.name
        assert hasattr(getattr(TrainConfig(), section), f.name)


def test_contract_sections_exist():
    cfg = TrainConfig()
    for name in ("basic", "eval", "train", "dist", "memory", "checkpoint", "accel", "precision", "sft",
                 "lora", "dpo", "fp8", "moe"):
        assert dataclasses.is_dataclass(getattr(cfg, name))


def test_defaults_are_resolved_defaults():
    assert load_config(None, []) == TrainConfig()


# ---------------------------------------------------------------- real ERNIEKit configs


def test_erniekit_sft_full_config():
    cfg = load_config(FIXTURES / "erniekit_0.3b_sft_8k.yaml", [])
    assert cfg.basic.fine_tuning == "Full" and cfg.lora.lora is False
    assert cfg.train.learning_rate == pytest.approx(1e-5) and cfg.train.max_seq_len == 8192
    assert cfg.train.per_device_train_batch_size == 1 and cfg.eval.per_device_eval_batch_size == 1
    assert cfg.train.optim == "adamw_custom" and cfg.fp8.tensorwise_offload_optimizer is True
    assert cfg.dist.sharding == "stage1" and cfg.dist.pipeline_parallel_config.split()[0] == "enable_delay_scale_loss"
    assert cfg.precision.amp_custom_white_list[:2] == ["lookup_table", "lookup_table_v2"]
    assert cfg.precision.bf16 is True and cfg.precision.fp16 is False
    assert cfg.basic.logging_dir == "./vdl_log" and cfg.eval.eval_steps == 100
    assert cfg.train.num_train_epochs == 1.0 and cfg.train.max_steps == -1


def test_erniekit_dpo_lora_config():
    cfg = load_config(FIXTURES / "erniekit_0.3b_dpo_lora_8k.yaml", [])
    assert cfg.basic.stage == "DPO" and cfg.lora.lora is True
    assert cfg.lora.scaling() == pytest.approx(128 / math.sqrt(32))
    assert cfg.lora.lora_plus_scale == 12 and cfg.dpo.ref_model_update_steps == -1
    assert cfg.eval.evaluation_strategy == "epoch" and cfg.checkpoint.save_strategy == "epoch"
    assert cfg.memory.loss_subbatch_seqlen == 1024
    assert cfg.dist.sequence_parallel is False  # tensor_parallel_degree 1
    assert cfg.precision.scale_loss == 8192.0 and cfg.accel.distributed_dataloader is True


def test_erniekit_weight_only_and_fp8_configs():
    wint = load_config(FIXTURES / "erniekit_21b_sft_wint8mix_lora_8k.yaml", [])
    assert wint.basic.compute_type == "wint4/8" and wint.basic.weight_quantize_algo == "weight_only_mix"
    assert wint.lora.scaling() == 2.0 and wint.dist.moe_group == "mp"
    fp8 = load_config(FIXTURES / "erniekit_300b_sft_fp8_8k.yaml", [])
    assert fp8.basic.weight_quantize_algo == "fp8linear" and fp8.dist.pp_seg_method == [0, 29, 57]
    assert fp8.fp8.optim_shard_num == 8 and fp8.checkpoint.unified_checkpoint_config == "ignore_merge_optimizer"
    assert fp8.dist.sequence_parallel is True and fp8.moe.num_nextn_predict_layers == 0


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_erniekit_configs_round_trip(path):
    cfg = load_config(path, [])
    assert load_config(None, _as_overrides(cfg)) == cfg


def _as_overrides(cfg: TrainConfig) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for section in cfg.to_dict().values() for k, v in section.items()]


# ---------------------------------------------------------------- overrides and coercion


def test_overrides_win_over_file(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-4\nmax_steps: 5\nfine_tuning: Full\n")
    cfg = load_config(path, ["max_steps=10", "learning_rate=1e-5", "train.seed=7", "lora=true"])
    assert cfg.train.max_steps == 10 and cfg.train.seed == 7
    assert cfg.train.learning_rate == 1e-5  # "1e-5" is a string to PyYAML
    assert cfg.lora.lora is True and cfg.basic.fine_tuning == "LoRA"  # the override replaces fine_tuning


def test_value_coercion():
    cfg = load_config(None, ["save_strategy=no", "num_train_epochs=2", "max_steps=1e3", "lora_alpha=16",
                             "train_dataset_path=a.jsonl, b.jsonl", "train_dataset_prob=[0.8, 0.2]",
                             "pp_seg_method=[0,3,6]", "no_recompute_layers=1,2", "save_total_limit=None",
                             "amp_custom_white_list=matmul flash_attn", "distributed_dataloader=1",
                             "stage=sft", "fine_tuning=full", "model_name_or_path="])
    assert cfg.checkpoint.save_strategy == "no" and cfg.train.num_train_epochs == 2.0
    assert cfg.train.max_steps == 1000 and cfg.lora.lora_alpha == 16.0
    assert cfg.train.train_dataset_path == "a.jsonl,b.jsonl" and cfg.train.train_dataset_prob == "0.8,0.2"
    assert cfg.train.train_dataset_type == "erniekit,erniekit"  # unset type repeated per source
    assert cfg.dist.pp_seg_method == [0, 3, 6] and cfg.memory.no_recompute_layers == [1, 2]
    assert cfg.checkpoint.save_total_limit is None and cfg.precision.amp_custom_white_list == ["matmul", "flash_attn"]
    assert cfg.accel.distributed_dataloader is True and cfg.basic.stage == "SFT"
    assert cfg.basic.fine_tuning == "Full" and cfg.basic.model_name_or_path is None


def test_nested_form_and_aliases(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 2.0e-5\nlora:\n  lora_rank: 16\nbatch_size: 4\n"
                           "use_attn_mask_startend_row_indices: false\n")
    cfg = load_config(path, [])
    assert cfg.train.learning_rate == 2e-5 and cfg.lora.lora_rank == 16
    assert cfg.train.per_device_train_batch_size == 4 and cfg.eval.per_device_eval_batch_size == 4
    assert cfg.accel.use_attn_mask_start_row_indices is False


def test_config_from_dict():
    cfg = config_from_dict({"max_steps": 10, "fine_tuning": "Full", "train": {"learning_rate": "1e-5"}})
    assert cfg == load_config(None, ["max_steps=10", "fine_tuning=Full", "learning_rate=1e-5"])
    with pytest.raises(ConfigError, match="config section 'train' must be a mapping"):
        config_from_dict({"train": 5})


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=0, max_value=10, allow_nan=False), st.integers(min_value=1, max_value=10**6))
def test_numbers_survive_yaml_and_overrides(lr, steps):
    cfg = load_config(None, [f"learning_rate={lr!r}", f"max_steps={steps}"])
    assert cfg.train.learning_rate == lr and cfg.train.max_steps == steps
    assert load_config(None, _as_overrides(cfg)) == cfg


# ---------------------------------------------------------------- errors


def test_unknown_key_names_closest(tmp_path):
    err = raises(["learning_rat=1"], "unknown config key")
    assert str(err) == "unknown config key 'learning_rat' (did you mean 'learning_rate'?)"
    raises([], r"unknown config key 'lora_rnk' \(did you mean 'lora_rank'\?\)",
           write(tmp_path, "lora:\n  lora_rnk: 8\n"))
    raises(["zzzzzz=1"], r"^unknown config key 'zzzzzz'$")
    raises(["train.lora_rank=8"], "belongs to section 'lora'")
    raises(["trian.seed=1"], "unknown section 'trian'.*did you mean 'train'")
    raises(["seed"], "key=value")


@pytest.mark.parametrize("override, match", [
    ("learning_rate=abc", "'learning_rate': expected a number, got 'abc'"),
    ("max_steps=1.5", "'max_steps': expected an integer, got 1.5"),
    ("lora_rank=true", "'lora_rank': expected an integer, got true"),
    ("do_train=maybe", "'do_train': expected true or false, got 'maybe'"),
    ("output_dir=null", "'output_dir': expected str, got null"),
    ("pp_seg_method={a: 1}", "'pp_seg_method': .* is not a valid split method"),
])
def test_type_errors(override, match):
    raises([override], match)


@pytest.mark.parametrize("override, match", [
    ("hidden_dropout_prob=1.0", r"'hidden_dropout_prob': 1.0 is out of range \(expected 0 <= value < 1\)"),
    ("layerwise_lr_decay_bound=0", r"expected 0 < value <= 1"),
    ("learning_rate=-1e-5", r"'learning_rate'.*expected value >= 0"),
    ("max_steps=0", r"expected -1 or value >= 1"),
    ("lr_scheduler_type=cosin", r"'cosin' is not a valid choice.*did you mean 'cosine'"),
    ("evaluation_strategy=sometimes", "expected one of: no, steps, epoch"),
    ("loss_type=kto", "expected one of: sigmoid, hinge, ipo, simpo, dpop, kto_pair"),
    ("sharding=stage4", r"'stage4' is not a valid item"),
    ("sharding=stage1 stage2", "more than one stage"),
    ("sharding=stage1 offload", "offload needs stage2 or stage3"),
    ("unified_checkpoint_config=async_sve", "did you mean 'async_save'"),
    ("train_dataset_prob=0.5,x", "'x' is not a number"),
    ("compute_type=nf4", "'compute_type'"),
    ("hadamard_block_size=24", "not a power of two"),
    ("pp_seg_method=[3,2]", "not a valid layer split"),
    ("tensor_parallel_degree=0", "expected -1 or value >= 1"),
])
def test_range_and_choice_errors(override, match):
    raises([override], match)


def test_file_errors(tmp_path):
    raises([], "config file not found: .*nope.yaml", tmp_path / "nope.yaml")
    raises([], r"bad.yaml:3: YAML syntax error", write(tmp_path, "a: 1\nb: [1, 2\nc: 3\n", "bad.yaml"))
    raises([], r"dup.yaml:2: config key 'seed' is given twice", write(tmp_path, "seed: 1\nseed: 2\n", "dup.yaml"))
    raises([], "expected a mapping", write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert issubclass(ConfigError, UserError)


@pytest.mark.parametrize("overrides, match", [
    (["bf16=true", "fp16=true"], "'bf16' and 'fp16' are both true"),
    (["compute_type=bf16", "fp16=true"], "'fp16': true conflicts with compute_type 'bf16'"),
    (["save_strategy=steps", "save_steps=0"], "'save_steps': 0 must be > 0"),
    (["do_eval=true", "eval_steps=0"], "'eval_steps': 0 must be > 0"),
    (["train_dataset_path=a,b", "train_dataset_prob=1.0"], r"'train_dataset_path' \(2 items\) and 'train_dataset_prob'"),
    (["eval_dataset_path=a", "eval_dataset_type=erniekit,alpaca"], "'eval_dataset_type' \\(2 items\\)"),
    (["stage=DPO", "loss_type=dpop", "reference_free=true"], "needs a reference model"),
    (["stage=DPO", "loss_type=ipo", "label_smoothing=0.1"], "label smoothing only applies"),
    (["fine_tuning=Full", "lora_path=adapters/"], "'lora_path' is set but LoRA is off"),
    (["lr_scheduler_type=polynomial", "learning_rate=1e-8"], "needs learning_rate > lr_end"),
    (["pipeline_parallel_degree=2", "pp_seg_method=[0,3,6,9]"], "expected 3 layer bounds"),
    (["dataset_type=map"], "'offline_dataset_path' is not set"),
])
def test_conflicts(overrides, match):
    raises(overrides, match)


def test_conflicting_keys_in_one_file(tmp_path):
    raises([], "'fine_tuning' .* and 'lora' .* disagree", write(tmp_path, "fine_tuning: Full\nlora: true\n"))
    raises([], "'per_device_train_batch_size' and 'batch_size' set the same option",
           write(tmp_path, "per_device_train_batch_size: 2\nbatch_size: 4\n", "alias.yaml"))


# ---------------------------------------------------------------- derived values


def test_derived_run_values():
    cfg = load_config(None, ["output_dir=/tmp/x", "do_eval=true", "logging_steps=7", "batch_size=3"])
    assert cfg.basic.logging_dir == "/tmp/x"
    assert cfg.eval.evaluation_strategy == "steps" and cfg.eval.eval_steps == 7
    assert cfg.eval.per_device_eval_batch_size == 3
    on = load_config(None, ["evaluation_strategy=epoch"])
    assert on.basic.do_eval is True
    assert load_config(None, ["tensor_parallel_degree=-1", "sequence_parallel=true"]).dist.sequence_parallel is False


@pytest.mark.parametrize("overrides, bf16, fp16, algo, compute", [
    ([], True, False, None, "bf16"),
    (["compute_type=fp16"], False, True, None, "fp16"),
    (["fp16=true"], False, True, None, "fp16"),
    (["bf16=false"], False, False, None, "fp32"),
    (["compute_type=wint8"], True, False, "weight_only_int8", "wint8"),
    (["weight_quantize_algo=fp8_linear"], True, False, "fp8linear", "fp8"),
])
def test_compute_type(overrides, bf16, fp16, algo, compute):
    cfg = load_config(None, overrides)
    assert (cfg.precision.bf16, cfg.precision.fp16, cfg.basic.weight_quantize_algo, cfg.basic.compute_type) \
        == (bf16, fp16, algo, compute)


def test_fp8_recipe():
    cfg = load_config(None, ["compute_type=fp8", "optim=adamw"])
    assert cfg.train.optim == "adamw_custom" and cfg.fp8.use_lowprecision_moment is True
    assert cfg.fp8.tensorwise_offload_optimizer is True and cfg.fp8.optim_shard_num == 8


def test_fine_tuning_default_is_lora():
    assert load_config(None, []).lora.lora is True
    assert load_config(None, ["fine_tuning=Full"]).lora.lora is False
    assert load_config(None, ["lora=false"]).basic.fine_tuning == "Full"


@pytest.mark.parametrize("overrides, expected", [
    (["lora_rank=32"], 2.0),                                       # alpha -1 -> 2r
    (["lora_rank=32", "lora_alpha=128", "rslora=true"], 128 / math.sqrt(32)),
    (["lora_rank=16", "lora_alpha=32"], 2.0),
    (["lora_rank=16", "rslora=true"], 4 / 4.0),                     # alpha -1 -> 4 under rslora
    (["lora_rank=64", "lora_alpha=128", "rslora_plus=true"], 4 / 8.0),
])
def test_lora_scaling(overrides, expected):
    assert load_config(None, overrides).lora.scaling() == pytest.approx(expected)


def test_rslora_plus_and_dpo_derivations():
    lora = load_config(None, ["rslora_plus=true", "fuse_linear=true"]).lora
    assert (lora.rslora, lora.lora_plus_scale, lora.lora_alpha) == (True, 4.0, 4.0)
    dpo = load_config(None, ["stage=DPO", "loss_type=orpo", "max_seq_len=1000", "fine_tuning=Full",
                             "ref_model_update_steps=5"])
    assert dpo.dpo.reference_free is True and dpo.dpo.sft_loss_ratio == 1.0
    assert dpo.dpo.max_prompt_len == 990 and dpo.dpo.ref_model_update_steps == 5
    assert load_config(None, ["stage=DPO", "ref_model_update_steps=5"]).dpo.ref_model_update_steps == -1


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("overrides", [
    [],
    ["fine_tuning=Full", "compute_type=fp32", "do_eval=true", "output_dir=out dir/x"],
    ["stage=DPO", "loss_type=orpo", "compute_type=fp8", "train_dataset_path=a.jsonl,b.jsonl",
     "amp_custom_black_list=[sin, cos]", "pp_seg_method=[0,4,8]", "report_to=tensorboard"],
    ["compute_type=fp16", "rslora_plus=true", "unified_checkpoint_config=async_save", "save_strategy=no"],
])
def test_yaml_round_trip(tmp_path, overrides):
    cfg = load_config(None, overrides)
    text = config_to_yaml(cfg)
    assert load_config(write(tmp_path, text), []) == cfg
    for key in KEY_SECTION:  # every option is printed
        assert re.search(rf"^{key}: ", text, flags=re.M), key
    nested = write(tmp_path, yaml.safe_dump(cfg.to_dict()), "nested.yaml")
    assert load_config(nested, []) == cfg


# ---------------------------------------------------------------- docs and support


def test_docs_are_up_to_date():
    assert docs.DOC_PATH.exists(), "run: python -m ernie_core.config.docs"
    assert docs.DOC_PATH.read_text(encoding="utf-8") == docs.render(), \
        "docs/config.md is stale; run: python -m ernie_core.config.docs"
    assert docs.main(["--check"]) == 0


def test_docs_check_flags_stale_file(tmp_path):
    stale = write(tmp_path, "old\n", "config.md")
    assert docs.main(["--check", "--output", str(stale)]) == 1
    assert docs.main(["--output", str(stale)]) == 0 and docs.main(["--check", "--output", str(stale)]) == 0


def test_unsupported_options():
    assert unsupported_options(load_config(None, [])) == []  # LoRA (the default fine_tuning) is implemented
    full = ["fine_tuning=Full"]
    assert unsupported_options(load_config(None, full)) == []
    # options that do nothing in this run are not reported
    inert = full + ["pipeline_parallel_config=enable_delay_scale_loss", "lora_rank=64", "beta=0.2",
                    "sharding=stage1", "sharding_parallel_degree=1", "tensor_parallel_output=false",
                    "compute_type=fp32", "apply_hadamard=false", "loss_subbatch_seqlen=64"]
    assert unsupported_options(load_config(None, inert)) == []
    got = unsupported_options(load_config(None, full + ["tensor_parallel_degree=2", "stage=DPO", "beta=0.2",
                                                        "fuse_rope=true", "fp16_opt_level=O2", "sharding=stage1",
                                                        "weight_quantize_algo=weight_only_int8", "moe_group=mp"]))
    assert got == ["weight_quantize_algo", "compute_type", "moe_group"]
    supported = full + ["recompute=true", "recompute_granularity=core_attn", "release_grads=true",
                        "use_flash_attention=false", "greedy_intokens=false", "dataloader_num_workers=2",
                        "amp_master_grad=true", "scale_loss=1024", "save_strategy=epoch", "max_evaluate_steps=3",
                        "fp16_opt_level=O2", "offload_optim=true", "optim=adamw_custom",
                        "use_lowprecision_moment=true", "tensorwise_offload_optimizer=true",
                        "amp_custom_white_list=matmul flash_attn", "amp_custom_black_list=sin cos",
                        "unified_checkpoint_config=enable_all_options remove_master_weight ignore_merge_optimizer"]
    assert unsupported_options(load_config(None, supported)) == []
    assert unsupported_options(load_config(None, full + ["compute_type=fp16"])) == ["compute_type", "fp16"]


def test_unsupported_follows_implemented_metadata():
    assert is_unsupported("fp16", True) and not is_unsupported("fp16", False)
    for key, value in (("offload_optim", True), ("fp16_opt_level", "O2"), ("amp_custom_white_list", ["matmul"]),
                       ("tensorwise_offload_optimizer", True), ("use_lowprecision_moment", True),
                       ("unified_checkpoint_config", "async_save")):
        assert not is_unsupported(key, value), key
    assert not is_unsupported("lora", True) and not is_unsupported("fuse_rope", True)
    assert not is_unsupported("recompute", True)
    assert not is_unsupported("compute_type", "fp32") and is_unsupported("compute_type", "fp16")


def test_unsupported_options_of_erniekit_configs():
    # precision/optimizer/checkpoint options of both 0.3B configs are implemented: they run unchanged
    sft = unsupported_options(load_config(FIXTURES / "erniekit_0.3b_sft_8k.yaml", []))
    assert sft == []
    dpo = unsupported_options(load_config(FIXTURES / "erniekit_0.3b_dpo_lora_8k.yaml", []))
    assert dpo == []
    assert not {"stage", "lora", "lora_rank", "rslora"} & set(dpo)
    # tensor/pipeline/sharding options are inert at degree 1, distributed_dataloader without TP/PP
    assert not {"tensor_parallel_config", "sharding", "use_sp_callback", "distributed_dataloader"} & set(dpo)


# ---------------------------------------------------------------- AMP op lists, unified checkpoint options


def test_amp_lists_of_shipped_configs_match_the_model():
    from ernie_core.config.amp_ops import AMP_OPS, FP32, LOW, check_amp_lists

    cfg = load_config(FIXTURES / "erniekit_0.3b_sft_8k.yaml", [])
    white, black = cfg.precision.amp_custom_white_list, cfg.precision.amp_custom_black_list
    assert all(AMP_OPS[n][0] == LOW for n in white) and all(AMP_OPS[n][0] == FP32 for n in black)
    assert check_amp_lists(white, black) == []


@pytest.mark.parametrize("override, match", [
    ("amp_custom_black_list=matmul", "'matmul'.*cannot be switched to fp32"),
    ("amp_custom_white_list=softmax_with_cross_entropy", "always keeps it in fp32"),
])
def test_amp_list_the_model_cannot_honour_is_an_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_amp_list_same_op_in_both_lists_is_an_error():
    with pytest.raises(ConfigError, match="both name"):
        load_config(None, ["amp_custom_white_list=rms_norm", "amp_custom_black_list=rms_norm"])


def test_amp_list_unknown_op_warns_and_is_ignored():
    with pytest.warns(UserWarning, match="not ops ernie_core's model runs; ignored"):
        cfg = load_config(None, ["amp_custom_white_list=matmul my_custom_op", "amp_custom_black_list=rms_norm"])
    assert cfg.precision.amp_custom_white_list == ["matmul", "my_custom_op"]


def test_unified_checkpoint_enable_all_options_expands():
    cfg = load_config(None, ["unified_checkpoint_config=enable_all_options"])
    assert cfg.checkpoint.unified_checkpoint_config.split() == [
        "enable_all_options", "skip_save_model_weight", "master_weight_compatible", "async_save"]
