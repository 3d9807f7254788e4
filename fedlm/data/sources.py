"""Reading the clients' private text: one reader per source kind, registered in READERS (no torch here, so the
device daemon checks its data folder with the same readers the client trains from)."""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

from fedlm.settings import ConfigError, DatasetSettings

OWN_PACKAGES = frozenset({"fedlm", "server", "client", "strategies", "simulations", "tests"})
STRAY_NAMES = frozenset({"examples", "benchmarks", "docs", "scripts", "test"})
"""Folders some wheels drop into site-packages by mistake (opacus ships two): not a package's code base."""
MIN_PACKAGE_CHARS = 60_000
"""A package needs this much Python to fill a train and an eval split."""
MAX_JSONL_LINE_BYTES = 64 * 2**20
"""A .jsonl record is parsed whole (a JSON value cannot be cut), so one line must fit in memory; this is 160
times what a record may keep at the default dataset.max_chars_per_source, and a longer line is refused."""


def _unreadable(path: Path | str, err: OSError, key: str) -> ConfigError:
    return ConfigError(f"{key}: {path} cannot be read ({err.strerror or err}); give this user read access to "
                       "it (chmod u+r on files, u+rx on folders) or remove it from the data")


def _existing(path: Path | str, key: str) -> Path:
    resolved = Path(path).expanduser()
    try:
        resolved.stat()
    except FileNotFoundError:
        raise ConfigError(f"{key}={str(path)!r} does not exist; point it at a folder of UTF-8 .txt files "
                          "or a .jsonl file") from None
    except OSError as err:  # a folder on the way that this user may not enter
        raise _unreadable(path, err, key) from None
    return resolved


def _not_utf8(file: Path, err: UnicodeDecodeError, offset: int, line: int) -> ConfigError:
    return ConfigError(f"{file} is not UTF-8 text ({err.reason} at byte {offset}, line {line}); "
                       "re-save it as UTF-8 or remove it")


def _read_utf8(file: Path, max_chars: int, key: str) -> str:
    """The file's first `max_chars` characters. Reads at most 4 bytes a character (UTF-8's longest), so a
    file of any size costs at most that much memory.

    Raises:
        ConfigError: naming the file if it cannot be read, or the byte and line that is not UTF-8.
    """
    limit = 4 * max_chars + 3  # and a byte-order mark
    try:
        with open(file, "rb") as handle:
            raw = handle.read(limit)
            cut = len(raw) == limit and handle.read(1) != b""
    except OSError as err:
        raise _unreadable(file, err, key) from None
    try:
        return raw.decode("utf-8-sig")[:max_chars]
    except UnicodeDecodeError as err:
        if cut and err.reason == "unexpected end of data":  # the read limit fell inside a character
            return raw[:err.start].decode("utf-8-sig")[:max_chars]
        raise _not_utf8(file, err, err.start, raw.count(b"\n", 0, err.start) + 1) from None


def _package_roots() -> dict[str, Path]:
    """Top-level third-party packages and modules in this interpreter's site-packages: name -> path."""
    paths = sysconfig.get_paths()
    found: dict[str, Path] = {}
    for root in dict.fromkeys((paths["purelib"], paths["platlib"])):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            is_module = entry.endswith(".py") and os.path.isfile(path)
            name = entry[:-3] if is_module else entry
            # The stdlib is the base model's pretraining corpus, and our own code is not client data.
            if ((is_module or os.path.isdir(path)) and name.isidentifier() and not name.startswith("__")
                    and name not in sys.stdlib_module_names and name not in OWN_PACKAGES | STRAY_NAMES):
                found.setdefault(name, Path(path))
    return found


def _py_files(path: Path) -> Iterator[Path]:
    """A package's .py files in a deterministic (sorted) walk order."""
    if path.is_file():
        yield path
        return
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        yield from (Path(folder, f) for f in sorted(files) if f.endswith(".py"))


def _has_chars(path: Path, need: int) -> bool:
    total = 0
    for file in _py_files(path):  # sizes only, and stop early: scanning all of site-packages stays fast
        total += os.path.getsize(file)
        if total >= need:
            return True
    return False


def _read_packages(num_sources: int, seed: int, cap: int) -> tuple[list[str], list[str]]:
    roots = _package_roots()
    eligible = sorted(name for name, path in roots.items() if _has_chars(path, MIN_PACKAGE_CHARS))
    if len(eligible) < num_sources:
        raise ConfigError(
            f"federation.num_clients={num_sources} needs as many installed third-party packages with "
            f">= {MIN_PACKAGE_CHARS} characters of Python, but only {len(eligible)} are available; "
            f"set federation.num_clients<={len(eligible)} or use your own data via dataset.path")
    texts, sources = [], []
    for name in sorted(random.Random(seed).sample(eligible, num_sources)):
        total = 0
        for file in _py_files(roots[name]):
            if total >= cap:
                break
            text = file.read_text(encoding="utf-8", errors="replace")[: cap - total]
            total += len(text)
            texts.append(text)
            sources.append(name)
    return texts, sources


def txt_files(folder: Path, key: str) -> list[Path]:
    """Every .txt file under `folder`, sorted; a subfolder that cannot be read is an error, not skipped."""
    def refuse(err: OSError) -> None:
        raise _unreadable(err.filename, err, key)

    found = []
    for root, _, files in os.walk(folder, onerror=refuse):
        found += [Path(root, f) for f in files if f.endswith(".txt") and os.path.isfile(os.path.join(root, f))]
    return sorted(found)


def _read_text_folder(folder: Path, key: str, max_chars: int) -> tuple[list[str], list[str]]:
    files = txt_files(folder, key)
    if not files:
        raise ConfigError(f"{key}={str(folder)!r} has no .txt files; add UTF-8 .txt files (one document "
                          "each, optionally in one subfolder per source) or point it at a .jsonl file")
    texts = [_read_utf8(file, max_chars, key) for file in files]
    rels = [file.relative_to(folder) for file in files]
    return texts, [rel.parts[0] if len(rel.parts) > 1 else rel.stem for rel in rels]


def _field_text(record: dict[str, Any], field: str, where: str) -> str:
    value = record[field]
    if value is not None and not isinstance(value, str):  # str() would train on "{'a': 1}" or "[...]"
        kind = {"dict": "object", "list": "array", "bool": "boolean"}.get(type(value).__name__, "number")
        raise ConfigError(f"{where}: field {field!r} holds a JSON {kind} ({json.dumps(value)[:40]}), "
                          "not a string; store the text as a JSON string, or point the dataset.*_field "
                          "settings at the fields that hold text")
    return value or ""


def _record_text(record: dict[str, Any], settings: DatasetSettings, where: str) -> str:
    if settings.text_field in record:
        return _field_text(record, settings.text_field, where)
    if settings.prompt_field in record and settings.response_field in record:
        try:
            return settings.template.format(prompt=_field_text(record, settings.prompt_field, where),
                                            response=_field_text(record, settings.response_field, where))
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"dataset.template={settings.template!r} cannot be filled ({err!r}); it may "
                              "only use {prompt} and {response} (write literal braces as {{ }})") from None
    raise ConfigError(
        f"{where} has neither a {settings.text_field!r} field nor both {settings.prompt_field!r} and "
        f"{settings.response_field!r} (it has {sorted(record)}); set dataset.text_field, or "
        "dataset.prompt_field and dataset.response_field, to your field names")


def _jsonl_lines(file: Path, key: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, read one at a time and refused past MAX_JSONL_LINE_BYTES."""
    try:
        handle = open(file, "rb")
    except OSError as err:
        raise _unreadable(file, err, key) from None
    with handle:
        offset = 0
        for lineno in itertools.count(1):
            raw = handle.readline(MAX_JSONL_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_JSONL_LINE_BYTES:
                raise ConfigError(f"{file}, line {lineno} is longer than {MAX_JSONL_LINE_BYTES:,} bytes, "
                                  "the most one record may take (it is parsed whole); split it into several "
                                  "records")
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(file, err, offset + err.start, lineno) from None
            offset += len(raw)


def _jsonl_records(file: Path, key: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; anything but one JSON object a line is refused by number."""
    for lineno, line in _jsonl_lines(file, key):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}, line {lineno}: invalid JSON ({err.msg}); "
                              "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{file}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _read_jsonl(file: Path, settings: DatasetSettings, key: str) -> tuple[list[str], list[str], bool]:
    """Texts, sources and whether any record had the `partition_by` field."""
    texts, sources, has_field = [], [], False
    for lineno, record in _jsonl_records(file, key):
        texts.append(_record_text(record, settings, f"{file}, line {lineno}")[: settings.max_chars_per_source])
        origin = record.get(settings.partition_by)
        has_field |= origin is not None
        sources.append(str(lineno) if origin is None else str(origin))  # else each record is its own origin
    return texts, sources, has_field


def _read_hub(settings: DatasetSettings) -> tuple[list[str], list[str], bool]:
    try:
        import datasets  # here: a deployed client reads only its own files, and every message is a new process

        table = datasets.load_dataset(settings.hf_name, split=settings.hf_split)
    except Exception as err:  # network, auth, missing split, script errors: all mean "cannot load"
        raise ConfigError(f"dataset.hf_name={settings.hf_name!r} (split {settings.hf_split!r}) could not be "
                          f"loaded: {type(err).__name__}: {err}; check the id, the split, your network and "
                          "hub login, or use local data via dataset.path") from err
    columns = table.column_names
    if settings.text_field in columns:
        texts = ["" if t is None else str(t) for t in table[settings.text_field]]
    elif settings.prompt_field in columns and settings.response_field in columns:
        texts = [_record_text({settings.prompt_field: p, settings.response_field: r}, settings, "")
                 for p, r in zip(table[settings.prompt_field], table[settings.response_field])]
    else:
        raise ConfigError(f"dataset.hf_name={settings.hf_name!r} has neither a {settings.text_field!r} column "
                          f"nor both {settings.prompt_field!r} and {settings.response_field!r} (it has "
                          f"{columns}); set dataset.text_field or dataset.prompt_field/response_field")
    has_field = settings.partition_by in columns
    origins = table[settings.partition_by] if has_field else [None] * len(texts)
    return texts, [str(i) if o is None else str(o) for i, o in enumerate(origins)], has_field


def _local_path(settings: DatasetSettings, kind: str) -> Path:
    path = _existing(settings.path, "dataset.path")
    if path.is_dir() != (kind == "text_folder"):
        want = "a folder of .txt files" if kind == "text_folder" else "a .jsonl file"
        raise ConfigError(f"dataset.source={kind} needs dataset.path to be {want} (got {path}); "
                          "fix dataset.path or set dataset.source=auto")
    if kind == "jsonl" and path.suffix.lower() == ".txt":
        raise ConfigError(f"dataset.path={settings.path!r} is a single .txt file, but the data is split "
                          "among clients by document: point dataset.path at a folder of .txt files "
                          "(one document each) or at a .jsonl file")
    return path


Documents = tuple[list[str], list[str], bool]
"""Texts, their sources (origins), and whether the sources came from the data's own `partition_by` field."""
Reader = Callable[[DatasetSettings, int, int], Documents]
"""(dataset settings, clients to serve, seed) -> documents."""

READERS: dict[str, Reader] = {
    "packages": lambda ds, n, seed: (*_read_packages(n, seed, ds.max_chars_per_source), False),
    "text_folder": lambda ds, n, seed: (*_read_text_folder(_local_path(ds, "text_folder"), "dataset.path",
                                                           ds.max_chars_per_source), False),
    "jsonl": lambda ds, n, seed: _read_jsonl(_local_path(ds, "jsonl"), ds, "dataset.path"),
    "huggingface": lambda ds, n, seed: _read_hub(ds),
}
"""The one registry of `dataset.source` kinds (fedlm/settings.py's DATA_SOURCES lists these names and `auto`;
a test keeps them equal). A new format is a reader here, its name there, and a conf/dataset/ YAML."""


def load_corpus(settings: DatasetSettings, *, num_sources: int, seed: int) -> datasets.Dataset:
    """Load every document of the configured source into one table with `text` and `source` columns.

    Raises:
        ConfigError: if the source is missing, unreadable, malformed or empty.
    """
    kind, cap = settings.resolved_source(), settings.max_chars_per_source
    texts, sources, has_field = READERS[kind](settings, num_sources, seed)
    texts = [t[:cap] for t in texts]  # files are capped while reading; a hub record is capped here
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if not keep:
        key, where = ("dataset.hf_name", settings.hf_name) if kind == "huggingface" else ("dataset.path", settings.path)
        items = ".txt file(s)" if kind == "text_folder" else "record(s)"
        raise ConfigError(f"{key}={where!r} holds no text: none of its {len(texts)} {items} holds more than "
                          "whitespace; add text to them")
    import datasets  # see _read_hub

    columns = {"text": [texts[i] for i in keep], "source": [sources[i] for i in keep]}
    if has_field and settings.partition_by not in columns:  # keep the user's grouping field by name
        columns[settings.partition_by] = columns["source"]
    return datasets.Dataset.from_dict(columns)


def load_texts(path: Path | str, settings: DatasetSettings, *, key: str = "dataset.path") -> list[str]:
    """Read a folder of .txt files, one .txt file or a .jsonl file into non-empty texts.

    Raises:
        ConfigError: naming `key` if the path is missing or holds no text, or the bad file and line.
    """
    resolved, cap = _existing(path, key), settings.max_chars_per_source
    if resolved.is_dir():
        texts = _read_text_folder(resolved, key, cap)[0]
    elif resolved.suffix == ".txt":
        texts = [_read_utf8(resolved, cap, key)]
    else:
        texts = _read_jsonl(resolved, settings, key)[0]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"{key}={str(path)!r} holds no non-empty text; add documents to it")
    return texts




def check_local_text(path: Path | str, key: str) -> None:
    """What a device holds, checked with the readers it will train from: a folder of .txt files, one .txt file
    or a .jsonl file, every file UTF-8 and some of it non-empty. The field names of .jsonl records belong to
    the run's settings, which a device learns later, so here each line need only be a JSON object.

    Raises:
        ConfigError: naming `key`, the file (and byte and line) and the fix.
    """
    resolved = _existing(path, key)
    if resolved.is_dir():
        if not txt_files(resolved, key):
            raise ConfigError(f"{key} {path} holds no .txt file; put this device's text there (UTF-8 .txt files)")
        load_texts(resolved, DatasetSettings(), key=key)
    elif resolved.suffix == ".txt":
        load_texts(resolved, DatasetSettings(), key=key)
    elif resolved.suffix == ".jsonl":
        if not sum(1 for _ in _jsonl_records(resolved, key)):
            raise ConfigError(f"{key} {path} holds no record; put this device's text in it")
    else:
        raise ConfigError(f"{key} {path} must be a folder of .txt files, a .txt file or a .jsonl file")
