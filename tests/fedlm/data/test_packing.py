"""Unit tests for fedlm/data/packing.py: text into token rows, long documents tokenised in pieces."""

from __future__ import annotations

import pytest

from fedlm.data import packing
from fedlm.data.packing import pack_texts
from tests.fedlm.data.conftest import LETTERS, Tok, decoded_letters, letter_doc


def test_pack_texts_keeps_every_document(tokenizer: Tok) -> None:
    ids, mask = pack_texts([letter_doc("a", 30), "  ", letter_doc("b", 30)], tokenizer, seq_len=16)
    n_tokens = sum(len(tokenizer(letter_doc(c, 30), verbose=False)["input_ids"]) + 1 for c in "ab")
    full, rest = divmod(n_tokens, 16)
    assert ids.shape == (full + (rest >= 8), 16) and int(mask.sum()) == full * 16 + (rest if rest >= 8 else 0)
    assert decoded_letters(tokenizer, ids, mask) == {"a", "b"}


def test_long_lines_are_tokenised_in_pieces_losing_nothing(tokenizer: Tok, monkeypatch: pytest.MonkeyPatch) -> None:
    words = " ".join(letter_doc(c, 20) for c in LETTERS)
    whole = tokenizer(words, add_special_tokens=False, verbose=False)["input_ids"]
    line = "".join(LETTERS[i % 7] * (1 + i % 3) for i in range(1200))  # 2,400 characters, no whitespace at all
    monkeypatch.setattr(packing, "TOKENIZE_PIECE_CHARS", 100)
    monkeypatch.setattr(packing, "TOKENIZE_BATCH_CHARS", 250)
    assert max(map(len, packing._pieces(line))) == 100 and "".join(packing._pieces(line)) == line
    (ids_words, ids_line), _ = packing.tokenize_documents([words, line], tokenizer)
    assert ids_words.tolist() == whole + [tokenizer.eos_token_id]  # cut before spaces: the same tokens
    assert tokenizer.decode(ids_line[:-1].tolist()) == line
