"""End-to-end SFT runs on the tiny example model: logging, checkpoints, resume, CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ernie_core.train.cli import main
from ernie_core.train.loggers import read_log

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples/configs/sft_tiny.yaml")


def args(tmp_path, *extra):
    """Small, fast variant of the default run."""
    return [CONFIG, f"output_dir={tmp_path / 'out'}", f"model_name_or_path={ROOT / 'examples/tiny_model'}",
            f"train_dataset_path={ROOT / 'examples/data/sft-train.jsonl'},{ROOT / 'examples/data/alpaca-train.json'}",
            f"eval_dataset_path={ROOT / 'examples/data/sft-eval.jsonl'}", "max_seq_len=96",
            "per_device_train_batch_size=2", "max_steps=6", "logging_steps=1", "eval_steps=3", "save_steps=3",
            "max_evaluate_steps=2", "eval_generate_samples=2", "disable_tqdm=true", "warmup_steps=2",
            "num_samples_each_epoch=400", *extra]


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in read_log(out_dir) if "loss" in r]


def test_run_logs_saves_and_reports(tmp_path, capsys):
    assert main(args(tmp_path)) == 0
    out = tmp_path / "out"
    log = read_log(out)
    train_lines = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "epoch", "packing_efficiency"):
        assert key in train_lines[0], key
    assert any("eval_loss" in r and "eval_ppl" in r for r in log)
    assert 0.0 < train_lines[-1]["packing_efficiency"] <= 1.0
    # checkpoints in HF layout plus training state; rotation keeps the newest 2
    ck = out / "checkpoint-6"
    for name in ("config.json", "optimizer.pt", "scheduler.json", "rng_state.pth", "data_state.json",
                 "trainer_state.json", "tokenizer.json"):
        assert (ck / name).exists(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    # final model in output_dir, loadable; TensorBoard events in logging_dir
    from ernie_core.models import Ernie4_5ForCausalLM

    Ernie4_5ForCausalLM.from_pretrained(str(out))
    assert list(out.glob("events.out.tfevents.*"))
    report = json.loads((out / "run_report.json").read_text())
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert "held-out exact-match accuracy" in capsys.readouterr().out
    # `python -m ernie_core.eval` on the saved model reproduces the trainer's final eval loss
    from ernie_core.eval import main as eval_main

    assert eval_main(args(tmp_path, f"model_name_or_path={out}")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_loss"] == pytest.approx(report["eval_loss_after"], rel=1e-5)


@pytest.mark.parametrize("extra", [(), ("attention_probs_dropout_prob=0.2",)], ids=["plain", "attention_dropout"])
def test_resume_after_crash_gives_identical_losses(tmp_path, monkeypatch, extra):
    """Bitwise resume; with attention dropout too (the kernel's keep masks come from the torch RNG
    state, which the checkpoint saves and restores)."""

    def run_args(path, *more):
        return args(path, *extra, *more)

    uninterrupted = tmp_path / "a"
    assert main(run_args(uninterrupted)) == 0
    ref = losses(uninterrupted / "out")

    from ernie_core.train.trainer import Trainer

    crashed = tmp_path / "b"
    real_step = Trainer.optimizer_step

    def dying_step(self):
        if self.global_step == 4:  # after checkpoint-3 was written, before step 5 completes
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(Trainer, "optimizer_step", dying_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(run_args(crashed, "overwrite_output_dir=false"))
    monkeypatch.setattr(Trainer, "optimizer_step", real_step)
    assert main(run_args(crashed, "overwrite_output_dir=false")) == 0  # the same command resumes
    assert losses(crashed / "out") == ref  # bitwise on CPU


def test_ignore_save_lr_and_optim(tmp_path):
    assert main(args(tmp_path, "ignore_save_lr_and_optim=true", "max_steps=3", "do_eval=false")) == 0
    ck = tmp_path / "out" / "checkpoint-3"
    assert (ck / "trainer_state.json").exists() and not (ck / "optimizer.pt").exists()


def test_bf16_and_workers(tmp_path):
    assert main(args(tmp_path, "compute_type=bf16", "dataloader_num_workers=1", "max_steps=2",
                     "do_eval=false", "save_strategy=no")) == 0
    assert len(losses(tmp_path / "out")) == 2


def test_max_steps_from_epochs(tmp_path):
    assert main(args(tmp_path, "max_steps=-1", "num_train_epochs=1", "train_dataset_path=" +
                     str(ROOT / "examples/data/sft-eval.jsonl"), "train_dataset_prob=1.0",
                     "train_dataset_type=erniekit", "per_device_train_batch_size=8", "max_seq_len=256",
                     "do_eval=false", "save_strategy=no")) == 0
    steps = [s for s, _ in losses(tmp_path / "out")]
    assert 1 <= steps[-1] < 40  # one pass over ~100 eval rows packed 8 rows a step


def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ernie_core.train", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_print_config_and_user_errors(tmp_path):
    r = cli(CONFIG, "learning_rate=1e-4", "--print-config")
    assert r.returncode == 0 and "learning_rate: 0.0001" in r.stdout
    r = cli(CONFIG, "learning_rat=1e-4")
    assert r.returncode == 2 and "learning_rate" in r.stderr and "Traceback" not in r.stderr
    r = cli(CONFIG, "moe_group=mp", "tensor_parallel_degree=2", "use_sparse_head_and_loss_fn=true",
            f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "not supported yet" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a", "tgt": "b"}\n{"src": "a", "tgt": \n')
    r = cli(CONFIG, f"output_dir={tmp_path / 'o'}", f"train_dataset_path={bad}", "train_dataset_prob=1.0",
            "train_dataset_type=erniekit")
    assert r.returncode == 2, r.stderr
    assert f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
    r = cli(CONFIG, f"output_dir={tmp_path / 'o'}", f"model_name_or_path={tmp_path / 'nope'}")
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
