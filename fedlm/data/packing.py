"""Text into token rows: tokenising in bounded pieces and packing a token stream into padded rows of seq_len."""

from __future__ import annotations

from typing import Any

import torch

MIN_LAST_ROW = 8
"""A final, partial row is kept (padded) only if it holds at least this many real tokens."""


TOKENIZE_PIECE_CHARS = 100_000
"""Longer documents (a minified file, a log with no line breaks) reach the tokenizer in pieces of this size,
cut before whitespace where there is some: they are packed into rows anyway, and a fast tokenizer holds
about 240 bytes per token of a call's whole input (0.7 GB for a 4M-character line, measured)."""
TOKENIZE_BATCH_CHARS = 1_000_000
"""Characters per tokenizer call: bounds that memory for a client of any size (about 0.2 GB a call)."""


def pack_stream(stream: torch.Tensor, seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    full, rest = divmod(len(stream), seq_len)
    used = full * seq_len + (rest if rest >= MIN_LAST_ROW else 0)
    rows = full + (rest >= MIN_LAST_ROW)
    ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, seq_len), dtype=torch.long)
    ids.view(-1)[:used] = stream[:used]
    mask.view(-1)[:used] = 1
    return ids, mask


def _pieces(text: str) -> list[str]:
    """`text` cut into pieces of at most TOKENIZE_PIECE_CHARS, each cut just before whitespace if any."""
    pieces, start = [], 0
    while len(text) - start > TOKENIZE_PIECE_CHARS:
        end = start + TOKENIZE_PIECE_CHARS
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]]


def tokenize_documents(docs: list[str], tokenizer: Any) -> tuple[list[torch.Tensor], int]:
    """Each document's token ids followed by EOS (if the tokenizer has one), and the padding id."""
    eos = tokenizer.eos_token_id
    pad = next((i for i in (tokenizer.pad_token_id, eos) if i is not None), 0)
    tail = torch.tensor([eos] if eos is not None else [], dtype=torch.long)
    pieces = [(d, piece) for d, doc in enumerate(docs) for piece in _pieces(doc)]
    parts: list[list[torch.Tensor]] = [[] for _ in docs]
    start = 0
    while start < len(pieces):  # calls of about TOKENIZE_BATCH_CHARS, kept as compact tensors in between
        end, chars = start, 0
        while end < len(pieces) and (end == start or chars + len(pieces[end][1]) <= TOKENIZE_BATCH_CHARS):
            chars += len(pieces[end][1])
            end += 1
        # verbose=False: documents longer than the model's context are expected here (they are packed).
        batch = tokenizer([p for _, p in pieces[start:end]], add_special_tokens=False, truncation=False,
                          verbose=False)["input_ids"]
        for (d, _), ids in zip(pieces[start:end], batch):
            parts[d].append(torch.tensor(ids, dtype=torch.long))
        start = end
    return [torch.cat(p + [tail]) for p in parts], pad


def pack_texts(texts: list[str], tokenizer: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `texts` as packed rows (ids, mask): a held-out set used whole, such as a server's."""
    ids, pad = tokenize_documents([t for t in texts if t.strip()], tokenizer)
    return pack_stream(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long), seq_len, pad)
