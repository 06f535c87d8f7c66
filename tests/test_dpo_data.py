"""DPO data (docs/behaviour.md#dpo-data-format, #mixing-and-virtual-epochs): readers and their errors, pair layout (positions, start rows,
targets), truncation, packing, the resumable stream, and the central property: packed share-prompt
rows give the same chosen/rejected log-probs as each branch run alone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ernie_core.data import load_tokenizer
from ernie_core.data.dpo import (PairSeq, PreferenceExample, build_dpo_batch, read_preferences,
                                 tokenize_pair)
from ernie_core.data.packing import iter_packs
from ernie_core.data.testing import make_word_tokenizer, stand_in_config, write_jsonl
from ernie_core.errors import DataError
from ernie_core.models import Ernie4_5ForCausalLM
from ernie_core.train.dpo import pair_logps
from test_model import ATTENTION_PATHS, tiny_config

WORDS = "a b c d e f g h x y z p q r s t u v w".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS))


def example(src=("a b",), tgt=(), chosen=("x y",), rejected=("z",), system=None, delta=1.0):
    return PreferenceExample(tuple(src), tuple(tgt), tuple(chosen), tuple(rejected), delta, system)


# ---- readers ---------------------------------------------------------------------------------------
def test_erniekit_and_alpaca_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"src": ["q1", "q2"], "tgt": ["a1"], "response": [["bad"], ["good", "more?", "yes"]], "sort": [0, 3],
         "system": "sys"},
        {"src": "q", "tgt": [], "response": ["r1", "r2"], "sort": [2, 1], "score": [3.0, 0.5]},
        {"src": ["S", "q"], "tgt": [""], "response": ["r1", "r2"], "sort": [1, 0], "is_system": 1},
    ])
    rows = [ex for _, ex in read_preferences(path)]
    assert rows[0].chosen == ("good", "more?", "yes") and rows[0].rejected == ("bad",)
    assert rows[0].src == ("q1", "q2") and rows[0].tgt == ("a1",) and rows[0].system == "sys"
    assert rows[0].score_delta == 3.0  # sort gap
    assert rows[1].score_delta == 2.5  # score list aligned with response
    with pytest.raises(DataError, match="score gap is -2.5"):  # score list favours the rejected one
        list(read_preferences(write_jsonl(tmp_path / "s.jsonl", [
            {"src": "q", "response": ["r1", "r2"], "sort": [2, 1], "score": [0.5, 3.0]}])))
    assert rows[2].system == "S" and rows[2].src == ("q",) and rows[2].tgt == ()
    alp = tmp_path / "a.json"
    alp.write_text(json.dumps([{"question": "q?", "chosen": "yes", "rejected": "no", "system": "s"},
                               {"prompt": "p", "chosen": "c", "rejected": "r", "score": 2}], indent=1))
    rows = [ex for _, ex in read_preferences(alp, "alpaca")]
    assert rows[0] == PreferenceExample(("q?",), (), ("yes",), ("no",), 1.0, "s")
    assert rows[1].score_delta == 2.0


@pytest.mark.parametrize("row,reason", [
    ({"src": "q", "response": ["a", "b"], "sort": [1, 1]}, "'sort' values are equal"),
    ({"src": "q", "response": ["a", "b", "c"], "sort": [1, 0]}, "exactly 2 candidates, got 3"),
    ({"src": "q", "response": ["a"], "sort": [1, 0]}, "exactly 2 candidates, got 1"),
    ({"src": ["q1", "q2"], "tgt": [], "response": ["a", "b"], "sort": [1, 0]}, "one more src than tgt"),
    ({"src": ["q"], "tgt": ["x"], "response": ["a", "b"], "sort": [1, 0]}, "one more src than tgt"),
    ({"src": "q", "response": [["a", "u"], "b"], "sort": [1, 0]}, "odd-length list"),
    ({"src": "q", "response": ["a", " "], "sort": [1, 0]}, "non-blank"),
    ({"src": "q", "response": ["a", "b"], "sort": [1]}, "list of 2 integers"),
    ({"src": "q", "response": ["a", "b"], "sort": [1, 0], "score": 0}, "must be > 0"),
    ({"response": ["a", "b"], "sort": [1, 0]}, "missing 'src'"),
])
def test_malformed_lines_name_file_line_and_reason(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"src": "ok", "response": ["a", "b"], "sort": [1, 0]}, row])
    with pytest.raises(DataError, match=reason) as e:
        list(read_preferences(path))
    assert str(e.value).startswith(f"{path}:2:")


# ---- pair layout -------------------------------------------------------------------------------------
def test_reference_example_layout():
    """docs/behaviour.md#dpo-pair-layout's table: P=4, chosen c0 c1 E, rejected r0 r1 E, T=10 (this project's rejected targets)."""
    ids = np.array([10, 11, 12, 13, 20, 21, 3, 30, 31, 3], np.int32)
    pair = PairSeq(ids, 4, 3, 3, np.array([3, 4], np.int32), np.array([20, 21], np.int32),
                   np.array([3, 7], np.int32), np.array([30, 31], np.int32), 1.0)
    b = build_dpo_batch([[pair]], 12, 0)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 0, 0]
    assert b["attn_mask_startend_row_indices"][0, 0, :, 0].tolist() == [10, 10, 10, 10, 7, 7, 7, 10, 10, 10, 10, 11]
    assert b["chosen_index"].tolist() == [3, 4] and b["rejected_index"].tolist() == [3, 7]
    assert b["num_tokens"] == 10 and b["num_pairs"] == 1 and int((b["labels"] != -100).sum()) == 1


def test_tokenize_pair_targets(tok):
    pair = tokenize_pair(tok, example(), max_seq_len=64, max_prompt_len=54)
    # prompt: cls User : a b Assistant : -> P = 7; chosen x y E; rejected z E
    assert (pair.P, pair.C, pair.R) == (7, 3, 2)
    ids = pair.ids.tolist()
    assert pair.chosen_pos.tolist() == [6, 7] and pair.chosen_tgt.tolist() == ids[7:9]
    # rejected z is predicted from the prompt's last position, its E is not trained (mask_out_eos)
    assert pair.rejected_pos.tolist() == [6] and pair.rejected_tgt.tolist() == [ids[10]]
    keep_eos = tokenize_pair(tok, example(), 64, 54, mask_out_eos=False)
    assert keep_eos.chosen_pos.tolist() == [6, 7, 8] and keep_eos.chosen_tgt.tolist()[-1] == tok.eos_id
    assert keep_eos.rejected_pos.tolist() == [6, 10]


def test_multi_turn_response_trains_only_assistant_chunks(tok):
    pair = tokenize_pair(tok, example(chosen=("x", "y ?", "z")), 64, 54)
    P = pair.P
    ids = pair.ids.tolist()
    # chosen: x E | User : y ? Assistant : | z E  -> trained x (at P-1) and z (before it)
    assert pair.C == 2 + 6 + 2
    assert pair.chosen_tgt.tolist() == [ids[P], ids[P + 8]]
    assert pair.chosen_pos.tolist() == [P - 1, P + 7]


def test_prompt_truncation_drops_oldest_turns(tok):
    ex = example(src=("a a a a", "b b", "c"), tgt=("x x", "y"))
    full = tokenize_pair(tok, ex, 200, 190)
    # units: [cls User : a a a a Assistant : x x E] (12), [User : b b Assistant : y E] (8), [User : c Assistant :] (5)
    assert full.P == 25
    cut = tokenize_pair(tok, ex, 200, 24)  # max_prompt_len keeps the last two turns only
    assert cut.P == 13 and cut.ids.tolist()[:2] == tok.encode("User :")
    cut2 = tokenize_pair(tok, ex, 24 + full.C + full.R, 190)  # max_seq_len does the same
    assert cut2.P == 13
    assert tokenize_pair(tok, ex, 4 + full.C + full.R, 190) == "too_long"


def test_greedy_packing_by_buffer():
    lengths = [6, 5, 3, 4, 2, 6, 5, 3, 4, 2]
    assert list(iter_packs(lengths[:5], 10, True, 500)) == [[0, 3], [1, 2, 4]]  # docs/behaviour.md#packing example
    packs = list(iter_packs(lengths, 10, True, 5))  # two buffers, packed separately
    assert packs == [[0, 3], [1, 2, 4], [5, 8], [6, 7, 9]]
    assert list(iter_packs(lengths[:5], 10, False, 5)) == [[0], [1, 2], [3, 4]]


# ---- packed rows == branches alone ------------------------------------------------------------------
def branch_alone_logps(model, pair: PairSeq, side: str) -> float:
    """Run prompt + one response as its own sequence (positions 0..) and sum the scored log-probs."""
    ids = pair.ids.tolist()
    P, C = pair.P, pair.C
    seq = ids[:P + C] if side == "chosen" else ids[:P] + ids[P + C:]
    pos, tgt = (pair.chosen_pos, pair.chosen_tgt) if side == "chosen" else (pair.rejected_pos, pair.rejected_tgt)
    pos = [p if (side == "chosen" or p < P) else p - C for p in pos.tolist()]
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    assert all(seq[p + 1] == t for p, t in zip(pos, tgt.tolist()) if p + 1 < len(seq))  # targets are next tokens
    return float(sum(logp[p, t] for p, t in zip(pos, tgt.tolist())))


@pytest.mark.parametrize("path", ["flashmask", "dense_bool", "eager"])
def test_packed_share_prompt_rows_equal_unpacked_branches(tok, path):
    torch.manual_seed(0)
    model = Ernie4_5ForCausalLM(tiny_config(vocab_size=tok.vocab_size), **ATTENTION_PATHS[path]).eval()
    exs = [example(), example(src=("c d e",), chosen=("y", "a ?", "b c"), rejected=("z z z",)),
           example(src=("q", "r s"), tgt=("t",), chosen=("u",), rejected=("v w",), system="h"),
           example(src=("f",), chosen=("g g",), rejected=("h",))]
    pairs = [tokenize_pair(tok, e, 64, 54) for e in exs]
    rows = [[pairs[0], pairs[1]], [pairs[2], pairs[3]]]
    S = max(sum(len(p) for p in r) for r in rows) + 3  # room for pads
    batch = build_dpo_batch(rows, S, tok.pad_id)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, batch)
    for k, pair in enumerate(pairs):
        assert chosen[k].item() == pytest.approx(branch_alone_logps(model, pair, "chosen"), abs=2e-4), k
        assert rejected[k].item() == pytest.approx(branch_alone_logps(model, pair, "rejected"), abs=2e-4), k


def test_head_chunking_gives_the_same_logps_and_grads(tok):
    torch.manual_seed(0)
    model = Ernie4_5ForCausalLM(tiny_config(vocab_size=tok.vocab_size))
    pairs = [tokenize_pair(tok, example(src=(w,), chosen=("x y z",), rejected=("p q",)), 64, 54) for w in "abcd"]
    batch = build_dpo_batch([pairs[:2], pairs[2:]], 40, tok.pad_id)
    out = []
    for chunk in (0, 3):
        model.zero_grad()
        c, r = pair_logps(model, batch, chunk)
        (c.sum() - 2 * r.sum()).backward()
        out.append((c.detach(), r.detach(), model.lm_head.weight.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- stream ------------------------------------------------------------------------------------------
def dpo_cfg(path, **over):
    values = dict(train_dataset_path=str(path), eval_dataset_path=str(path), max_seq_len=48, seed=3,
                  per_device_train_batch_size=2, per_device_eval_batch_size=2, num_samples_each_epoch=40,
                  max_prompt_len=38, mask_out_eos_token=True, buffer_size=8, stage="DPO")
    return stand_in_config(**{**values, **over})


def pref_file(tmp_path, n=30):
    rng = np.random.RandomState(0)
    rows = [{"src": " ".join(rng.choice(WORDS, rng.randint(1, 6))), "response": [
        " ".join(rng.choice(WORDS, rng.randint(1, 5))), " ".join(rng.choice(WORDS, rng.randint(1, 5)))],
        "sort": [1, 0]} for _ in range(n)]
    return write_jsonl(tmp_path / "pref.jsonl", rows)


def test_stream_is_deterministic_and_resumes(tmp_path, tok):
    from ernie_core.data.dpo import build_dpo_eval_batches, build_dpo_stream, estimate_dpo_max_steps

    cfg = dpo_cfg(pref_file(tmp_path))
    a = build_dpo_stream(cfg, tok)
    first = [next(a) for _ in range(7)]
    b = build_dpo_stream(cfg, tok)
    b.load_state_dict(build_dpo_stream(cfg, tok).state_dict() | {"micro_batches": 4})
    for want in first[4:]:
        got = next(b)
        for key in ("input_ids", "chosen_index", "rejected_target", "attn_mask_startend_row_indices"):
            assert torch.equal(got[key], want[key]), key
    assert 0.5 < a.packing_efficiency <= 1.0
    assert first[0]["input_ids"].shape == (2, 48) and first[0]["num_pairs"] >= 2
    evals = build_dpo_eval_batches(cfg, tok)
    assert sum(bt["num_pairs"] for bt in evals) == 30
    assert 1 <= estimate_dpo_max_steps(cfg, tok) <= 15


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert torch.equal(torch.as_tensor(g[key]), torch.as_tensor(w[key])), key


def test_workers_give_the_same_batches(tmp_path, tok):
    """dataloader_num_workers > 0 builds the batches in DataLoader workers, in the order of 0 workers,
    also after a resume that starts at an odd batch, and for a data-parallel rank's slice."""
    from ernie_core.data.dpo import build_dpo_stream

    path = pref_file(tmp_path)
    for rank_kw in ({}, {"dp_rank": 1, "dp_world": 2}):
        expected = [next(s) for s in [build_dpo_stream(dpo_cfg(path), tok, **rank_kw)] for _ in range(7)]
        stream = build_dpo_stream(dpo_cfg(path, dataloader_num_workers=2), tok, **rank_kw)
        try:
            assert stream.num_workers == 2
            assert_same_batches([next(stream) for _ in range(4)], expected[:4])
            state = stream.state_dict()
            resumed = build_dpo_stream(dpo_cfg(path, dataloader_num_workers=2), tok, **rank_kw)
            resumed.load_state_dict(state)
            next(resumed)
            resumed.load_state_dict({"micro_batches": 3})  # an odd start: worker 0 must still go first
            assert_same_batches([next(resumed) for _ in range(4)], expected[3:7])
            resumed.close()
        finally:
            stream.close()


def test_make_assets_reproduces_the_example_preference_files(tmp_path):
    """examples/data/dpo-{train,eval}.jsonl are what examples/make_assets.py writes, and valid DPO data."""
    import importlib.util
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    spec = importlib.util.spec_from_file_location("make_assets", examples / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_dpo_data(tmp_path)
    for name in ("dpo-train.jsonl", "dpo-eval.jsonl"):
        got, want = tmp_path / "data" / name, examples / "data" / name
        assert got.read_bytes() == want.read_bytes(), f"{name}: rerun examples/make_assets.py"
        rows = list(read_preferences(want))
        assert len(rows) == (2000 if "train" in name else 200)
        for _, ex in rows:  # chosen = the task's answer, rejected = a different answer of the same length
            assert ex.chosen != ex.rejected and len(ex.chosen[0]) == len(ex.rejected[0]) == 3
