"""The data pipeline: load a corpus, split it among clients, and pack each client's text into token rows."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import random
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import datasets

from fedlm.files import write_atomic
from fedlm.settings import ConfigError, DatasetSettings, RunSettings

OWN_PACKAGES = frozenset({"fedlm", "server", "client", "strategies", "simulations", "tests"})
STRAY_NAMES = frozenset({"examples", "benchmarks", "docs", "scripts", "test"})
"""Folders some wheels drop into site-packages by mistake (opacus ships two): not a package's code base."""
MIN_PACKAGE_CHARS = 60_000
"""A package needs this much Python to fill a train and an eval split."""
MIN_LAST_ROW = 8
"""A final, partial row is kept (padded) only if it holds at least this many real tokens."""
FORMAT_VERSION = 1
"""Bump when the prepared files' layout changes, so old preparations are rebuilt, not reused."""
MAX_JSONL_LINE_BYTES = 64 * 2**20
"""A .jsonl record is parsed whole (a JSON value cannot be cut), so one line must fit in memory; this is 160
times what a record may keep at the default dataset.max_chars_per_source, and a longer line is refused."""
TOKENIZE_PIECE_CHARS = 100_000
"""Longer documents (a minified file, a log with no line breaks) reach the tokenizer in pieces of this size,
cut before whitespace where there is some: they are packed into rows anyway, and a fast tokenizer holds
about 240 bytes per token of a call's whole input (0.7 GB for a 4M-character line, measured)."""
TOKENIZE_BATCH_CHARS = 1_000_000
"""Characters per tokenizer call: bounds that memory for a client of any size (about 0.2 GB a call)."""


# ---------------------------------------------------------------- reading sources

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


def _txt_files(folder: Path, key: str) -> list[Path]:
    """Every .txt file under `folder`, sorted; a subfolder that cannot be read is an error, not skipped."""
    def refuse(err: OSError) -> None:
        raise _unreadable(err.filename, err, key)

    found = []
    for root, _, files in os.walk(folder, onerror=refuse):
        found += [Path(root, f) for f in files if f.endswith(".txt") and os.path.isfile(os.path.join(root, f))]
    return sorted(found)


def _read_text_folder(folder: Path, key: str, max_chars: int) -> tuple[list[str], list[str]]:
    files = _txt_files(folder, key)
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


def _read_jsonl(file: Path, settings: DatasetSettings, key: str) -> tuple[list[str], list[str], bool]:
    """Texts, sources and whether any record had the `partition_by` field."""
    texts, sources, has_field = [], [], False
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


def load_corpus(settings: DatasetSettings, *, num_sources: int, seed: int) -> datasets.Dataset:
    """Load every document of the configured source into one table with `text` and `source` columns.

    Raises:
        ConfigError: if the source is missing, unreadable, malformed or empty.
    """
    kind, cap, has_field = settings.resolved_source(), settings.max_chars_per_source, False
    if kind == "packages":
        texts, sources = _read_packages(num_sources, seed, cap)
    elif kind == "huggingface":
        texts, sources, has_field = _read_hub(settings)
    else:
        path = _existing(settings.path, "dataset.path")
        if path.is_dir() != (kind == "text_folder"):
            want = "a folder of .txt files" if kind == "text_folder" else "a .jsonl file"
            raise ConfigError(f"dataset.source={kind} needs dataset.path to be {want} (got {path}); "
                              "fix dataset.path or set dataset.source=auto")
        if kind == "jsonl" and path.suffix.lower() == ".txt":
            raise ConfigError(f"dataset.path={settings.path!r} is a single .txt file, but the data is split "
                              "among clients by document: point dataset.path at a folder of .txt files "
                              "(one document each) or at a .jsonl file")
        if kind == "text_folder":
            texts, sources = _read_text_folder(path, "dataset.path", cap)
        else:
            texts, sources, has_field = _read_jsonl(path, settings, "dataset.path")
    if kind == "huggingface":  # one record's text (files are capped while reading)
        texts = [t[:cap] for t in texts]
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


# ---------------------------------------------------------------- partitioning

def partition_corpus(corpus: datasets.Dataset, settings: DatasetSettings, num_clients: int,
                     seed: int) -> list[datasets.Dataset]:
    """Split the corpus into `num_clients` partitions with a flwr-datasets partitioner (seeded).

    Raises:
        ConfigError: if the partitioning column is unknown, or the data cannot give every client a share.
    """
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner  # see _read_hub

    kind, by, n_docs = settings.resolved_partitioner(), settings.partition_by, len(corpus)
    if kind != "iid" and by not in corpus.column_names:
        raise ConfigError(f"dataset.partition_by={by!r} is not a field of the data (available: "
                          f"{corpus.column_names}); set it to one of those or use dataset.partitioner=iid")
    if n_docs < num_clients:
        raise ConfigError(f"the data has {n_docs} documents, fewer than federation.num_clients={num_clients}; "
                          "add documents or lower federation.num_clients")
    if kind == "iid":
        partitioner: Any = IidPartitioner(num_partitions=num_clients)
        corpus = corpus.shuffle(seed=seed).flatten_indices()  # IidPartitioner shards contiguously
    elif kind == "natural":
        ids = sorted(corpus.unique(by))
        if len(ids) != num_clients:
            shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
            raise ConfigError(
                f"dataset.partitioner=natural makes one client per distinct dataset.partition_by={by!r} "
                f"value; the data has {len(ids)} ({shown}) but federation.num_clients={num_clients}; set "
                f"federation.num_clients={len(ids)} or dataset.partitioner=iid")
        partitioner = NaturalIdPartitioner(partition_by=by)
    else:
        n_classes = len(corpus.unique(by))
        if n_classes == n_docs or n_classes > 1000:
            raise ConfigError(
                f"dataset.partitioner=dirichlet needs dataset.partition_by={by!r} to group documents into a "
                f"few classes, but it has {n_classes} distinct values over {n_docs} documents; point "
                "dataset.partition_by at a field such as a topic or author, or use dataset.partitioner=iid")
        min_size = max(1, min(10, n_docs // (2 * num_clients)))
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by=by, seed=seed,
                                           alpha=settings.dirichlet_alpha, min_partition_size=min_size)
    partitioner.dataset = corpus
    try:
        # flwr-datasets prints a progress bar and retry warnings; the summary reports the outcome.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return [partitioner.load_partition(i) for i in range(num_clients)]
    except ValueError as err:
        raise ConfigError(
            f"dataset.partitioner={kind} could not give each of federation.num_clients={num_clients} "
            f"clients a share of {n_docs} documents (dataset.dirichlet_alpha={settings.dirichlet_alpha}): "
            f"{err}; raise dataset.dirichlet_alpha, lower federation.num_clients or use "
            "dataset.partitioner=iid") from err


# ---------------------------------------------------------------- tokenised client data

@dataclass
class ClientData:
    """One client's packed token rows: int64 ids and 1/0 masks (0 = padding), for training and evaluation."""

    train: torch.Tensor
    train_mask: torch.Tensor
    eval: torch.Tensor
    eval_mask: torch.Tensor

    def save(self, path: Path) -> None:
        """Save atomically (temporary file, then rename)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        write_atomic(Path(path), lambda handle: torch.save(state, handle))

    @classmethod
    def load(cls, path: Path) -> ClientData:
        """Load a file written by `save`.

        Raises:
            ConfigError: naming the file if it is missing or not a client data file.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise ConfigError(f"client data file {path} is missing; prepare the federation's data "
                              "(prepare_federation) into that folder first") from None
        except Exception as err:  # truncated or foreign files fail in many ways inside torch/pickle
            raise ConfigError(f"client data file {path} is unreadable ({type(err).__name__}: {err}); delete "
                              "it and prepare the data again") from err
        if not isinstance(state, dict) or any(not isinstance(state.get(n), torch.Tensor) for n in names):
            raise ConfigError(f"client data file {path} lacks {names}; delete it and prepare the data again")
        return cls(**{n: state[n] for n in names})


def client_data_path(data_dir: Path, partition_id: int) -> Path:
    """Where `prepare_federation` saves partition `partition_id`'s ClientData."""
    return Path(data_dir) / f"client_{partition_id}.pt"


def _pack(stream: torch.Tensor, seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _tokenize(docs: list[str], tokenizer: Any) -> tuple[list[torch.Tensor], int]:
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


def build_client_data(texts: list[str], tokenizer: Any, settings: DatasetSettings, seed: int,
                      name: str, batch_size: int = 1) -> ClientData:
    """Tokenise, hold out about eval_fraction of the tokens as whole documents (seeded), pack into rows.

    Raises:
        ConfigError: naming `name` if the client ends up with too few training or held-out rows, or fewer
            training rows than one batch of `batch_size`.
    """
    docs = [t for t in texts if t.strip()]
    if not docs:
        raise ConfigError(f"{name} has no text; use fewer clients (federation.num_clients) or more data")
    ids, pad = _tokenize(docs, tokenizer)
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    # Hold out whole documents (in seeded order) worth eval_fraction of the tokens, skipping any that
    # would take over twice that share: counting documents instead lets one tiny or huge file decide.
    target, held_out, held_tokens = settings.eval_fraction * sum(map(len, ids)), set(), 0
    for i in order:
        if held_tokens >= target:
            break
        if held_tokens + len(ids[i]) <= 2 * target and len(held_out) < len(ids) - 1:
            held_out.add(i)
            held_tokens += len(ids[i])
    if held_tokens >= target / 2:
        eval_stream = torch.cat([ids[i] for i in order if i in held_out])
        train_stream = torch.cat([ids[i] for i in order if i not in held_out])
    else:  # one document, or only a few large ones: hold out the tail of the token stream instead
        stream = torch.cat([ids[i] for i in order])
        cut = round(len(stream) * (1 - settings.eval_fraction))
        train_stream, eval_stream = stream[:cut], stream[cut:]
    train, train_mask = _pack(train_stream, settings.seq_len, pad)
    held, held_mask = _pack(eval_stream, settings.seq_len, pad)
    if len(train) < settings.min_train_sequences or len(held) < settings.min_eval_sequences:
        raise ConfigError(
            f"{name} has {len(train)} training and {len(held)} held-out sequences of dataset.seq_len="
            f"{settings.seq_len} tokens (from {len(docs)} documents), but needs dataset.min_train_sequences="
            f"{settings.min_train_sequences} and dataset.min_eval_sequences={settings.min_eval_sequences}; "
            "use fewer clients (federation.num_clients), a lower dataset.seq_len, more data, or lower "
            "dataset.min_train_sequences / dataset.min_eval_sequences")
    if len(train) < batch_size:
        # A batch would be the whole data set every step; under DP-SGD every row would join every step (sample
        # rate 1), which forfeits the privacy amplification of subsampling the calibration relies on.
        raise ConfigError(
            f"{name} has {len(train)} training sequences of dataset.seq_len={settings.seq_len} tokens, fewer "
            f"than one batch (train.batch_size={batch_size}); lower train.batch_size to at most {len(train)}, "
            "use fewer clients (federation.num_clients), a lower dataset.seq_len, or more data")
    return ClientData(train, train_mask, held, held_mask)


# ---------------------------------------------------------------- whole federation

def _files_stamp(path: str) -> list[Any]:
    """Each data file's path, size and modification time, so edited data is not silently reused."""
    stamp: list[Any] = []
    if path and os.path.exists(Path(path).expanduser()):
        root = Path(path).expanduser()
        for file in [root] if root.is_file() else _txt_files(root, "dataset.path"):
            info = file.stat()
            stamp.append([str(file.resolve()), info.st_size, info.st_mtime_ns])
    return stamp


def _fingerprint(settings: RunSettings, tokenizer: Any, data_path: str | None = None) -> str:
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    payload = {"dataset": dataclasses.asdict(settings.dataset), "num_clients": settings.federation.num_clients,
               "seed": settings.seed, "vocab_size": len(tokenizer), "version": FORMAT_VERSION,
               "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "vocab": vocab,
               "files": _files_stamp(settings.dataset.path if data_path is None else data_path)}
    if data_path is not None:
        payload["device_data"] = str(Path(data_path).expanduser().resolve())
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare_device_data(data_path: str, settings: RunSettings, tokenizer: Any, cache_dir: Path) -> ClientData:
    """A device's own text (a .txt folder or file, or .jsonl) as token rows, packed with the run's dataset
    settings and tokenizer; cached in `cache_dir` under a fingerprint, since every message is a new process.

    Raises:
        ConfigError: naming node config data-path if it is missing, empty or too small.
    """
    cached = Path(cache_dir) / f"{_fingerprint(settings, tokenizer, data_path)[:32]}.pt"
    if cached.is_file():
        return ClientData.load(cached)
    texts = load_texts(data_path, settings.dataset, key="node config data-path")
    data = build_client_data(texts, tokenizer, settings.dataset, settings.seed, f"this device (data-path {data_path})")
    for stale in Path(cache_dir).glob("*.pt"):  # one cache entry per device: the run settings of today
        stale.unlink()
    data.save(cached)
    return data


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as indented JSON, atomically (readers see the old file or the new one)."""
    write_atomic(path, lambda handle: handle.write(json.dumps(value, indent=2).encode()))


def prepare_federation(settings: RunSettings, tokenizer: Any, out_dir: Path,
                       corpus: datasets.Dataset | None = None) -> list[dict]:
    """Build, save and summarise every client's data before training; reuse a matching earlier build.

    `corpus` is `load_corpus`'s result when the caller already loaded it (to validate the data first).

    Raises:
        ConfigError: from loading, partitioning or packing; then nothing is written.
    """
    out_dir, ds, n = Path(out_dir), settings.dataset, settings.federation.num_clients
    summary_path, fingerprint_path = out_dir / "summary.json", out_dir / "fingerprint.json"
    fingerprint = _fingerprint(settings, tokenizer)
    with contextlib.suppress(OSError, ValueError):
        if (json.loads(fingerprint_path.read_text()).get("fingerprint") == fingerprint
                and all(client_data_path(out_dir, i).is_file() for i in range(n))):
            summary = json.loads(summary_path.read_text())
            print(f"[data] reusing prepared data for {n} clients in {out_dir}", flush=True)
            return summary
    kind = ds.resolved_source()
    print(f"[data] loading the {kind} corpus", flush=True)
    if corpus is None:
        corpus = load_corpus(ds, num_sources=n, seed=settings.seed)
    print(f"[data] splitting {len(corpus)} documents among {n} clients "
          f"({ds.resolved_partitioner()} partitioning)", flush=True)
    parts = partition_corpus(corpus, ds, n, settings.seed)
    print(f"[data] tokenising into rows of {ds.seq_len} tokens", flush=True)
    built, summary = [], []
    for i, part in enumerate(parts):
        counts = collections.Counter(part["source"])
        sources = [s for s, _ in counts.most_common(5)]
        name = f"client {i}"
        if len(counts) == 1:
            name += f" ({'package' if kind == 'packages' else 'source'} {sources[0]!r})"
        data = build_client_data(part["text"], tokenizer, ds, settings.seed + i, name, settings.train.batch_size)
        built.append(data)
        summary.append({"client": i, "sources": sources, "documents": len(part),
                        "train_sequences": len(data.train), "eval_sequences": len(data.eval),
                        "train_tokens": int(data.train_mask.sum()), "eval_tokens": int(data.eval_mask.sum())})
    # Everything validated: now write. The fingerprint goes last, so a crash mid-way is never reused; a
    # failed write (disk full, permissions) removes what it wrote.
    written = [client_data_path(out_dir, i) for i in range(n)] + [summary_path, fingerprint_path]
    try:
        fingerprint_path.unlink(missing_ok=True)
        for stale in out_dir.glob("client_*.pt"):
            if stale.stem.removeprefix("client_").isdigit() and int(stale.stem.removeprefix("client_")) >= n:
                stale.unlink()
        for i, data in enumerate(built):
            data.save(client_data_path(out_dir, i))
        write_json_atomic(summary_path, summary)
        write_json_atomic(fingerprint_path, {"fingerprint": fingerprint})
    except OSError as err:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise ConfigError(f"output_dir: the prepared data cannot be written to {out_dir} ({err.strerror or err}); "
                          "free disk space or point output_dir at a folder this user may write") from None
    print(f"[data] saved {n} clients' data to {out_dir}", flush=True)
    return summary


def pack_texts(texts: list[str], tokenizer: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `texts` as packed rows (ids, mask): a held-out set used whole, such as a server's."""
    ids, pad = _tokenize([t for t in texts if t.strip()], tokenizer)
    return _pack(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long), seq_len, pad)
