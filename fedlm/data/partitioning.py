"""Splitting a corpus among clients: flwr-datasets partitioners (natural, IID, Dirichlet), seeded."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

from fedlm.settings import ConfigError, DatasetSettings


def partition_corpus(corpus: datasets.Dataset, settings: DatasetSettings, num_clients: int,
                     seed: int) -> list[datasets.Dataset]:
    """Split the corpus into `num_clients` partitions with a flwr-datasets partitioner (seeded).

    Raises:
        ConfigError: if the partitioning column is unknown, or the data cannot give every client a share.
    """
    # Here, as in sources._read_hub: a deployed client never partitions, and every message is a new process.
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

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
