"""Unit tests for fedlm/data/sources.py: every reader, and the one clear error each bad input gets (offline)."""

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

from fedlm.data import sources
from fedlm.data.sources import READERS, load_corpus, load_texts
from fedlm.settings import DATA_SOURCES, ConfigError, DatasetSettings
from tests.fedlm.data.conftest import letter_doc, write


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


# ---------------------------------------------------------------- single texts (a held-out set)

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


# ---------------------------------------------------------------- the registry

def test_an_unknown_source_lists_the_registered_readers():
    assert set(DATA_SOURCES) == set(READERS) | {"auto"}  # the settings' choices are the registry's names
    with pytest.raises(ConfigError, match=r"dataset.source='csvv' is unknown; choose one of \['auto', 'packages', "
                                          r"'text_folder', 'jsonl', 'huggingface'\]"):
        DatasetSettings(source="csvv")
