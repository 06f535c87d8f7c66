"""Tokenizer and SFT data: readers, chat template, truncation + loss masks, mixing, packing,
FlashMask indices, train stream and eval batches. API contract: docs/dev/CONTRACTS.md."""
from ernie_core.data.eval import EvalPrompt, answer_matches, answer_text, build_eval_batches, build_eval_prompts
from ernie_core.data.readers import Example, read_examples
from ernie_core.data.sequence import IGNORE_INDEX, tokenize_example
from ernie_core.data.stream import TrainStream, build_train_stream, estimate_max_steps, validate_datasets
from ernie_core.data.tokenizer import ErnieTokenizer, load_tokenizer

__all__ = [
    "EvalPrompt", "Example", "ErnieTokenizer", "IGNORE_INDEX", "TrainStream", "answer_matches", "answer_text",
    "build_eval_batches", "build_eval_prompts", "build_train_stream", "estimate_max_steps", "load_tokenizer",
    "read_examples", "tokenize_example", "validate_datasets",
]
