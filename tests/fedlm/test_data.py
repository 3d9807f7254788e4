"""Unit tests for fedlm/data/: sources, partitioning, packing and federation preparation (offline)."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fedlm.data import packing, sources
from fedlm.data.packing import pack_texts
from fedlm.data.partitioning import partition_corpus
from fedlm.data.preparation import ClientData, build_client_data, client_data_path, prepare_federation
from fedlm.settings import DATA_SOURCES, ConfigError, DatasetSettings, FederationSettings, RunSettings, TrainSettings
from fedlm.data.sources import READERS, load_corpus, load_texts

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


# ---------------------------------------------------------------- packages

def test_packages_are_deterministic_distinct_third_party_and_capped() -> None:
    settings = DatasetSettings(max_chars_per_source=20_000)
    first = load_corpus(settings, num_sources=3, seed=0)
    again = load_corpus(settings, num_sources=3, seed=0)
    assert first["source"] == again["source"] and first["text"] == again["text"]
    names = sorted(set(first["source"]))
    assert len(names) == 3
    for name in names:
        assert name not in sys.stdlib_module_names and name not in sources.OWN_PACKAGES
        total = sum(len(t) for t, s in zip(first["text"], first["source"]) if s == name)
        assert 18_000 <= total <= 20_000  # the cap, less any whitespace-only files dropped
    others = {tuple(sorted(set(load_corpus(settings, num_sources=3, seed=s)["source"]))) for s in range(1, 5)}
    assert others - {tuple(names)}  # some other seed picks other packages


def test_package_scan_excludes_stdlib_and_our_packages() -> None:
    roots = sources._package_roots()
    assert "torch" in roots and "datasets" in roots
    assert not {"json", "os", "fedlm", "client", "server", "tests", "__pycache__"} & set(roots)


def test_too_many_packages_names_num_clients() -> None:
    with pytest.raises(ConfigError, match=r"federation\.num_clients=100000 .* only \d+ are available"):
        load_corpus(DatasetSettings(), num_sources=100_000, seed=0)


# ---------------------------------------------------------------- text folders

def test_text_folder_nested_and_flat(tmp_path: Path) -> None:
    write(tmp_path / "alice" / "1.txt", "alice one")
    write(tmp_path / "alice" / "deep" / "2.txt", "alice two")
    write(tmp_path / "bob" / "x.txt", "bob")
    write(tmp_path / "loose.txt", "loose file")
    write(tmp_path / "blank.txt", "  \n ")
    write(tmp_path / "notes.md", "ignored")
    corpus = load_corpus(DatasetSettings(path=str(tmp_path)), num_sources=0, seed=0)
    assert corpus.column_names == ["text", "source"]
    assert corpus["text"] == ["alice one", "alice two", "bob", "loose file"]
    assert corpus["source"] == ["alice", "alice", "bob", "loose"]


def test_text_folder_rejects_non_utf8(tmp_path: Path) -> None:
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "latin.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.txt is not UTF-8.*re-save it as UTF-8"):
        load_corpus(DatasetSettings(path=str(tmp_path)), num_sources=0, seed=0)


def test_text_folder_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"dataset\.path='{tmp_path}' has no \.txt files"):
        load_corpus(DatasetSettings(source="text_folder", path=str(tmp_path)), num_sources=0, seed=0)
    write(tmp_path / "a.txt", "\n\n")
    with pytest.raises(ConfigError, match=rf"dataset\.path='{tmp_path}' holds no text: none of its 1 \.txt file"):
        load_corpus(DatasetSettings(path=str(tmp_path)), num_sources=0, seed=0)
    with pytest.raises(ConfigError, match=r"dataset\.source=jsonl needs dataset\.path to be a \.jsonl file"):
        load_corpus(DatasetSettings(source="jsonl", path=str(tmp_path)), num_sources=0, seed=0)
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"dataset\.path='{missing}' does not exist"):
        load_corpus(DatasetSettings(source="text_folder", path=str(missing)), num_sources=0, seed=0)


# ---------------------------------------------------------------- jsonl and hub

def test_jsonl_text_field_and_partition_field(tmp_path: Path) -> None:
    lines = ['{"text": "first", "author": "ann"}', "", '{"text": "second", "author": 7}', '{"text": "third"}',
             '{"text": "   ", "author": "ann"}']
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    corpus = load_corpus(DatasetSettings(path=str(path), partition_by="author"), num_sources=0, seed=0)
    assert corpus["text"] == ["first", "second", "third"]
    assert corpus["source"] == ["ann", "7", "4"]  # a record without the field is its own origin (its line)
    assert corpus["author"] == ["ann", "7", "4"]
    plain = load_corpus(DatasetSettings(path=str(path)), num_sources=0, seed=0)
    assert plain.column_names == ["text", "source"] and plain["source"] == ["1", "3", "4"]


def test_jsonl_prompt_response_template(tmp_path: Path) -> None:
    path = write(tmp_path / "qa.jsonl", '{"q": "2+2?", "a": "4"}\n{"q": "{x}", "a": "ok"}\n')
    settings = DatasetSettings(path=str(path), prompt_field="q", response_field="a",
                               template="Q: {prompt}\nA: {response}")
    assert load_corpus(settings, num_sources=0, seed=0)["text"] == ["Q: 2+2?\nA: 4", "Q: {x}\nA: ok"]


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl, line 3: invalid JSON"):
        load_corpus(DatasetSettings(path=str(bad)), num_sources=0, seed=0)
    fields = write(tmp_path / "fields.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"fields\.jsonl, line 2 has neither a 'text' field nor both "
                                          r"'prompt' and 'response' \(it has \['body'\]\)"):
        load_corpus(DatasetSettings(path=str(fields)), num_sources=0, seed=0)


def test_huggingface_source_uses_load_dataset_and_wraps_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    table = datasets.Dataset.from_dict({"prompt": ["hi", "yo"], "response": ["there", "!"],
                                        "lang": ["en", None]})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or table)
    settings = DatasetSettings(hf_name="someone/chat", hf_split="test", template="{prompt}|{response}",
                               partition_by="lang")
    corpus = load_corpus(settings, num_sources=0, seed=0)
    assert calls == [("someone/chat", "test")]
    assert corpus["text"] == ["hi|there", "yo|!"] and corpus["source"] == ["en", "1"]

    def offline(name: str, split: str) -> None:
        raise ConnectionError("Couldn't reach the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"dataset\.hf_name='someone/chat' \(split 'test'\) could not be"):
        load_corpus(settings, num_sources=0, seed=0)


# ---------------------------------------------------------------- partitioning

def make_corpus(n: int, groups: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(n)],
                                       "source": [f"s{i % groups}" for i in range(n)]})


def test_iid_partitions_are_seeded_and_balanced() -> None:
    corpus, settings = make_corpus(23, 3), DatasetSettings(partitioner="iid")
    first = [p["text"] for p in partition_corpus(corpus, settings, 4, seed=1)]
    assert first == [p["text"] for p in partition_corpus(corpus, settings, 4, seed=1)]
    assert first != [p["text"] for p in partition_corpus(corpus, settings, 4, seed=2)]
    assert sorted(len(p) for p in first) == [5, 6, 6, 6]
    assert sorted(t for p in first for t in p) == sorted(corpus["text"])
    assert first[0] != [f"doc {i}" for i in range(6)]  # shuffled, not contiguous
    with pytest.raises(ConfigError, match=r"3 documents, fewer than federation\.num_clients=4"):
        partition_corpus(make_corpus(3, 3), settings, 4, seed=0)


def test_natural_partitions_sorted_by_id_and_count_checked() -> None:
    corpus = datasets.Dataset.from_dict({"text": list("abcde"), "source": ["z", "m", "z", "a", "m"]})
    parts = partition_corpus(corpus, DatasetSettings(partitioner="natural"), 3, seed=0)
    assert [sorted(p["text"]) for p in parts] == [["d"], ["b", "e"], ["a", "c"]]
    with pytest.raises(ConfigError, match=r"has 3 \(a, m, z\) but federation\.num_clients=4; set "
                                          r"federation\.num_clients=3 or dataset\.partitioner=iid"):
        partition_corpus(corpus, DatasetSettings(partitioner="natural"), 4, seed=0)


def test_unknown_partition_column_and_dirichlet() -> None:
    corpus = make_corpus(60, 3)
    with pytest.raises(ConfigError, match=r"partition_by='topic' is not a field .*\['text', 'source'\]"):
        partition_corpus(corpus, DatasetSettings(partitioner="natural", partition_by="topic"), 3, seed=0)
    settings = DatasetSettings(partitioner="dirichlet", dirichlet_alpha=0.5)
    first = [p["text"] for p in partition_corpus(corpus, settings, 3, seed=4)]
    assert first == [p["text"] for p in partition_corpus(corpus, settings, 3, seed=4)]
    assert sorted(t for p in first for t in p) == sorted(corpus["text"]) and min(map(len, first)) >= 10
    with pytest.raises(ConfigError, match=r"60 distinct values over 60 documents"):
        partition_corpus(make_corpus(60, 60), settings, 3, seed=0)


# ---------------------------------------------------------------- packing

def decoded_letters(tokenizer: Tok, ids: torch.Tensor, mask: torch.Tensor) -> set[str]:
    text = tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
    return set(text) - {" "}


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


def test_pack_texts_keeps_every_document(tokenizer: Tok) -> None:
    ids, mask = pack_texts([letter_doc("a", 30), "  ", letter_doc("b", 30)], tokenizer, seq_len=16)
    n_tokens = sum(len(tokenizer(letter_doc(c, 30), verbose=False)["input_ids"]) + 1 for c in "ab")
    full, rest = divmod(n_tokens, 16)
    assert ids.shape == (full + (rest >= 8), 16) and int(mask.sum()) == full * 16 + (rest if rest >= 8 else 0)
    assert decoded_letters(tokenizer, ids, mask) == {"a", "b"}


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


def test_load_texts_reads_folders_jsonl_and_single_files(tmp_path: Path) -> None:
    settings = DatasetSettings()
    write(tmp_path / "eval" / "a.txt", "alpha")
    write(tmp_path / "eval" / "sub" / "b.txt", "beta")
    assert load_texts(tmp_path / "eval", settings) == ["alpha", "beta"]
    assert load_texts(str(tmp_path / "eval" / "a.txt"), settings) == ["alpha"]
    write(tmp_path / "c.jsonl", '{"prompt": "p", "response": "r"}\n{"text": "t"}\n')
    templated = settings.template.format(prompt="p", response="r")
    assert load_texts(tmp_path / "c.jsonl", settings) == [templated, "t"]
    with pytest.raises(ConfigError, match=r"server\.central_eval_path='.*gone' does not exist"):
        load_texts(tmp_path / "gone", settings, key="server.central_eval_path")


# ---------------------------------------------------------------- bad input: one clear error, naming file and value

def load(path: Path, **settings: object) -> datasets.Dataset:
    return load_corpus(DatasetSettings(path=str(path), **settings), num_sources=0, seed=0)


@pytest.mark.parametrize("name, content, message", [
    ("latin/a.txt", b"line one\ncaf\xe9\n", r"a\.txt is not UTF-8 text \(invalid continuation byte at byte 12, line 2\)"),
    ("utf16/a.txt", "hello".encode("utf-16"), r"a\.txt is not UTF-8 text \(invalid start byte at byte 0, line 1\)"),
    ("d.jsonl", b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n', r"d\.jsonl is not UTF-8 text \(.* at byte 29, line 3\)"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": {"a": 1}}\n',
     r"d\.jsonl, line 2: field 'text' holds a JSON object \(\{\"a\": 1\}\), not a string"),
    ("d.jsonl", b'{"text": ["a", "b"]}\n', r"d\.jsonl, line 1: field 'text' holds a JSON array"),
    ("d.jsonl", b'{"prompt": "p", "response": 4}\n', r"d\.jsonl, line 1: field 'response' holds a JSON number \(4\)"),
    ("d.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"d\.jsonl, line 2: expected a JSON object, got list"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "cut\n', r"d\.jsonl, line 2: invalid JSON"),
    ("d.jsonl", b"", r"dataset\.path='.*d\.jsonl' holds no text: none of its 0 record"),
    ("d.jsonl", b'{"text": " "}\n\n{"text": null}\n', r"dataset\.path='.*d\.jsonl' holds no text: none of its 2 record"),
    ("blank/a.txt", b"", r"dataset\.path='.*blank' holds no text: none of its 1 \.txt file"),
    ("one.txt", b"a whole corpus in one file", r"dataset\.path='.*one\.txt' is a single \.txt file.*point "
                                               r"dataset\.path at a folder of \.txt files"),
])
def test_bad_files_are_refused_naming_the_file_and_what_is_wrong(tmp_path: Path, name: str, content: bytes,
                                                                 message: str) -> None:
    path = write(tmp_path / name, content)
    target = path.parent if name.endswith(".txt") and "/" in name else path
    with pytest.raises(ConfigError, match=message):
        load(target)


def test_a_jsonl_line_past_the_limit_is_refused_by_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_JSONL_LINE_BYTES", 100)
    path = write(tmp_path / "d.jsonl", '{"text": "short"}\n' + json.dumps({"text": "x" * 200}) + "\n")
    with pytest.raises(ConfigError, match=r"d\.jsonl, line 2 is longer than 100 bytes, the most one record may take .*split it into several records"):
        load(path)
    write(path, '{"text": "short"}\n' + json.dumps({"text": "x" * 80}) + "\n")  # under the limit: read
    assert load(path)["text"] == ["short", "x" * 80]


def test_huge_files_are_read_only_up_to_the_cap_even_inside_a_character(tmp_path: Path) -> None:
    write(tmp_path / "big" / "a.txt", "é" * 50_000 + "\xff tail never read")  # é is 2 bytes; the read stops at 4,007
    write(tmp_path / "big" / "b.txt", "ok")
    assert load(tmp_path / "big", max_chars_per_source=1001)["text"] == ["é" * 1001, "ok"]
    write(tmp_path / "d.jsonl", json.dumps({"text": "y" * 5000}) + "\n")
    assert load(tmp_path / "d.jsonl", max_chars_per_source=1001)["text"] == ["y" * 1001]


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


# ---------------------------------------------------------------- unreadable paths (chmod 000)

@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder user `nobody` can reach (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="pollinate-perm-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        sub.chmod(0o755)
    shutil.rmtree(path)


def refusal(call: Callable[[], object]) -> str:
    """`call()`'s ConfigError message where chmod 000 bites: as root (who reads anything), in a forked child
    that drops to user nobody."""
    if os.geteuid() != 0:
        with pytest.raises(ConfigError) as err:
            call()
        return str(err.value)
    codecs.lookup("utf-8-sig")  # imported lazily from the stdlib, which lies under /root: nobody cannot import it
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one line, never return into pytest
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            call()
            outcome = "no error"
        except ConfigError as err:
            outcome = f"ConfigError: {err}"
        except BaseException as err:
            outcome = f"{type(err).__name__}: {err}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read, "rb") as handle:
        outcome = handle.read().decode()
    os.waitpid(pid, 0)
    assert outcome.startswith("ConfigError: "), outcome
    return outcome.removeprefix("ConfigError: ")


@pytest.mark.parametrize("locked", ["site1/secret.txt", "site1", ".", "d.jsonl"])
def test_unreadable_files_and_folders_are_named(shared_dir: Path, locked: str) -> None:
    write(shared_dir / "site0" / "a.txt", letter_doc("a"))
    write(shared_dir / "site1" / "secret.txt", letter_doc("b"))
    write(shared_dir / "d.jsonl", '{"text": "t"}\n')
    (shared_dir / locked).chmod(0o000)
    target = shared_dir / "d.jsonl" if locked == "d.jsonl" else shared_dir
    message = refusal(lambda: load(target))
    assert message.startswith(f"dataset.path: {shared_dir / locked} cannot be read (Permission denied); "
                              "give this user read access")


def test_an_unreachable_central_eval_path_is_named(shared_dir: Path) -> None:
    write(shared_dir / "locked" / "eval" / "a.txt", "text")
    (shared_dir / "locked").chmod(0o000)
    message = refusal(lambda: load_texts(shared_dir / "locked" / "eval", DatasetSettings(), key="server.central_eval_path"))
    assert message.startswith(f"server.central_eval_path: {shared_dir / 'locked' / 'eval'} cannot be read (Permission denied)")


def test_a_data_folder_inside_a_locked_folder_is_named(shared_dir: Path) -> None:
    write(shared_dir / "outer" / "data" / "a.txt", letter_doc("a"))
    (shared_dir / "outer").chmod(0o000)
    message = refusal(lambda: load(shared_dir / "outer" / "data"))
    assert message.startswith(f"dataset.path: {shared_dir / 'outer' / 'data'} cannot be read (Permission denied)")


def test_an_unknown_source_lists_the_registered_readers():
    assert set(DATA_SOURCES) == set(READERS) | {"auto"}  # the settings' choices are the registry's names
    with pytest.raises(ConfigError, match=r"dataset.source='csvv' is unknown; choose one of \['auto', 'packages', "
                                          r"'text_folder', 'jsonl', 'huggingface'\]"):
        DatasetSettings(source="csvv")
