"""Eval batches (every row once, in order, sequential packing) and generation prompts."""
from pathlib import Path

import pytest
import torch

from ernie_core.data import (answer_matches, answer_text, build_eval_batches, build_eval_prompts, load_tokenizer,
                             tokenize_example)
from ernie_core.data.readers import read_examples
from ernie_core.data.testing import stand_in_config, write_jsonl

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny_model"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


@pytest.fixture()
def eval_file(tmp_path):
    rows = [{"src": f"Repeat: {'ab' * (k % 9 + 1)}", "tgt": "ab" * (k % 9 + 1)} for k in range(25)]
    rows.append({"system": "Be brief.", "src": ["Sum: 1+2", "Sum: 2+2"], "tgt": ["3", "4"], "label": [0, 1]})
    return write_jsonl(tmp_path / "eval.jsonl", rows)


def split_samples(batch):
    """Recover the samples of each row from position ids (they restart at 0 per sample)."""
    out = []
    for ids, pos, n_real in zip(batch["input_ids"], batch["position_ids"],
                                (batch["attn_mask_startend_row_indices"][:, 0, :, 0]
                                 > torch.arange(batch["input_ids"].shape[1])).sum(1)):
        starts = [i for i in range(int(n_real)) if pos[i] == 0] + [int(n_real)]
        out += [ids[a:b].tolist() for a, b in zip(starts, starts[1:])]
    return out


def test_every_row_once_in_order(tok, eval_file):
    cfg = stand_in_config(train_dataset_path="unused", eval_dataset_path=str(eval_file), max_seq_len=96,
                          per_device_eval_batch_size=3)
    batches = build_eval_batches(cfg, tok)
    assert all(b["input_ids"].shape == (3, 96) for b in batches[:-1]) and batches[-1]["input_ids"].shape[0] <= 3
    got = [s for b in batches for s in split_samples(b)]
    expected = [tokenize_example(tok, ex, 96)[0].tolist() for _, ex in read_examples(eval_file)]
    assert got == expected
    assert build_eval_batches(cfg, tok)[0]["input_ids"].equal(batches[0]["input_ids"])  # no shuffling
    ranks = [build_eval_batches(cfg, tok, dp_rank=r, dp_world=2) for r in range(2)]
    assert [len(r) for r in ranks] == [len(batches[0::2]), len(batches[1::2])]
    assert build_eval_batches(stand_in_config(train_dataset_path="unused"), tok) == []


def test_eval_prompts(tok, eval_file):
    cfg = stand_in_config(train_dataset_path="unused", eval_dataset_path=str(eval_file), max_seq_len=96)
    prompts = build_eval_prompts(cfg, tok)
    assert len(prompts) == 26 and prompts[0].line == 1 and prompts[0].answer == "ab"
    assert tok.decode(prompts[0].prompt_ids, skip_special_tokens=False) == \
        "<|begin_of_sentence|>User: Repeat: ab\nAssistant: "
    last = prompts[-1]  # earlier turns stay as context, with their reference answers
    assert tok.decode(last.prompt_ids, skip_special_tokens=False) == (
        "<|begin_of_sentence|>Be brief.\nUser: Sum: 1+2\nAssistant: 3<|end_of_sentence|>"
        "User: Sum: 2+2\nAssistant: ")
    assert last.answer == "4"
    assert len(build_eval_prompts(cfg, tok, limit=5)) == 5


def test_answer_matching(tok):
    generated = tok.encode("CAT") + [tok.eos_id] + tok.encode("junk")
    assert answer_text(tok, generated) == "CAT"
    assert answer_matches(tok, generated, " CAT ") and not answer_matches(tok, generated, "CA")
    assert answer_matches(tok, tok.encode("7") + [tok.sep_id], "7")
    assert answer_matches(tok, torch.tensor(tok.encode("7")), "7")  # no stop token: all of it
