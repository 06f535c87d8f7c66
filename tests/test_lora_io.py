"""LoRA outputs load like any model, and lora_path reads ERNIEKit adapters (issue #4).

One tiny LoRA SFT run (module fixture) gives the in-training model with its adapters; its
output_dir / checkpoints must load through `Ernie4_5ForCausalLM.from_pretrained` (merged and
unmerged), `python -m ernie_core.eval` and export with the same logits and loss. ERNIEKit adapters
(Paddle keys and layout, fused q|k|v and gate|up, safetensors single / sharded + index, pdparams)
written by `write_erniekit_adapter` load via lora_path and from_pretrained as the same function.
"""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ernie_core.errors import UserError
from ernie_core.models import Ernie4_5ForCausalLM
from ernie_core.models.io import _load_model_dir
from ernie_core.peft import apply_lora, lora_modules
from ernie_core.peft.run import LoraRun
from ernie_core.train.cli import main as train_main
from test_train_e2e import args as run_args

IDS = torch.tensor([[1, 5, 9, 33, 70, 101, 140, 200, 250, 17, 3, 2], [4, 8, 15, 16, 23, 42, 99, 108, 300, 7, 11, 2]])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
RANK = 4


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def assert_close(a, b, atol, what):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"{what}: max diff {diff:.3g} > {atol}"


def lora_args(tmp, *extra):
    return run_args(tmp, "fine_tuning=LoRA", f"lora_rank={RANK}", "max_steps=4", "save_steps=2", "learning_rate=1e-2",
                    "eval_generate_samples=0", "max_evaluate_steps=1", *extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step LoRA run on a freshly initialised tiny base: (output_dir, the trainer's model with
    adapters after the last step, its final eval loss)."""
    from ernie_core.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("lora_run")
    seen = []
    real_finish = Trainer.finish

    def finish(self):
        seen.append(self)
        return real_finish(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "finish", finish)
        assert train_main(lora_args(tmp)) == 0
    out = tmp / "out"
    summary = json.loads((out / "train_summary.json").read_text())
    return out, seen[0].model.eval(), summary["eval_after"]["eval_loss"]


def split_dirs(out, tmp):
    """The run's base (model files + tokenizer) and its adapter alone, in two dirs, the adapter
    naming the base: what a LoRA run on a pretrained base leaves."""
    base, adapter = tmp / "base", tmp / "adapter"
    base.mkdir()
    adapter.mkdir()
    for f in out.iterdir():
        if f.name == "config.json" or f.name.startswith("model") or f.name in TOKENIZER_FILES:
            shutil.copy2(f, base / f.name)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(out / name, adapter / name)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return base, adapter


# ---- LoRA run outputs ------------------------------------------------------------------------------
def test_output_dir_loads_with_its_adapter_merged_and_unmerged(run):
    out, trained, _ = run
    want = logits(trained)
    base_only = logits(_load_model_dir(out, None, {}))
    assert (want - base_only).abs().max() > 1e-3, "the adapter must change the model for this test to mean anything"
    unmerged = Ernie4_5ForCausalLM.from_pretrained(out, merge_lora=False)
    assert lora_modules(unmerged) and unmerged.lora_spec.rank == RANK
    assert_close(logits(unmerged), want, 1e-6, "unmerged from_pretrained vs the trained model")
    merged = Ernie4_5ForCausalLM.from_pretrained(out)  # default: merged, a plain model
    assert not lora_modules(merged) and not hasattr(merged, "lora_spec")
    assert_close(logits(merged), want, 1e-4, "merged from_pretrained vs the trained model")
    ck = Ernie4_5ForCausalLM.from_pretrained(out / "checkpoint-4")
    assert_close(logits(ck), logits(merged), 0.0, "checkpoint-4 = final")


def test_base_from_base_model_name_or_path_and_missing_base(run, tmp_path):
    out, trained, _ = run
    base, adapter = split_dirs(out, tmp_path)
    assert_close(logits(Ernie4_5ForCausalLM.from_pretrained(adapter)), logits(trained), 1e-4, "base elsewhere")
    shutil.move(base, tmp_path / "moved")
    with pytest.raises(UserError) as e:
        Ernie4_5ForCausalLM.from_pretrained(adapter)
    assert str(adapter) in str(e.value) and str(base) in str(e.value) and "base_model_name_or_path" in str(e.value)
    again = Ernie4_5ForCausalLM.from_pretrained(adapter, base_model=tmp_path / "moved")
    assert_close(logits(again), logits(trained), 1e-4, "base_model= override")


def test_eval_cli_on_lora_output_matches_training(run, tmp_path, capsys):
    from ernie_core.eval import main as eval_main

    out, _, eval_after = run
    capsys.readouterr()
    assert eval_main(lora_args(tmp_path, f"model_name_or_path={out}", "eval_generate_samples=1")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_loss"] == pytest.approx(eval_after, rel=1e-5)
    assert "held_out_accuracy" in result
    _, adapter = split_dirs(out, tmp_path)  # no tokenizer next to the adapter: the base's is used
    assert eval_main(lora_args(tmp_path, f"model_name_or_path={adapter}")) == 0
    assert json.loads(capsys.readouterr().out.strip())["eval_loss"] == pytest.approx(eval_after, rel=1e-5)


def test_export_merge_lora_of_the_output(run, tmp_path):
    from ernie_core.export import main as export_main

    out, trained, _ = run
    assert export_main([str(out), "--merge-lora", "--out", str(tmp_path / "x")]) == 0
    assert_close(logits(Ernie4_5ForCausalLM.from_pretrained(tmp_path / "x")), logits(trained), 1e-4, "exported")


# ---- ERNIEKit adapters -----------------------------------------------------------------------------
def paddle_lora_state(model, prefix="ernie.") -> dict[str, torch.Tensor]:
    """Our (shared-A) adapters as ERNIEKit keys them: one adapter on the fused q|k|v and gate|up
    weights, lora_A [in, r], lora_B [r, out] (Paddle layout), columns q|k|v and gate|up."""
    out = {}
    for i, layer in enumerate(model.model.layers.values()):
        a, m = layer.self_attn, layer.mlp
        assert a.k_proj.lora_A is a.q_proj.lora_A and m.up_proj.lora_A is m.gate_proj.lora_A
        groups = {"self_attn.qkv_proj": [a.q_proj, a.k_proj, a.v_proj], "self_attn.o_proj": [a.o_proj],
                  "mlp.up_gate_proj": [m.gate_proj, m.up_proj], "mlp.down_proj": [m.down_proj]}
        for name, mods in groups.items():
            key = f"{prefix}layers.{i}.{name}"
            out[f"{key}.lora_A"] = mods[0].lora_A.detach().t().contiguous().clone()
            out[f"{key}.lora_B"] = torch.cat([x.lora_B.detach() for x in mods], 0).t().contiguous().clone()
    return out


def write_erniekit_adapter(path, model, kind, *, alpha=-1, rslora=False, base=None, prefix="ernie."):
    """lora_config.json + weights as ERNIEKit writes them. kind: "single" (peft_model.safetensors),
    "sharded" (peft_model-0000i-of-00002.safetensors + index, bf16), "pdparams" (paddle.save's pickle:
    {key: (name, ndarray)}, bf16 as uint16)."""
    path.mkdir(parents=True, exist_ok=True)
    state = paddle_lora_state(model, prefix)
    cfg = {"r": RANK, "lora_alpha": alpha, "rslora": rslora, "lora_plus_scale": 1.0, "lora_dropout": 0.0,
           "target_modules": [".*qkv_proj.*", ".*o_proj.*", ".*up_gate_proj.*", ".*down_proj.*"],
           "trainable_modules": None, "trainable_bias": None, "merge_weights": False, "pissa": False,
           "tensor_parallel_degree": -1, "dtype": None, "base_model_name_or_path": base}
    (path / "lora_config.json").write_text(json.dumps(cfg))
    if kind == "single":
        save_file(state, str(path / "peft_model.safetensors"), metadata={"format": "np"})
    elif kind == "sharded":
        keys = list(state)
        shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for n, names in enumerate(shards, 1):
            fname = f"peft_model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: state[k].to(torch.bfloat16) for k in names}, str(path / fname), metadata={"format": "np"})
            weight_map.update({k: fname for k in names})
        (path / "peft_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        obj = {k: (f"lora_{i}.w_0", t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
               for i, (k, t) in enumerate(state.items())}
        obj["StructuredToParameterName@@"] = {k: name for k, (name, _) in obj.items()}
        with open(path / "lora_model_state.pdparams", "wb") as f:
            pickle.dump(obj, f, protocol=4)
    return path


def adapted(base_dir, seed=3, rank=RANK, alpha=-1, rslora=False):
    """The base with apply_lora (shared A) and random bf16-representable adapters, so bf16 files
    (sharded, pdparams) hold them exactly."""
    model = Ernie4_5ForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    apply_lora(model, rank=rank, alpha=alpha, rslora=rslora)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(m.lora_A.to(torch.bfloat16))
            m.lora_B.copy_((torch.randn_like(m.lora_B) * 0.2).to(torch.bfloat16))
    return model


def setup_from(base_dir, adapter_path, rank=RANK, alpha=-1, rslora=False):
    """What the trainer does with lora_path: load the base, add adapters, start them from lora_path."""
    model = Ernie4_5ForCausalLM.from_pretrained(base_dir)
    LoraRun.setup(model, rank=rank, alpha=alpha, rslora=rslora, bf16_base=False, adapter_path=adapter_path,
                  base_path=base_dir, save_base=False)
    return model


@pytest.fixture(scope="module")
def base_dir(run, tmp_path_factory):
    base, _ = split_dirs(run[0], tmp_path_factory.mktemp("ek"))
    return base


@pytest.mark.parametrize("kind", ["single", "sharded", "pdparams"])
def test_erniekit_adapter_loads_via_lora_path_and_from_pretrained(base_dir, tmp_path, kind):
    ref = adapted(base_dir, alpha=16, rslora=True)
    want = logits(ref)
    assert (want - logits(_load_model_dir(base_dir, None, {}))).abs().max() > 1e-3
    ek = write_erniekit_adapter(tmp_path / kind, ref, kind, alpha=16, rslora=True, base=str(base_dir),
                                prefix="model." if kind == "single" else "ernie.")
    loaded = setup_from(base_dir, ek, alpha=16, rslora=True)
    attn = loaded.model.layers["1"].self_attn
    assert attn.k_proj.lora_A is attn.q_proj.lora_A  # the fused adapter's one A stays shared
    assert_close(logits(loaded), want, 1e-6, f"lora_path {kind} vs the same adapter applied directly")
    assert_close(logits(Ernie4_5ForCausalLM.from_pretrained(ek)), want, 1e-4, f"from_pretrained({kind})")


def test_erniekit_export_merge_lora_with_base(base_dir, tmp_path):
    from ernie_core.export import main as export_main

    ref = adapted(base_dir)
    ek = write_erniekit_adapter(tmp_path / "ek", ref, "single")  # no base_model_name_or_path
    assert export_main([str(ek), "--merge-lora", "--out", str(tmp_path / "x")]) == 2
    assert export_main([str(ek), "--merge-lora", "--base", str(base_dir), "--out", str(tmp_path / "x")]) == 0
    assert_close(logits(Ernie4_5ForCausalLM.from_pretrained(tmp_path / "x")), logits(ref), 1e-4, "merged ERNIEKit")


def test_erniekit_lora_path_in_a_training_run(run, base_dir, tmp_path):
    """The trained adapter, rewritten in ERNIEKit's format, continues a run: its eval before
    training is the first run's final eval."""
    out, trained, eval_after = run
    ek = write_erniekit_adapter(tmp_path / "ek", trained, "single")
    res = tmp_path / "res"
    assert train_main(lora_args(res, f"model_name_or_path={base_dir}", "continue_training=true", f"lora_path={ek}",
                                "max_steps=1")) == 0
    summary = json.loads((res / "out" / "train_summary.json").read_text())
    assert summary["eval_before"]["eval_loss"] == pytest.approx(eval_after, rel=1e-5)


def test_erniekit_config_mismatch_stops_with_key_and_values(base_dir, tmp_path):
    ek = write_erniekit_adapter(tmp_path / "ek", adapted(base_dir), "single")
    with pytest.raises(UserError, match=r"lora_config.json: r is 4 but this run has lora_rank 8; set lora_rank: 4"):
        setup_from(base_dir, ek, rank=8)
    with pytest.raises(UserError, match=r"lora_config.json: lora_alpha is -1 \(= 8\) but this run has lora_alpha 32"):
        setup_from(base_dir, ek, alpha=32)
    with pytest.raises(UserError, match=r"lora_config.json: rslora is false but this run has rslora true"):
        setup_from(base_dir, ek, rslora=True, alpha=8)


def test_erniekit_missing_files_and_bad_keys_are_named(base_dir, tmp_path):
    ref = adapted(base_dir)
    with pytest.raises(UserError, match=f"lora_path {tmp_path / 'nowhere'}: no such directory"):
        setup_from(base_dir, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no LoRA adapter there"):
        setup_from(base_dir, tmp_path / "empty")

    ek = write_erniekit_adapter(tmp_path / "ek", ref, "single")
    (ek / "peft_model.safetensors").unlink()
    with pytest.raises(UserError, match=f"{ek}: no ERNIEKit LoRA weights .*lora_model_state.pdparams"):
        setup_from(base_dir, ek)
    sharded = write_erniekit_adapter(tmp_path / "sharded", ref, "sharded")
    (sharded / "peft_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="peft_model-00002-of-00002.safetensors: shard listed in .* is missing"):
        setup_from(base_dir, sharded)
    pd = write_erniekit_adapter(tmp_path / "pd", ref, "pdparams")
    (pd / "lora_config.json").unlink()
    with pytest.raises(UserError, match=f"{pd / 'lora_config.json'}: missing"):
        setup_from(base_dir, pd)

    def rewrite(name, edit):
        d = write_erniekit_adapter(tmp_path / name, ref, "single")
        state = paddle_lora_state(ref)
        edit(state)
        save_file(state, str(d / "peft_model.safetensors"))
        return d

    def extra_key(s):
        s["ernie.layers.0.mlp.gate.lora_A"] = torch.zeros(128, RANK)

    f = tmp_path / "unknown" / "peft_model.safetensors"
    with pytest.raises(UserError, match=f"{f}: key 'ernie.layers.0.mlp.gate.lora_A' is not a LoRA adapter"):
        setup_from(base_dir, rewrite("unknown", extra_key))
    f = tmp_path / "shape" / "peft_model.safetensors"
    with pytest.raises(UserError, match=rf"{f}: ernie.layers.1.self_attn.qkv_proj.lora_B has shape \[4, 100\], "
                                        rf"expected \[4, 256\]"):
        setup_from(base_dir, rewrite("shape", lambda s: s.update({
            "ernie.layers.1.self_attn.qkv_proj.lora_B": torch.zeros(RANK, 100)})))
    with pytest.raises(UserError, match=r"has no matching ernie.layers.2.mlp.down_proj.lora_B"):
        setup_from(base_dir, rewrite("half", lambda s: s.pop("ernie.layers.2.mlp.down_proj.lora_B")))
    missing = r"adapter modules do not match the model \(missing \['model.layers.3.self_attn.o_proj'"
    with pytest.raises(UserError, match=missing):
        setup_from(base_dir, rewrite("fewer", lambda s: [s.pop(f"ernie.layers.3.self_attn.o_proj.lora_{w}")
                                                         for w in "AB"]))


def test_pdparams_reader_refuses_arbitrary_pickles(base_dir, tmp_path):
    ek = write_erniekit_adapter(tmp_path / "ek", adapted(base_dir), "pdparams")
    with open(ek / "lora_model_state.pdparams", "wb") as f:
        pickle.dump({"ernie.layers.0.self_attn.qkv_proj.lora_A": shutil.rmtree}, f)
    with pytest.raises(UserError, match=r"lora_model_state.pdparams: the pickle refers to shutil.rmtree"):
        setup_from(base_dir, ek)
