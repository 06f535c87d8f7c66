"""ERNIE tokenizer: SentencePiece `tokenizer.model` or HF `tokenizer.json`, plus the chat template.

docs/behaviour.md#tokenizer-and-chat-template. Special tokens are matched in the text first (longest first), and only the text
between them goes through the subword model, one call per segment, as ERNIE's slow tokenizer does.
Special-token ids are looked up in the vocabulary (or `added_tokens_decoder`), never hard-coded.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ernie_core.errors import DataError

# role -> token text, docs/behaviour.md#tokenizer-and-chat-template. pad shares `<unk>` (id 0) with unk.
DEFAULT_SPECIALS = {
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "cls_token": "<|begin_of_sentence|>",
    "sep_token": "<|end_of_sentence|>",
    "mask_token": "<mask:1>",
}
# sys_start, sys_end, header_start, header_end: unused by the template but must never be split.
EXTRA_SPECIALS = ["<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>"]
REQUIRED_ROLES = ("unk_token", "pad_token", "bos_token", "eos_token", "cls_token", "sep_token")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def _token_text(value) -> str | None:
    """HF configs store a token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(path, None, f"cannot parse tokenizer file: {e}") from None


class _SentencePieceBackend:
    def __init__(self, path: Path):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(path, None, f"cannot load SentencePiece model: {e}") from None
        self.size = self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces, so check the round trip.
        return i if 0 <= i < self.size and self.sp.id_to_piece(i) == token else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class _HFBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer
        try:
            self.tk = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(path, None, f"cannot load tokenizer.json: {e}") from None
        self.size = self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor bos/eos; the template places specials itself.
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)


class ErnieTokenizer:
    """Tokenizer with ERNIE's special tokens and chat template (CONTRACTS.md, "Tokenizer and data")."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(self.path, None, "tokenizer directory not found")
        # SentencePiece is what ERNIE ships; tokenizer.json is used when it is the only model file.
        if (self.path / "tokenizer.model").is_file():
            self.backend = _SentencePieceBackend(self.path / "tokenizer.model")
        elif (self.path / "tokenizer.json").is_file():
            self.backend = _HFBackend(self.path / "tokenizer.json")
        else:
            raise DataError(self.path, None, "no tokenizer.model or tokenizer.json in this directory")
        self._resolve_specials()

    def _resolve_specials(self) -> None:
        config = _read_json(self.path / "tokenizer_config.json")
        smap = _read_json(self.path / "special_tokens_map.json")
        added, added_special = {}, []  # token text -> id declared in tokenizer_config.json
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            if _token_text(entry) is not None:
                added[_token_text(entry)] = int(i)
                if not isinstance(entry, dict) or entry.get("special", True):
                    added_special.append(_token_text(entry))
        roles = dict(DEFAULT_SPECIALS)
        for source in (smap, config):  # tokenizer_config.json wins, as in transformers
            for role in DEFAULT_SPECIALS:
                if _token_text(source.get(role)) is not None:
                    roles[role] = _token_text(source.get(role))
        extras = list(EXTRA_SPECIALS)
        for source in (smap, config):
            extras += [_token_text(t) for t in source.get("additional_special_tokens") or []]
        extras += added_special

        def lookup(token):
            return added[token] if token in added else self.backend.token_to_id(token)

        self.special_ids: dict[str, int] = {}
        self.mask_id, self.mask_token = None, None  # optional: absent from some vocabularies
        for role, token in roles.items():
            i = lookup(token)
            if i is None:
                if role in REQUIRED_ROLES:
                    raise DataError(self.path, None, f"special token {token!r} ({role}) is not in the vocabulary")
                continue
            self.special_ids[token] = i
            setattr(self, role.replace("_token", "_id"), i)
            setattr(self, role, token)
        for token in extras:
            if token and token not in self.special_ids and lookup(token) is not None:
                self.special_ids[token] = lookup(token)
        self.id_to_special = {i: t for t, i in self.special_ids.items()}
        # Longest first, so "<mask:1>" can never shadow a longer token that starts the same way.
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self.vocab_size = max(self.backend.size, max(self.special_ids.values()) + 1)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.special_ids.get(token, self.backend.token_to_id(token))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: special tokens matched first, the rest through the subword model."""
        ids: list[int] = []
        for k, piece in enumerate(self._special_re.split(text)):
            if k % 2:  # re.split with one group alternates text, match, text, ...
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(self.backend.encode(piece))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, run = [], []
        for i in (int(x) for x in ids):
            if i in self.id_to_special:
                if run:
                    out.append(self.backend.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.id_to_special[i])
            else:
                run.append(i)
        if run:
            out.append(self.backend.decode(run))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        """The whole conversation as one string (docs/behaviour.md#tokenizer-and-chat-template, Template)."""
        text = self.cls_token
        for m in messages:
            if m["role"] == "system":
                text += m["content"] + "\n"
            elif m["role"] == "user":
                text += "User: " + m["content"] + "\n"
            elif m["role"] == "assistant":
                text += "Assistant: " + m["content"] + self.sep_token
            else:
                raise ValueError(f"unknown chat role {m['role']!r}")
        return text + ("Assistant: " if add_generation_prompt else "")

    def chat_turn_texts(self, messages) -> list[tuple[str, str]]:
        """(q_t, a_t) texts per turn; docs/behaviour.md#tokenizer-and-chat-template, Turn chunks.

        q_1 holds cls and the system text; every q_t ends with the generation prompt "Assistant: ".
        If the conversation ends with a user message, its pair has an empty answer "" (a prompt).
        """
        msgs = list(messages)
        head = self.cls_token
        if msgs and msgs[0]["role"] == "system":
            head += msgs.pop(0)["content"] + "\n"
        turns = []
        for k in range(0, len(msgs), 2):
            user, reply = msgs[k], (msgs[k + 1] if k + 1 < len(msgs) else None)
            if user["role"] != "user" or (reply is not None and reply["role"] != "assistant"):
                raise ValueError("messages must be [system?] then user/assistant pairs in turn")
            q = head + "User: " + user["content"] + "\n" + "Assistant: "
            head = ""
            turns.append((q, "" if reply is None else reply["content"] + self.sep_token))
        return turns

    def encode_chat_turns(self, messages) -> list[tuple[list[int], list[int]]]:
        """(q_ids, a_ids) per turn; each chunk is its own tokenizer call (parity with PaddleFormers)."""
        return [(self.encode(q), self.encode(a) if a else []) for q, a in self.chat_turn_texts(messages)]

    def save_pretrained(self, save_dir: str | Path) -> list[str]:
        """Copy the tokenizer files into `save_dir`; returns the file names written."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in TOKENIZER_FILES:
            src = self.path / name
            if src.is_file() and src.resolve() != (save_dir / name).resolve():
                shutil.copyfile(src, save_dir / name)
            if src.is_file():
                written.append(name)
        if "tokenizer_config.json" not in written:  # so transformers and we find the same specials
            cfg = {role: getattr(self, role) for role in DEFAULT_SPECIALS if hasattr(self, role)}
            (save_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            written.append("tokenizer_config.json")
        return written


def load_tokenizer(path: str | Path) -> ErnieTokenizer:
    """Load a tokenizer directory; a missing directory or model file raises DataError naming it."""
    return ErnieTokenizer(path)
