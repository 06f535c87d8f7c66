"""`python -m ernie_core.export`: LoRA merge into a transformers-loadable checkpoint (same logits as
base + adapter), sharding, re-export of a full model, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
import transformers

from ernie_core.export import main
from ernie_core.peft import apply_lora, save_model_adapter
from test_lora import logits, randomize_adapters
from test_model import assert_close, hf_model, ours_from


def lora_run(tmp_path, rslora=False):
    """A base model dir and a LoRA output dir naming it; returns (out_dir, adapted model)."""
    ours = ours_from(hf_model(tie=False))
    ours.save_pretrained(tmp_path / "base")
    apply_lora(ours, rank=4, alpha=-1, rslora=rslora)
    randomize_adapters(ours)
    out = tmp_path / "run"
    out.mkdir()
    save_model_adapter(ours, out, base_model_name_or_path=str(tmp_path / "base"))
    return out, ours


def test_merge_lora_loads_in_transformers_with_the_same_logits(tmp_path, capsys):
    out, ours = lora_run(tmp_path, rslora=True)
    assert main([str(out), "--merge-lora", "--max-shard-size", "40KB"]) == 0
    export = out / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((export / s).is_file() for s in shards)
    assert not list(export.glob("*.tmp"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert_close(logits(hf), logits(ours), 1e-4, "merged checkpoint in transformers vs base + adapter")


def test_cli_module_entry_point_and_out_dir(tmp_path):
    out, ours = lora_run(tmp_path)
    target = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-m", "ernie_core.export", str(out), "--merge-lora", "--out", str(target)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(target)
    assert_close(logits(hf), logits(ours), 1e-4, "merged via python -m")


def test_full_model_is_resharded(tmp_path):
    ours = ours_from(hf_model())
    ours.save_pretrained(tmp_path / "full")
    assert main([str(tmp_path / "full"), "--out", str(tmp_path / "x"), "--max-shard-size", "30KB"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    assert_close(logits(hf), logits(ours), 1e-4, "re-sharded")


def test_errors_are_one_line(tmp_path, capsys):
    out, _ = lora_run(tmp_path)
    assert main([str(out)]) == 2
    assert "pass --merge-lora" in capsys.readouterr().err
    assert main([str(tmp_path / "base"), "--merge-lora"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "nowhere")
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    assert main([str(out), "--merge-lora"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main([str(out), "--merge-lora", "--base", str(tmp_path / "base")]) == 0
