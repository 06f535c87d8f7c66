"""Checkpoint IO: our checkpoints load in transformers and back, sharding + index, Paddle-format
conversion, atomic saves, clear errors."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ernie_core.errors import UserError
from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM
from ernie_core.models import io
from ernie_core.models.convert_paddle import main as convert_main
from test_model import TINY, assert_close, hf_model, ours_from, tiny_config

IDS = torch.arange(40).remainder(128).view(2, 20)


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def to_paddle(hf_state: dict, cfg: Ernie4_5Config) -> dict:
    """Inverse of docs/behaviour.md#checkpoints-and-paddle-names, written independently of io.paddle_to_hf: `model.` ->
    `ernie.`, q|k|v and gate|up joined by columns, every linear [in, out]."""
    out = {}
    for key, t in hf_state.items():
        if key == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[key] = t.t().contiguous()
            continue
        key = "ernie." + key[len("model."):]
        if key.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue  # joined below with their q_proj / gate_proj
        if key.endswith("q_proj.weight"):
            base = key[: -len("q_proj.weight")]
            parts = [hf_state[("model." + base[len("ernie."):]) + f"{n}_proj.weight"] for n in "qkv"]
            out[base + "qkv_proj.weight"] = torch.cat([p.t() for p in parts], dim=1).contiguous()
        elif key.endswith("gate_proj.weight"):
            base = key[: -len("gate_proj.weight")]
            parts = [hf_state["model." + base[len("ernie."):] + f"{n}_proj.weight"] for n in ("gate", "up")]
            out[base + "up_gate_proj.weight"] = torch.cat([p.t() for p in parts], dim=1).contiguous()
        elif key.endswith(("o_proj.weight", "down_proj.weight")):
            out[key] = t.t().contiguous()
        else:
            out[key] = t.contiguous()
    return out


# ---- HF round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fuse_linear", [False, True])
def test_our_checkpoint_loads_in_transformers(tmp_path, tie, fuse_linear):
    ours = ours_from(hf_model(tie=tie), fuse_linear=fuse_linear)
    ours.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    stored = load_file(tmp_path / "ckpt" / "model-00001-of-00001.safetensors")
    assert ("lm_head.weight" in stored) is not tie
    assert "model.layers.0.self_attn.q_proj.weight" in stored and "model.layers.0.mlp.up_proj.weight" in stored
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert_close(logits(hf), logits(ours), 1e-4, "transformers vs ours")
    again = Ernie4_5ForCausalLM.from_pretrained(tmp_path / "ckpt", fuse_linear=not fuse_linear)
    assert_close(logits(again), logits(ours), 1e-6, "reloaded")
    assert (again.lm_head.weight is again.model.embed_tokens.weight) is tie


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_checkpoint_loads_in_ours(tmp_path, tie):
    hf = hf_model(tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    for fuse in (False, True):
        ours = Ernie4_5ForCausalLM.from_pretrained(tmp_path / "hf", fuse_linear=fuse)
        assert_close(logits(ours), logits(hf), 1e-4, f"fuse_linear={fuse}")


def test_tiny_shard_size_writes_several_shards_and_round_trips(tmp_path):
    ours = ours_from(hf_model(tie=False))
    ours.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    expected = io.to_hf_state_dict(ours)
    assert index["weight_map"].keys() == expected.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())
    for shard in shards:
        assert (tmp_path / "ckpt" / shard).stat().st_size < 40_000 + 2_000 or \
            len([k for k, v in index["weight_map"].items() if v == shard]) == 1
    assert_close(logits(Ernie4_5ForCausalLM.from_pretrained(tmp_path / "ckpt")), logits(ours), 0, "round trip")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert_close(logits(hf), logits(ours), 1e-4, "transformers")


def test_dtype_on_load_and_save(tmp_path):
    ours = Ernie4_5ForCausalLM(tiny_config())
    ours.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert Ernie4_5ForCausalLM.from_pretrained(tmp_path / "bf16").lm_head.weight.dtype == torch.float32
    auto = Ernie4_5ForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert auto.lm_head.weight.dtype == torch.bfloat16
    assert auto.lm_head.weight is auto.model.embed_tokens.weight


def test_random_init_from_config_alone(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    fresh = Ernie4_5ForCausalLM(Ernie4_5Config.from_pretrained(tmp_path / "hf"))
    assert fresh.config.hidden_size == TINY["hidden_size"]
    assert logits(fresh).isfinite().all()


# ---- Paddle format -------------------------------------------------------------------------------
def write_paddle_checkpoint(path, hf, tie):
    cfg = tiny_config(tie_word_embeddings=tie)
    path.mkdir()
    save_file(to_paddle(hf.state_dict(), cfg), str(path / "model.safetensors"))
    config = {**cfg.to_dict(), "use_flash_attention": True, "fuse_attn_ffn": True, "paddle_version": "3.0"}
    config.pop("rope_parameters")
    config["rope_theta"] = cfg.rope_theta
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text("{}")


@pytest.mark.parametrize("tie", [True, False])
def test_paddle_checkpoint_loads_and_converts(tmp_path, tie):
    hf = hf_model(tie=tie)
    write_paddle_checkpoint(tmp_path / "paddle", hf, tie)
    direct = Ernie4_5ForCausalLM.from_pretrained(tmp_path / "paddle")  # detected from the `ernie.` keys
    assert_close(logits(direct), logits(hf), 1e-4, "loaded from Paddle")
    assert convert_main([str(tmp_path / "paddle"), str(tmp_path / "hf_copy")]) == 0
    assert (tmp_path / "hf_copy" / "tokenizer_config.json").exists()
    config = json.loads((tmp_path / "hf_copy" / "config.json").read_text())
    assert config["paddle_version"] == "3.0" and config["rope_parameters"]["rope_theta"] == 500000.0
    converted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_copy")
    assert_close(logits(converted), logits(hf), 1e-4, "converted, in transformers")
    assert convert_main([str(tmp_path / "paddle"), str(tmp_path / "hf_copy")]) == 2  # refuses to overwrite


# ---- atomic saves and errors ---------------------------------------------------------------------
def test_save_replaces_model_files_keeps_others_and_survives_a_crash(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    small = Ernie4_5ForCausalLM(tiny_config())
    small.save_pretrained(dst, max_shard_size="40KB")
    (dst / "tokenizer_config.json").write_text("{}")
    small.save_pretrained(dst)  # one shard now: the old shards must go
    names = sorted(p.name for p in dst.iterdir())
    assert names == ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
                     "tokenizer_config.json"]

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(RuntimeError):
        Ernie4_5ForCausalLM(tiny_config()).save_pretrained(dst)
    assert sorted(p.name for p in dst.iterdir()) == names
    assert_close(logits(Ernie4_5ForCausalLM.from_pretrained(dst)), logits(small), 0, "old checkpoint intact")


def test_save_model_files_writes_into_an_existing_dir(tmp_path):
    io.save_model_files(Ernie4_5ForCausalLM(tiny_config()), tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and (tmp_path / "config.json").exists()


def test_load_errors_name_the_path_and_key(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Ernie4_5ForCausalLM.from_pretrained(tmp_path / "missing")
    ckpt = tmp_path / "ckpt"
    tiny_config().save_pretrained(ckpt)
    with pytest.raises(UserError, match=r"ckpt: no model weights"):
        Ernie4_5ForCausalLM.from_pretrained(ckpt)
    (ckpt / "model_state.pdparams").write_bytes(b"")
    with pytest.raises(UserError, match="model_state.pdparams: only safetensors"):
        Ernie4_5ForCausalLM.from_pretrained(ckpt)

    Ernie4_5ForCausalLM(tiny_config()).save_pretrained(ckpt)
    tiny_config(intermediate_size=64).save_pretrained(ckpt)  # config no longer matches the weights
    with pytest.raises(UserError, match=r"ckpt: weight model.layers.0.mlp.down_proj.weight has shape \[64, 96\], "
                                        r"but config.json implies \[64, 64\]"):
        Ernie4_5ForCausalLM.from_pretrained(ckpt)

    tiny_config(tie_word_embeddings=False).save_pretrained(ckpt)  # untied needs lm_head.weight
    with pytest.raises(UserError, match=r"lacks weight lm_head.weight \[128, 64\]"):
        Ernie4_5ForCausalLM.from_pretrained(ckpt)

    tiny_config().save_pretrained(ckpt)
    shard = next(ckpt.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(UserError, match=f"{shard.name}: shard listed in model.safetensors.index.json is missing"):
        Ernie4_5ForCausalLM.from_pretrained(ckpt)


def test_parse_size():
    assert io.parse_size("5GB") == 5 * 10**9
    assert io.parse_size("2GiB") == 2 * 2**30
    assert io.parse_size("500kb") == 500_000
    assert io.parse_size(123) == 123
    with pytest.raises(UserError, match="max_shard_size"):
        io.parse_size("lots")
