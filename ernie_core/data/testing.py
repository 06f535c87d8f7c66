"""Small builders for tests of any layer: toy tokenizers, data files and a stand-in config.

Not used in training. The stand-in config has the attribute layout of `ernie_core.config` for the
fields the data layer reads, so data tests do not depend on the config package.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

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


def stand_in_config(**fields) -> SimpleNamespace:
    """A config object with the sections the data layer reads; keyword args override any field
    by name (the section is found automatically), e.g. stand_in_config(max_seq_len=64)."""
    sections = {
        "train": dict(max_seq_len=128, train_dataset_path="", train_dataset_prob="1.0",
                      train_dataset_type="erniekit", seed=42, random_shuffle=True,
                      per_device_train_batch_size=2, gradient_accumulation_steps=1,
                      num_train_epochs=1, max_steps=-1),
        "eval": dict(eval_dataset_path="", eval_dataset_prob="1.0", eval_dataset_type="erniekit",
                     per_device_eval_batch_size=2),
        "accel": dict(greedy_intokens=True, dataloader_num_workers=0),
        "sft": dict(num_samples_each_epoch=6_000_000),
    }
    for key, value in fields.items():
        owner = [s for s in sections.values() if key in s]
        if not owner:
            raise KeyError(f"stand_in_config has no field {key!r}")
        owner[0][key] = value
    return SimpleNamespace(**{name: SimpleNamespace(**f) for name, f in sections.items()})
