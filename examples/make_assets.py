"""Generate the embedded default run's assets (deterministic; the outputs are committed).

    python examples/make_assets.py [ROOT]   # rewrites ROOT/data/* and ROOT/tiny_model/* (ROOT: examples/)

Data: letter-by-letter tasks on random 3-letter words that a 4-layer, hidden-128 model learns in a
few CPU minutes: Uppercase, Repeat and Shift (each letter to the next, z -> a); the alpaca source
adds Lowercase. Held-out eval rows use words never seen in training, so their exact-match accuracy
measures a learned rule, not memorised rows.
DPO (examples/configs/dpo_tiny.yaml): preference pairs on the same tasks and word pools, chosen =
the correct answer, rejected = a wrong one (another task's answer for the word, or the correct
answer with one letter changed); written with their own random stream, so the SFT files above do
not change when this part does.
Tokenizer: byte-level (256 byte tokens, no merges) plus ERNIE's special tokens, so every answer
character is one token. Model: ERNIE-4.5-shaped config.json with transformers' ernie4_5 keys.
"""
from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

# Ids 0/1/2 are pad+unk / bos / eos as in ERNIE 4.5; sep sits before cls as in the real vocabulary.
SPECIALS = ["<unk>", "<s>", "</s>", "<|end_of_sentence|>", "<|begin_of_sentence|>",
            "<mask:1>", "<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>"]
SYSTEMS = ["Answer with the result only.", "You are a careful assistant.", "Be brief."]
TASKS = {"upper": "Uppercase: ", "repeat": "Repeat: ", "shift": "Shift: "}
# The template's fixed strings become single tokens (matched before the byte-level model, like
# the special tokens), while words and answers stay one token per letter. A sample shrinks from
# ~36 to ~11 tokens and each answer letter sits 3 tokens after its source letter, so the tiny
# model finds the rule in a few hundred steps instead of a few thousand.
TEMPLATE_PIECES = ["User: ", "\nAssistant: ", *TASKS.values(), "Lowercase: ", *SYSTEMS]
LETTERS = string.ascii_lowercase

# The §2 template as Jinja, so transformers' apply_chat_template renders what ernie_core renders.
CHAT_TEMPLATE = (
    "{{- cls_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'] + sep_token -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


def word_pools(rng: random.Random, n_train: int, n_eval: int):
    """Disjoint pools of random 3-letter words. A fixed length puts every answer character at a
    fixed distance from its source character, which a tiny model finds in a few hundred steps;
    variable lengths need a content-based lookup that takes it far longer."""
    words = sorted({"".join(rng.choice(LETTERS) for _ in range(3)) for _ in range(4 * (n_train + n_eval))})
    rng.shuffle(words)
    return words[:n_train], words[n_train:n_train + n_eval]


def make_task(rng: random.Random, words) -> tuple[str, str]:
    """One (question, answer) pair. Every task maps the 3 letters of its word one by one, so all
    tasks share one circuit (look back a fixed distance) and differ only in the letter map."""
    kind, w = rng.choice(sorted(TASKS)), rng.choice(words)
    if kind == "upper":
        return TASKS[kind] + w, w.upper()
    if kind == "repeat":
        return TASKS[kind] + w, w
    return TASKS[kind] + w, "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)  # z wraps to a


def erniekit_row(rng: random.Random, words, multi_turn_p: float) -> dict:
    turns = rng.choice([2, 3]) if rng.random() < multi_turn_p else 1
    pairs = [make_task(rng, words) for _ in range(turns)]
    row = {"src": [q for q, _ in pairs], "tgt": [a for _, a in pairs]}
    if turns > 1 and rng.random() < 0.3:  # first turn as context only
        row["label"] = [0] + [1] * (turns - 1)
    if rng.random() < 0.25:
        row["system"] = rng.choice(SYSTEMS)
    elif rng.random() < 0.03:  # ERNIEKit's is_system form: src[0] is the system prompt
        row = {"src": [rng.choice(SYSTEMS)] + row["src"], "tgt": [""] + row["tgt"], "is_system": 1}
    if turns == 1 and "label" not in row and "is_system" not in row and rng.random() < 0.5:
        row = {**row, "src": row["src"][0], "tgt": row["tgt"][0]}  # plain-string form
    return row


def alpaca_row(rng: random.Random, words) -> dict:
    w = rng.choice(words)
    row = {"instruction": "Lowercase: ", "input": w.upper(), "output": w}
    if rng.random() < 0.2:
        row["system"] = rng.choice(SYSTEMS)
    return row


def write_data(rng: random.Random, root: Path) -> list[str]:
    train_words, eval_words = word_pools(rng, n_train=1500, n_eval=300)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    train = [erniekit_row(rng, train_words, 0.15) for _ in range(3000)]
    evals = [erniekit_row(rng, eval_words, 0.1) for _ in range(200)]
    alpaca = [alpaca_row(rng, train_words) for _ in range(400)]
    for name, rows in (("sft-train.jsonl", train), ("sft-eval.jsonl", evals)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    # One element per line, so DataError line numbers point at the element.
    (data / "alpaca-train.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in alpaca) + "\n]\n")
    texts = []
    for r in train + alpaca:
        texts += [str(v) for v in r.values() if isinstance(v, str)]
        texts += [s for v in r.values() if isinstance(v, list) for s in v if isinstance(s, str)]
    return texts


def task_answers(kind: str, w: str) -> str:
    if kind == "upper":
        return w.upper()
    if kind == "repeat":
        return w
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def wrong_answer(rng: random.Random, kind: str, w: str) -> str:
    """A wrong answer of the same length: mostly the right letters in the wrong case (a rule a tiny
    model picks up in a few dozen DPO steps), else another task's answer for the word or the right
    answer with one letter changed (these need the task itself learned)."""
    right = task_answers(kind, w)
    u = rng.random()
    if u < 0.6:
        return right.lower() if kind == "upper" else right.upper()
    others = sorted({task_answers(k, w) for k in TASKS} - {right})
    if u < 0.8 and others:
        return rng.choice(others)
    i = rng.randrange(len(right))
    pool = [c for c in (LETTERS.upper() if right[i].isupper() else LETTERS) if c != right[i]]
    return right[:i] + rng.choice(pool) + right[i + 1:]


def dpo_row(rng: random.Random, words) -> dict:
    """erniekit DPO row (ernie_reference §4.1); the chosen answer sits first or second at random."""
    kind, w = rng.choice(sorted(TASKS)), rng.choice(words)
    chosen, rejected = task_answers(kind, w), wrong_answer(rng, kind, w)
    row = {"src": [TASKS[kind] + w], "tgt": [], "response": [[chosen], [rejected]], "sort": [1, 0]}
    if rng.random() < 0.5:
        row["response"], row["sort"] = row["response"][::-1], [0, 1]
    if rng.random() < 0.2:
        row["system"] = rng.choice(SYSTEMS)
    return row


def write_dpo_data(root: Path) -> None:
    """dpo-train.jsonl / dpo-eval.jsonl: the SFT word pools (re-derived from SEED, so held-out words
    stay held out), pairs drawn from a separate random stream."""
    train_words, eval_words = word_pools(random.Random(SEED), n_train=1500, n_eval=300)
    rng = random.Random(SEED + 1)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, words, n in (("dpo-train.jsonl", train_words, 2000), ("dpo-eval.jsonl", eval_words, 200)):
        (data / name).write_text("".join(json.dumps(dpo_row(rng, words)) + "\n" for _ in range(n)))


def write_tokenizer(texts: list[str], model_dir: Path) -> int:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    # vocab = specials + the 256 byte symbols exactly: no merges, one token per character.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIALS) + len(alphabet), special_tokens=SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.add_tokens([AddedToken(piece, normalized=False) for piece in TEMPLATE_PIECES])
    model_dir.mkdir(parents=True, exist_ok=True)
    tk.save(str(model_dir / "tokenizer.json"))
    roles = {"unk_token": "<unk>", "pad_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
             "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "mask_token": "<mask:1>",
             "additional_special_tokens": SPECIALS[6:]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **roles, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "chat_template": CHAT_TEMPLATE}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (model_dir / "special_tokens_map.json").write_text(json.dumps(roles, indent=2) + "\n")
    return tk.get_vocab_size(with_added_tokens=True)


def write_model_config(tokenizer_size: int, model_dir: Path) -> None:
    vocab = -(-tokenizer_size // 64) * 64  # round up to a multiple of 64 (kernel-friendly shapes)
    config = {
        "architectures": ["Ernie4_5ForCausalLM"], "model_type": "ernie4_5",
        "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "hidden_act": "silu", "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "initializer_range": 0.02, "tie_word_embeddings": True, "use_bias": False, "use_cache": True,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(root: Path = HERE) -> None:
    """Write data/ and tiny_model/ under `root` (default: this examples/ folder)."""
    rng = random.Random(SEED)
    texts = write_data(rng, Path(root))
    write_dpo_data(Path(root))
    write_model_config(write_tokenizer(texts, Path(root) / "tiny_model"), Path(root) / "tiny_model")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
