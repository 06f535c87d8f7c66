"""Small builders for tests of any layer: toy tokenizers, data files and a small real config.

Not used in training."""
from __future__ import annotations

import io
import json
from pathlib import Path

from ernie_core.data.tokenizer import DEFAULT_SPECIALS, EXTRA_SPECIALS

# Same order as examples/tiny_model: 0 <unk>, 1 <s>, 2 </s>, then sep, cls, masks.
TOY_SPECIALS = ["<unk>", "<s>", "</s>", "<|end_of_sentence|>", "<|begin_of_sentence|>",
                "<mask:1>", *EXTRA_SPECIALS]


def _write_special_files(out: Path) -> None:
    roles = dict(DEFAULT_SPECIALS, additional_special_tokens=list(EXTRA_SPECIALS))
    (out / "tokenizer_config.json").write_text(json.dumps(roles))
    (out / "special_tokens_map.json").write_text(json.dumps(roles))


def make_sentencepiece_tokenizer(out_dir, texts, vocab_size: int = 512) -> Path:
    """Train a small SentencePiece BPE model on `texts` into out_dir/tokenizer.model.

    Identity normalisation and byte fallback keep "\\n" and spaces exact, as ERNIE's model does;
    ERNIE's special tokens are control symbols, so SentencePiece never produces them from text.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=TOY_SPECIALS[3:], byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    _write_special_files(out)
    return out


def make_word_tokenizer(out_dir, words) -> Path:
    """A tokenizer.json whose tokens are whitespace-separated words (plus punctuation), so token
    counts are obvious in tests: "User: a b\\n" -> ["User", ":", "a", "b"]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(TOY_SPECIALS)}
    for w in ["User", "Assistant", ":", "?", ".", *words]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    _write_special_files(out)
    return out


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stand_in_config(**fields):
    """A real TrainConfig (`ernie_core.config`) with small data-test defaults (max_seq_len 128, batch 2);
    keyword args set any option by its flat key, e.g. stand_in_config(max_seq_len=64)."""
    from ernie_core.config import config_from_dict

    values = dict(max_seq_len=128, per_device_train_batch_size=2, per_device_eval_batch_size=2)
    values.update(fields)
    return config_from_dict(values)
