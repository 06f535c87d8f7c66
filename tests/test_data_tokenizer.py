"""Tokenizer: both file formats, special tokens first, chat template and turn chunks (docs/behaviour.md#tokenizer-and-chat-template)."""
import json
from pathlib import Path

import pytest

from ernie_core.data import load_tokenizer
from ernie_core.data.testing import make_sentencepiece_tokenizer
from ernie_core.errors import DataError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny_model"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "7."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "11."},
]
# The invented example of docs/behaviour.md#tokenizer-and-chat-template, verbatim.
CHAT_TEXT = ("<|begin_of_sentence|>Be brief.\nUser: Name a prime number.\nAssistant: 7.<|end_of_sentence|>"
             "User: Another one?\nAssistant: 11.<|end_of_sentence|>")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    texts = [line for line in (REPO / "examples/data/sft-train.jsonl").read_text().splitlines()[:500]]
    return make_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"), texts + [CHAT_TEXT])


@pytest.fixture(params=["tokenizer.json", "tokenizer.model"])
def tok(request, sp_dir):
    return load_tokenizer(TINY if request.param == "tokenizer.json" else sp_dir)


def test_special_ids_come_from_the_vocabulary(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for token, role_id in (("<|begin_of_sentence|>", tok.cls_id), ("<|end_of_sentence|>", tok.sep_id)):
        assert tok.token_to_id(token) == role_id
        assert tok.encode(token) == [role_id]
    assert tok.cls_id != tok.sep_id and min(tok.cls_id, tok.sep_id) > 2
    assert {tok.token_to_id(f"<mask:{k}>") for k in (1, 4, 5, 6, 7)}.isdisjoint({None})


def test_tiny_tokenizer_is_byte_level_with_template_pieces():
    tok = load_tokenizer(TINY)
    assert (tok.cls_id, tok.sep_id) == (4, 3) and 266 < tok.vocab_size <= 320
    assert len(tok.encode("xyz q\n")) == len("xyz q\n")  # one token per byte
    ids = tok.encode("User: Uppercase: abc\nAssistant: ABC")  # fixed strings are single tokens
    assert len(ids) == 9 and tok.decode(ids) == "User: Uppercase: abc\nAssistant: ABC"


def test_special_tokens_are_matched_before_the_subword_model(tok):
    text = "ab<mask:1>cd<|end_of_sentence|>"
    assert tok.encode(text) == tok.encode("ab") + [tok.token_to_id("<mask:1>")] + tok.encode("cd") + [tok.sep_id]
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.decode(tok.encode(text)) == "abcd"


def test_round_trip_keeps_spaces_and_newlines(tok):
    text = "User: Sum: 3+4\nAssistant: 7"
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_matches_the_reference_example(tok):
    assert tok.apply_chat_template(CHAT) == CHAT_TEXT
    assert tok.apply_chat_template(CHAT[:4], add_generation_prompt=True).endswith("User: Another one?\nAssistant: ")


def test_turn_chunks_are_separate_tokenizer_calls(tok):
    texts = tok.chat_turn_texts(CHAT)
    assert texts == [
        ("<|begin_of_sentence|>Be brief.\nUser: Name a prime number.\nAssistant: ", "7.<|end_of_sentence|>"),
        ("User: Another one?\nAssistant: ", "11.<|end_of_sentence|>"),
    ]
    chunks = tok.encode_chat_turns(CHAT)
    assert chunks == [(tok.encode(q), tok.encode(a)) for q, a in texts]
    assert chunks[0][0][0] == tok.cls_id and all(a[-1] == tok.sep_id for _, a in chunks)
    flat = [i for q, a in chunks for i in q + a]
    assert tok.decode(flat, skip_special_tokens=False) == CHAT_TEXT


def test_trailing_user_message_gives_a_prompt_chunk(tok):
    chunks = tok.encode_chat_turns(CHAT[:4])
    assert chunks[-1] == (tok.encode("User: Another one?\nAssistant: "), [])
    with pytest.raises(ValueError):
        tok.encode_chat_turns([{"role": "assistant", "content": "x"}])


def test_transformers_renders_and_tokenizes_the_same():
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(TINY))
    tok = load_tokenizer(TINY)
    assert hf.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT)
    assert hf.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    for q, a in tok.chat_turn_texts(CHAT):
        assert hf.encode(q, add_special_tokens=False) == tok.encode(q)
        assert hf.encode(a, add_special_tokens=False) == tok.encode(a)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)


def test_save_pretrained_copies_the_files(tok, tmp_path):
    written = tok.save_pretrained(tmp_path / "out")
    assert "tokenizer_config.json" in written
    assert any(name in written for name in ("tokenizer.json", "tokenizer.model"))
    again = load_tokenizer(tmp_path / "out")
    assert again.encode(CHAT_TEXT) == tok.encode(CHAT_TEXT) and again.cls_id == tok.cls_id


def test_missing_directory_or_model_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_missing_required_special_token_is_a_data_error(tmp_path):
    data = json.loads((TINY / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|begin_of_sentence|>"]
    data["model"]["vocab"].pop("<|begin_of_sentence|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"begin_of_sentence.*not in the vocabulary"):
        load_tokenizer(tmp_path)


def test_corrupt_model_file_is_a_data_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
