"""Unit tests for fedlm/data/partitioning.py: IID, natural and Dirichlet partitions, seeded and checked."""

from __future__ import annotations

import datasets
import pytest

from fedlm.data.partitioning import partition_corpus
from fedlm.settings import ConfigError, DatasetSettings


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
