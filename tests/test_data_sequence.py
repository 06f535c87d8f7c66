"""Row -> sequence (docs/behaviour.md#sft-row-to-sequence): the worked example literally, truncation, cls re-add,
labels, and counted drops."""
import logging

import numpy as np
import pytest

from ernie_core.data import Example, load_tokenizer, tokenize_example
from ernie_core.data.sequence import IGNORE_INDEX, build_sequence, first_kept_turn, tokenize_file
from ernie_core.data.testing import make_word_tokenizer, write_jsonl

CLS, SEP, EOS = 4, 3, 2
X = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    words = ["q1b", "q1c", "x1", "x2", "y1", "sys", "long"]
    return load_tokenizer(make_word_tokenizer(tmp_path_factory.mktemp("tok"), words))


def worked_example_turns():
    # q1 = 4 tokens (q1a is cls), a1 = x1 x2 E, q2 = 3 tokens, a2 = y1 E
    return [([CLS, 11, 12, 13], [20, 21, SEP]), ([30, 31, 32], [40, SEP])]


def test_worked_example_this_project_mask():
    ids, labels = build_sequence(worked_example_turns(), [1, 1], CLS, SEP, EOS)
    #                       pos: 0    1   2   3   4   5    6   7   8   9  10
    assert ids.tolist() == [CLS, 11, 12, 13, 20, 21, SEP, 30, 31, 32, 40]
    targets = [11, 12, 13, 20, 21, EOS, 30, 31, 32, 40, EOS]
    mask = [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]  # "this project" row: pos 6 (E as input) is 0
    assert labels.tolist() == [t if m else X for t, m in zip(targets, mask)]


def test_worked_example_label_0_1():
    _, labels = build_sequence(worked_example_turns(), [0, 1], CLS, SEP, EOS)
    assert labels.tolist() == [X] * 9 + [40, EOS]  # positions 3-6 are 0 too


def test_all_context_rows_have_no_sequence():
    assert build_sequence(worked_example_turns(), [0, 0], CLS, SEP, EOS) is None


def test_truncation_example():
    turns = [([0] * 6, [0] * 6), ([0] * 5, [0] * 5), ([0] * 4, [0] * 5)]  # lengths 12, 10, 9
    assert first_kept_turn(turns, 32) == 1  # keep t3 (9 <= 25), t2 (10 <= 16), drop t1 (12 > 6)
    assert first_kept_turn(turns, 16) == 2
    assert first_kept_turn(turns, 15) == 3  # even the last turn fails: drop the row


def test_cls_is_re_added_after_truncation():
    ids, labels = build_sequence(worked_example_turns()[1:], [1], CLS, SEP, EOS)
    assert ids.tolist() == [CLS, 30, 31, 32, 40]
    assert labels.tolist() == [X, X, X, 40, EOS]


def test_tokenize_example_end_to_end(tok):
    example = Example(("q1b q1c", "long"), ("x1 x2", "y1"), (1, 1), "sys")
    ids, labels = tokenize_example(tok, example, max_seq_len=64)
    turns = tok.encode_chat_turns(example.messages())
    assert ids.tolist() == [i for q, a in turns for i in q + a][:-1]  # final sep removed
    assert ids[0] == tok.cls_id and len(ids) == len(labels)
    trained = labels[labels != X].tolist()
    assert trained == tok.encode("x1 x2") + [tok.eos_id] + tok.encode("y1") + [tok.eos_id]
    # each trained label is the next input token (or eos where the input has sep / ends)
    nxt = np.append(ids[1:], tok.eos_id)
    nxt[nxt == tok.sep_id] = tok.eos_id
    assert (labels[labels != X] == nxt[labels != X]).all()


def test_tokenize_example_truncates_whole_turns(tok):
    example = Example(("long " * 30, "q1b"), ("x1", "y1"), (1, 1), "sys")
    ids, labels = tokenize_example(tok, example, max_seq_len=24)
    assert ids[0] == tok.cls_id and tok.encode("sys")[0] not in ids.tolist()  # t1 and system gone
    assert labels[labels != X].tolist() == tok.encode("y1") + [tok.eos_id]
    assert tokenize_example(tok, Example(("long " * 30,), ("x1",), (1,)), 24) == "too_long"


def test_dropped_rows_are_counted_and_logged(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"src": "q1b", "tgt": "x1"},
        {"src": "long " * 40, "tgt": "x1"},
        {"src": ["q1b", "q1c"], "tgt": ["x1", "x2"], "label": [0, 0]},
    ])
    with caplog.at_level(logging.WARNING, logger="ernie_core.data"):
        source = tokenize_file(path, "erniekit", tok, max_seq_len=32)
    assert len(source) == 1 and source.rows_read == 3
    assert source.dropped == {"too_long": 1, "no_loss": 1}
    assert "dropped 1 of 3 rows whose last turn does not fit max_seq_len=32" in caplog.text
    assert "dropped 1 of 3 rows with no trained answer" in caplog.text
    ids, labels = source.get(0)
    assert source.lengths.tolist() == [len(ids)] and ids.dtype == np.int32
