"""Unit tests for fedlm/data/preparation.py: a client's held-out split and rows, their files, and preparing a
federation (written whole or not at all, reused by fingerprint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedlm.data.preparation import ClientData, build_client_data, client_data_path, prepare_federation
from fedlm.settings import ConfigError, DatasetSettings, FederationSettings, RunSettings, TrainSettings
from tests.fedlm.data.conftest import LETTERS, Tok, decoded_letters, letter_doc, train_tokenizer, write


# ---------------------------------------------------------------- one client's rows

def test_build_client_data_splits_documents_and_packs(tokenizer: Tok) -> None:
    texts = [letter_doc(c) for c in LETTERS[:10]]
    settings = DatasetSettings(seq_len=16, eval_fraction=0.2, min_train_sequences=4, min_eval_sequences=1)
    out = build_client_data(texts, tokenizer, settings, seed=3, name="client 0")
    assert out.train.dtype == torch.long and out.train.shape[1] == 16 and out.eval.shape[1] == 16
    assert out.train_mask.shape == out.train.shape and out.eval_mask.shape == out.eval.shape
    train_letters = decoded_letters(tokenizer, out.train, out.train_mask)
    eval_letters = decoded_letters(tokenizer, out.eval, out.eval_mask)
    assert len(eval_letters) == 2 and len(train_letters) == 8 and not train_letters & eval_letters
    # Every document ends with EOS; only the last row may be padded, and its padding is masked out.
    n_tokens = sum(len(tokenizer(t, verbose=False)["input_ids"]) + 1 for t in texts if t[0] in train_letters)
    full, rest = divmod(n_tokens, 16)
    assert int(out.train_mask.sum()) == full * 16 + (rest if rest >= 8 else 0)
    assert bool(out.train_mask[:-1].all())
    padded = out.train_mask[-1] == 0
    assert bool((out.train[-1][padded] == tokenizer.pad_token_id).all())
    same = build_client_data(texts, tokenizer, settings, seed=3, name="client 0")
    assert torch.equal(same.train, out.train) and torch.equal(same.eval, out.eval)


def test_held_out_share_follows_tokens_not_document_count(tokenizer: Tok) -> None:
    texts = [letter_doc("z", 1200)] + [letter_doc(c, 60) for c in LETTERS[:12]]  # one huge document
    settings = DatasetSettings(seq_len=16, eval_fraction=0.1, min_train_sequences=4, min_eval_sequences=1)
    for seed in range(5):
        out = build_client_data(texts, tokenizer, settings, seed=seed, name="client 0")
        assert "z" in decoded_letters(tokenizer, out.train, out.train_mask)  # never held out: too big
        share = int(out.eval_mask.sum()) / int(out.train_mask.sum() + out.eval_mask.sum())
        assert 0.05 <= share <= 0.2


def test_single_document_is_split_by_tokens(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = train_tokenizer()  # fresh: transformers warns about long sequences only once per tokenizer
    settings = DatasetSettings(seq_len=8, eval_fraction=0.25, min_train_sequences=1, min_eval_sequences=1)
    out = build_client_data([letter_doc("q", 200)], tokenizer, settings, seed=0, name="client 1")
    assert "Token indices sequence length" not in caplog.text
    n_tokens = len(tokenizer(letter_doc("q", 200), verbose=False)["input_ids"]) + 1
    assert int(out.train_mask.sum()) + int(out.eval_mask.sum()) in range(n_tokens - 14, n_tokens + 1)
    assert int(out.eval_mask.sum()) == pytest.approx(n_tokens * 0.25, abs=8)


def test_too_little_data_names_the_client(tokenizer: Tok) -> None:
    with pytest.raises(ConfigError, match=r"client 3 \(package 'six'\) has \d+ training and \d+ held-out "
                                          r"sequences .*dataset\.min_train_sequences=8"):
        build_client_data(["tiny text", "more"], tokenizer, DatasetSettings(), seed=0,
                          name="client 3 (package 'six')")


def test_a_client_with_fewer_rows_than_a_batch_is_named(tokenizer: Tok) -> None:
    settings = DatasetSettings(seq_len=16, min_train_sequences=1, min_eval_sequences=1)
    texts = [letter_doc(c) for c in LETTERS[:10]]
    rows = len(build_client_data(texts, tokenizer, settings, seed=0, name="client 4").train)  # fits a batch of 1
    with pytest.raises(ConfigError, match=rf"client 4 has {rows} training sequences .*fewer than one batch "
                                          rf"\(train\.batch_size=500\); lower train\.batch_size to at most {rows}"):
        build_client_data(texts, tokenizer, settings, seed=0, name="client 4", batch_size=500)


def test_a_seq_len_longer_than_the_text_names_the_client(tokenizer: Tok) -> None:
    settings = DatasetSettings(seq_len=4096)  # each document fits in one, mostly padded, row
    with pytest.raises(ConfigError, match=r"client 0 has 1 training and 1 held-out sequences of dataset\.seq_len="
                                          r"4096 tokens \(from 2 documents\), but needs dataset\.min_train_sequences=8"):
        build_client_data([letter_doc("a"), letter_doc("b")], tokenizer, settings, seed=0, name="client 0")


def test_client_data_round_trip_and_load_errors(tmp_path: Path) -> None:
    original = ClientData(torch.arange(12).view(3, 4), torch.ones(3, 4, dtype=torch.long),
                          torch.arange(4).view(1, 4), torch.tensor([[1, 1, 0, 0]]))
    path = client_data_path(tmp_path / "run", 2)
    assert path == tmp_path / "run" / "client_2.pt"
    original.save(path)
    loaded = ClientData.load(path)
    for key in ("train", "train_mask", "eval", "eval_mask"):
        assert torch.equal(getattr(loaded, key), getattr(original, key))
    assert os.listdir(path.parent) == ["client_2.pt"]  # no temporary file left behind
    with pytest.raises(ConfigError, match=r"client_5\.pt is missing"):
        ClientData.load(client_data_path(tmp_path / "run", 5))
    write(path, b"not a torch file")
    with pytest.raises(ConfigError, match=r"client_2\.pt is unreadable"):
        ClientData.load(path)
    torch.save({"train": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match=r"client_2\.pt lacks \['train', 'train_mask', 'eval', 'eval_mask"):
        ClientData.load(path)


# ---------------------------------------------------------------- whole federation

def federation_settings(folder: Path, **dataset: object) -> RunSettings:
    ds = DatasetSettings(path=str(folder), partitioner="natural", seq_len=16, min_train_sequences=4,
                         min_eval_sequences=1, **dataset)
    return RunSettings(dataset=ds, federation=FederationSettings(num_clients=3, clients_per_round=3),
                       train=TrainSettings(batch_size=4), seed=5)


def test_prepare_federation_writes_then_reuses(tmp_path: Path, tokenizer: Tok) -> None:
    folder = tmp_path / "corpus"
    for k, c in enumerate("abc"):
        for j in range(5):
            write(folder / f"site{k}" / f"{j}.txt", letter_doc(c, 40 + j))
    out = tmp_path / "prepared"
    summary = prepare_federation(federation_settings(folder), tokenizer, out)
    expected = ["client_0.pt", "client_1.pt", "client_2.pt", "fingerprint.json", "summary.json"]
    assert sorted(os.listdir(out)) == expected
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [row["sources"] for row in summary] == [["site0"], ["site1"], ["site2"]]
    assert [row["documents"] for row in summary] == [5, 5, 5]
    client = ClientData.load(client_data_path(out, 1))
    assert summary[1]["train_sequences"] == len(client.train)
    assert summary[1]["eval_tokens"] == int(client.eval_mask.sum())
    assert decoded_letters(tokenizer, client.train, client.train_mask) == {"b"}

    mtimes = {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)}
    assert prepare_federation(federation_settings(folder), tokenizer, out) == summary
    assert {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)} == mtimes
    rebuilt = prepare_federation(federation_settings(folder, eval_fraction=0.4), tokenizer, out)
    assert [row["documents"] for row in rebuilt] == [5, 5, 5] and rebuilt != summary


def test_prepare_federation_writes_nothing_on_error(tmp_path: Path, tokenizer: Tok) -> None:
    folder = tmp_path / "corpus"
    write(folder / "big" / "0.txt", letter_doc("a", 400))
    write(folder / "big" / "1.txt", letter_doc("b", 400))
    write(folder / "mid" / "0.txt", letter_doc("c", 400))
    write(folder / "mid" / "1.txt", letter_doc("d", 400))
    write(folder / "small" / "0.txt", "x")
    write(folder / "small" / "1.txt", "y")
    out = tmp_path / "prepared"
    with pytest.raises(ConfigError, match=r"client 2 \(source 'small'\) has 0 training"):
        prepare_federation(federation_settings(folder), tokenizer, out)
    assert not out.exists()


def test_a_failed_write_removes_what_it_wrote(tmp_path: Path, tokenizer: Tok, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "corpus"
    for k, c in enumerate("abc"):
        for j in range(5):
            write(folder / f"site{k}" / f"{j}.txt", letter_doc(c, 40 + j))
    saved = []

    def disk_full_on_the_second(self: ClientData, path: Path) -> None:
        if saved:
            raise OSError(28, "No space left on device")
        saved.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"written")
    monkeypatch.setattr(ClientData, "save", disk_full_on_the_second)
    with pytest.raises(ConfigError, match=r"output_dir: the prepared data cannot be written to .*prepared "
                                          r"\(No space left on device\)"):
        prepare_federation(federation_settings(folder), tokenizer, tmp_path / "prepared")
    assert saved and not list((tmp_path / "prepared").iterdir())
