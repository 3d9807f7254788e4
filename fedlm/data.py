"""The data pipeline after reading (fedlm/sources.py): split the corpus among clients, pack each client's text into
token rows, and prepare a whole federation."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import datasets

from fedlm.files import write_atomic
from fedlm.settings import AUTO, ConfigError, DatasetSettings, RunSettings
from fedlm.sources import load_corpus, load_texts, txt_files

MIN_LAST_ROW = 8
"""A final, partial row is kept (padded) only if it holds at least this many real tokens."""
FORMAT_VERSION = 1
"""Bump when the prepared files' layout changes, so old preparations are rebuilt, not reused."""
TOKENIZE_PIECE_CHARS = 100_000
"""Longer documents (a minified file, a log with no line breaks) reach the tokenizer in pieces of this size,
cut before whitespace where there is some: they are packed into rows anyway, and a fast tokenizer holds
about 240 bytes per token of a call's whole input (0.7 GB for a 4M-character line, measured)."""
TOKENIZE_BATCH_CHARS = 1_000_000
"""Characters per tokenizer call: bounds that memory for a client of any size (about 0.2 GB a call)."""


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
        for file in [root] if root.is_file() else txt_files(root, "dataset.path"):
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
    fixed_batch = settings.train.batch_size if settings.train.batch_size != AUTO else 1  # auto fits any n
    for i, part in enumerate(parts):
        counts = collections.Counter(part["source"])
        sources = [s for s, _ in counts.most_common(5)]
        name = f"client {i}"
        if len(counts) == 1:
            name += f" ({'package' if kind == 'packages' else 'source'} {sources[0]!r})"
        data = build_client_data(part["text"], tokenizer, ds, settings.seed + i, name, fixed_batch)
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
