"""Shared by the fedlm/data/ tests: a small tokenizer trained here (no download) and text-writing helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


LETTERS = "abcdefghijklmnopqrstuvwxyz"
Tok = PreTrainedTokenizerFast


def train_tokenizer() -> Tok:
    """A ~300-token byte-level BPE trained here, so no download is needed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [f"{c * 4} the quick brown fox {c}{c} def main(): return 1" for c in LETTERS]
    tok.train_from_iterator(lines * 5, trainer)
    # A short model_max_length makes packing long documents exercise the too-long warning path.
    return Tok(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", model_max_length=32)


@pytest.fixture(scope="module")
def tokenizer() -> Tok:
    return train_tokenizer()


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def letter_doc(letter: str, words: int = 60) -> str:
    return " ".join([letter * 4] * words)


def decoded_letters(tokenizer: Tok, ids: torch.Tensor, mask: torch.Tensor) -> set[str]:
    text = tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
    return set(text) - {" "}
