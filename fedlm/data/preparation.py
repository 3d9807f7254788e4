"""A client's prepared data (ClientData: its training and held-out rows) and preparing it: for a whole
simulated federation, or for one device from its own folder, cached by fingerprint."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import datasets

from fedlm.data.packing import pack_stream, tokenize_documents
from fedlm.data.partitioning import partition_corpus
from fedlm.data.sources import load_corpus, load_texts, txt_files
from fedlm.files import write_atomic, write_json_atomic
from fedlm.settings import AUTO, ConfigError, DatasetSettings, RunSettings

FORMAT_VERSION = 1
"""Bump when the prepared files' layout changes, so old preparations are rebuilt, not reused."""


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
    ids, pad = tokenize_documents(docs, tokenizer)
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
    train, train_mask = pack_stream(train_stream, settings.seq_len, pad)
    held, held_mask = pack_stream(eval_stream, settings.seq_len, pad)
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
