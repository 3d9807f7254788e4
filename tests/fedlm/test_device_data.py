"""A deployed device's own data: packed with the run's settings, cached by fingerprint, rebuilt when it changes."""

import os

import pytest
import torch

from tests.conftest import make_text
from fedlm.data.preparation import prepare_device_data
from fedlm.settings import ConfigError, RunSettings, settings_from_dict


def _settings(**dataset) -> RunSettings:
    return settings_from_dict(RunSettings, {"dataset": {"seq_len": 16, "min_train_sequences": 2,
                                                        "min_eval_sequences": 1, **dataset}})


def test_device_data_is_cached_and_rebuilt_when_the_text_changes(tmp_path, tokenizer):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text(make_text(1, 300))
    (notes / "b.txt").write_text(make_text(2, 300))
    cache = tmp_path / "state" / "data"
    first = prepare_device_data(str(notes), _settings(), tokenizer, cache)
    [cached] = cache.glob("*.pt")
    stamp = cached.stat().st_mtime_ns
    again = prepare_device_data(str(notes), _settings(), tokenizer, cache)
    assert cached.stat().st_mtime_ns == stamp and torch.equal(again.train, first.train)  # read, not rebuilt
    (notes / "b.txt").write_text(make_text(3, 300))
    os.utime(notes / "b.txt", ns=(stamp + 10**9, stamp + 10**9))  # edited data: a new fingerprint
    changed = prepare_device_data(str(notes), _settings(), tokenizer, cache)
    assert not torch.equal(changed.train, first.train) and len(list(cache.glob("*.pt"))) == 1
    longer = prepare_device_data(str(notes), _settings(seq_len=32), tokenizer, cache)  # the run's settings count
    assert longer.train.shape[1] == 32


def test_missing_device_data_names_the_node_config_key(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="node config data-path"):
        prepare_device_data(str(tmp_path / "nowhere"), _settings(), tokenizer, tmp_path / "cache")
