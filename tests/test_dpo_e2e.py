"""End-to-end DPO through `python -m ernie_core.train` on a tiny model: reward accuracy on the
training pairs rises well above chance (full and LoRA), metrics reach trainer_log.jsonl, LoRA runs
save PEFT adapters that resume and merge, malformed data stops the run with file:line."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ernie_core.data import load_tokenizer
from ernie_core.data.testing import make_word_tokenizer, write_jsonl
from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM
from ernie_core.train.cli import main
from ernie_core.train.loggers import read_log

LETTERS = list("abcdefgh")


def build_assets(tmp_path, n_pairs=48, seed=0):
    """A tiny model with saved weights + tokenizer, and pairs 'Reverse: a b c' -> chosen 'c b a',
    rejected the same letters unreversed (so only the order tells them apart)."""
    model_dir = make_word_tokenizer(tmp_path / "model", LETTERS)
    tok = load_tokenizer(model_dir)
    torch.manual_seed(seed)
    cfg = Ernie4_5Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=tok.vocab_size)
    Ernie4_5ForCausalLM(cfg).save_pretrained(model_dir)
    rng = random.Random(seed)
    rows = []
    for _ in range(n_pairs):
        word = rng.sample(LETTERS, rng.randint(3, 5))
        rows.append({"src": "Reverse : " + " ".join(word), "tgt": [],
                     "response": [" ".join(word), " ".join(reversed(word))], "sort": [0, 1]})
    data = write_jsonl(tmp_path / "dpo.jsonl", rows)
    return model_dir, data


def run_args(tmp_path, model_dir, data, *extra):
    config = tmp_path / "dpo.yaml"
    config.write_text("stage: DPO\ncompute_type: fp32\ndisable_tqdm: true\n")
    return [str(config), f"model_name_or_path={model_dir}", f"train_dataset_path={data}",
            f"output_dir={tmp_path / 'out'}", "max_seq_len=64", "per_device_train_batch_size=4", "max_steps=40",
            "learning_rate=1e-3", "warmup_steps=2", "lr_scheduler_type=constant_with_warmup", "logging_steps=1",
            "save_steps=15", "num_samples_each_epoch=200", "do_train=true", "do_eval=false", "beta=0.1", "seed=1", *extra]


def train_lines(out):
    return [r for r in read_log(out) if "loss" in r]


def assert_learned(lines):
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"):
        assert key in lines[0], key
    assert len(lines) == 40
    late = [r["rewards/accuracy"] for r in lines[-8:]]
    assert sum(late) / len(late) >= 0.85, late
    assert lines[-1]["rewards/margin"] > 0 and lines[-1]["loss"] < lines[0]["loss"]


def test_full_dpo_raises_reward_accuracy(tmp_path):
    model_dir, data = build_assets(tmp_path)
    assert main(run_args(tmp_path, model_dir, data, "fine_tuning=Full")) == 0
    lines = train_lines(tmp_path / "out")
    assert lines[0]["rewards/accuracy"] == 0.0  # policy == reference at step 1: no margin yet
    assert_learned(lines)
    assert (tmp_path / "out" / "checkpoint-30" / "config.json").is_file() and (tmp_path / "out" / "config.json").is_file()


def test_lora_dpo_raises_reward_accuracy_and_saves_adapters(tmp_path):
    model_dir, data = build_assets(tmp_path)
    args = run_args(tmp_path, model_dir, data, "fine_tuning=LoRA", "lora_rank=8", "lora_plus_scale=4",
                    "learning_rate=3e-3")
    assert main(args) == 0
    out = tmp_path / "out"
    assert_learned(train_lines(out))
    for where in (out, out / "checkpoint-15"):
        assert (where / "adapter_config.json").is_file() and (where / "adapter_model.safetensors").is_file()
        assert not list(where.glob("model*.safetensors"))  # the base is model_name_or_path, not copied
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir.resolve())
    from ernie_core.export import main as export_main

    assert export_main([str(out), "--merge-lora"]) == 0
    assert (out / "export" / "model.safetensors.index.json").is_file()


def test_lora_resume_continues_from_the_adapter(tmp_path, monkeypatch):
    """Kill after checkpoint-6 and re-run: the resumed steps give the uninterrupted losses."""
    model_dir, data = build_assets(tmp_path, n_pairs=24)
    args = run_args(tmp_path, model_dir, data, "fine_tuning=LoRA", "max_steps=10", "save_steps=6",
                    "per_device_train_batch_size=2")
    assert main(args + [f"output_dir={tmp_path / 'a'}"]) == 0
    ref = [(r["step"], r["loss"]) for r in train_lines(tmp_path / "a")]
    from ernie_core.train.trainer import Trainer

    real_step = Trainer.optimizer_step

    def dying(self):
        if self.global_step == 8:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(Trainer, "optimizer_step", dying)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args + [f"output_dir={tmp_path / 'b'}"])
    monkeypatch.setattr(Trainer, "optimizer_step", real_step)
    assert main(args + [f"output_dir={tmp_path / 'b'}"]) == 0
    got = dict((r["step"], r["loss"]) for r in train_lines(tmp_path / "b"))
    for step, loss in ref:
        if step > 6:
            assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_malformed_preference_line_stops_the_run(tmp_path, capsys):
    model_dir, data = build_assets(tmp_path, n_pairs=4)
    lines = data.read_text().splitlines()
    lines[2] = json.dumps({"src": "x", "tgt": [], "response": ["a", "b"], "sort": [1, 1]})
    data.write_text("\n".join(lines) + "\n")
    assert main(run_args(tmp_path, model_dir, data)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {data}:3: 'sort' values are equal (1); the higher one marks the chosen response"


ROOT = Path(__file__).resolve().parents[1]


def test_example_dpo_config_raises_reward_accuracy(tmp_path, monkeypatch, capsys):
    """examples/configs/dpo_tiny.yaml (LoRA DPO on the tiny example model and the synthetic pairs of
    examples/make_assets.py), shortened: reward accuracy climbs from 0 (policy == reference) to
    clearly above chance, and the run summary says so."""
    monkeypatch.chdir(ROOT)  # the YAML's paths are relative to the repo root
    out = tmp_path / "dpo_tiny"
    assert main(["examples/configs/dpo_tiny.yaml", f"output_dir={out}", "max_steps=30", "logging_steps=1",
                 "do_eval=false", "save_strategy=no", "disable_tqdm=true"]) == 0
    lines = train_lines(out)
    assert len(lines) == 30 and lines[0]["rewards/accuracy"] == 0.0
    late = [r["rewards/accuracy"] for r in lines[-10:]]
    assert sum(late) / len(late) >= 0.75, late
    assert lines[-1]["rewards/margin"] > 0
    assert "reward accuracy (chosen preferred over rejected): 0% at step 1 ->" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()


def test_pipeline_parallel_dpo_is_accepted(tmp_path, monkeypatch):
    """DPO runs under pipeline parallelism (issue 11; equivalence with one process: test_dpo_dist.py)."""
    from ernie_core.config import load_config
    from ernie_core.train.dpo import DPOObjective

    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/configs/dpo_tiny.yaml", ["pipeline_parallel_degree=2"])
    DPOObjective.from_config(cfg).validate(cfg, None)  # no ConfigError


def test_eval_cli_on_dpo_outputs(tmp_path, capsys):
    """`python -m ernie_core.eval` with stage DPO: a LoRA output's eval loss (reference = its base,
    adapters off) equals the trainer's final eval loss; a full output is scored against ref_model=
    when given (equal to the trainer's eval) and reference-free otherwise (said in the line)."""
    from ernie_core.eval import main as eval_main

    model_dir, data = build_assets(tmp_path, n_pairs=24)
    for mode in ("LoRA", "Full"):
        out = tmp_path / mode
        args = run_args(tmp_path, model_dir, data, f"fine_tuning={mode}", "max_steps=4", f"output_dir={out}",
                        f"eval_dataset_path={data}", "do_eval=true", "evaluation_strategy=steps", "eval_steps=4",
                        "save_strategy=no")
        assert main(args) == 0
        final = [r for r in read_log(out) if "eval_loss" in r][-1]["eval_loss"]
        capsys.readouterr()
        eval_args = [args[0]] + [a for a in args[1:] if not a.startswith("model_name_or_path=")]
        extra = [f"ref_model={model_dir}"] if mode == "Full" else []
        assert eval_main(eval_args + [f"model_name_or_path={out}"] + extra) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert got["eval_loss"] == pytest.approx(final, rel=1e-5), mode
        assert got["reference"] == ("adapters off" if mode == "LoRA" else str(model_dir))
        assert 0.0 <= got["rewards/accuracy"] <= 1.0 and got["eval_pairs"] == 24
    assert eval_main(eval_args + [f"model_name_or_path={tmp_path / 'Full'}"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["reference"] == "none (reference_free)" and got["eval_loss"] != pytest.approx(final, rel=1e-6)
