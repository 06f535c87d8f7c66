"""SFT readers (docs/behaviour.md#sft-data-format): accepted forms, and a DataError naming file and line for
every kind of malformed row."""
import gzip
import json

import pytest

from ernie_core.data import Example, read_examples, validate_datasets
from ernie_core.data.testing import stand_in_config, write_jsonl
from ernie_core.errors import ConfigError, DataError

GOOD = {"src": ["Hi"], "tgt": ["Hello"]}


def rows(path, kind="erniekit"):
    return [ex for _, ex in read_examples(path, kind)]


def test_erniekit_forms(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"src": " What? ", "tgt": "This. "},
        {"system": "Answer in one sentence.", "src": ["A", "B"], "tgt": ["a", "b"], "label": [0, 1]},
        {"src": ["You are terse.", "Q"], "tgt": ["", "A"], "is_system": 1, "label": [1, 0]},
    ])
    assert rows(path) == [
        Example(("What?",), ("This.",), (1,), None),
        Example(("A", "B"), ("a", "b"), (0, 1), "Answer in one sentence."),
        Example(("Q",), ("A",), (0,), "You are terse."),
    ]
    assert rows(path)[1].messages() == [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "A"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "B"}, {"role": "assistant", "content": "b"},
    ]


def test_gzip_and_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert [line for line, _ in read_examples(path)] == [1, 3]


def test_alpaca_list_and_jsonl(tmp_path):
    items = [{"instruction": "Uppercase: ", "input": "cat", "output": "CAT"},
             {"instruction": "Say hi", "output": "hi", "system": "Be nice."}]
    (tmp_path / "a.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in items) + "\n]\n")
    write_jsonl(tmp_path / "a.jsonl", items)
    expected = [Example(("Uppercase: cat",), ("CAT",), (1,), None), Example(("Say hi",), ("hi",), (1,), "Be nice.")]
    assert rows(tmp_path / "a.json", "alpaca") == expected
    assert rows(tmp_path / "a.jsonl", "alpaca") == expected
    assert [line for line, _ in read_examples(tmp_path / "a.json", "alpaca")] == [2, 3]


BAD_ERNIEKIT = [
    ('{"src": ["a"], "tgt": ["b"]', "invalid JSON"),
    ('["a", "b"]', "must be a JSON object"),
    ('{"tgt": ["b"]}', "missing 'src'"),
    ('{"src": ["a"]}', "missing 'tgt'"),
    ('{"src": ["a", "b"], "tgt": ["c"]}', "'src' has 2 turns but 'tgt' has 1"),
    ('{"src": [], "tgt": []}', "'src' is an empty list"),
    ('{"src": ["a"], "tgt": ["  "]}', r"'tgt'\[0\] is blank"),
    ('{"src": ["a"], "tgt": [3]}', r"'tgt'\[0\] must be a string, got int"),
    ('{"src": {"x": 1}, "tgt": ["b"]}', "'src' must be a string or a list of strings, got dict"),
    ('{"src": ["a", "c"], "tgt": ["b", "d"], "label": [1]}', "'label' has 1 entries but there are 2 turns"),
    ('{"src": ["a"], "tgt": ["b"], "label": ["1"]}', r"'label'\[0\] must be 0 or 1"),
    ('{"src": ["a"], "tgt": ["b"], "label": [2]}', r"'label'\[0\] must be 0 or 1"),
    ('{"src": ["a"], "tgt": ["b"], "system": 5}', "'system' must be a string, got int"),
    ('{"src": ["a"], "tgt": ["b"], "is_system": 1}', "'is_system' needs src"),
]


@pytest.mark.parametrize("line,reason", BAD_ERNIEKIT)
def test_malformed_erniekit_line(tmp_path, line, reason):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=reason) as info:
        rows(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert info.value.line == 3 and info.value.path == str(path)


def test_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"src": ["\xff\xfe"], "tgt": ["b"]}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: invalid UTF-8"):
        rows(path)


@pytest.mark.parametrize("body,line,reason", [
    ('[\n{"instruction": "a", "output": "b"},\n{"instruction": "a"}\n]', 3, "missing 'output'"),
    ('[\n{"instruction": "a", "output": "b"},\n{"instruction": "a", "output": "b"\n]', 3, "invalid JSON"),
    ('[\n{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n]', 3, "expected ','"),
    ('[\n{"instruction": "a", "input": 7, "output": "b"}\n]', 2, "'input' must be a string"),
    ('[\n{"instruction": " ", "output": "b"}\n]', 2, "is blank"),
])
def test_malformed_alpaca(tmp_path, body, line, reason):
    path = tmp_path / "alpaca.json"
    path.write_text(body)
    with pytest.raises(DataError, match=reason) as info:
        rows(path, "alpaca")
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_missing_empty_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        rows(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(DataError, match="dataset type 'parquet' is not supported"):
        rows(tmp_path / "a.jsonl", "parquet")


def test_validate_datasets_reads_train_and_eval(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + '{"src": ["a"], "tgt": []}\n')
    cfg = stand_in_config(train_dataset_path=f"{good},{bad}", train_dataset_prob="0.5,0.5")
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'tgt' is an empty list"):
        validate_datasets(cfg)
    cfg = stand_in_config(train_dataset_path=f"{good},{bad}", train_dataset_prob="1,0")  # prob 0: not read
    assert validate_datasets(cfg) == {str(good): 3}
    cfg = stand_in_config(train_dataset_path=str(good), eval_dataset_path=str(bad))
    with pytest.raises(DataError, match="bad.jsonl:2"):
        validate_datasets(cfg)
    cfg = stand_in_config(train_dataset_path=f"{good},{good}")
    cfg.train.train_dataset_prob = "1,1,1"  # set after loading (load_config itself refuses the mismatch)
    with pytest.raises(ConfigError, match="train_dataset_prob has 3 entries"):
        validate_datasets(cfg)
