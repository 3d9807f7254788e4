"""Impossible strategy settings fail before any work starts (check_strategy), saying why and what to use instead."""

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from strategies import STRATEGIES, build_strategy, check_strategy


def _settings(strategy, **extra):
    settings = settings_from_dict(RunSettings, {"strategy": strategy, **extra})
    check_strategy(settings)
    return settings


@pytest.mark.parametrize("strategy, message", [
    ({"name": "fedprox"}, r"strategy=fedprox needs strategy.mu > 0 .*use strategy=fedavg"),
    ({"name": "fedavg", "mu": 0.1}, r"strategy.mu=0.1 is FedProx's .* use strategy=fedprox"),
    ({"name": "frozen_a", "lr_schedule": "cosine"}, r"strategy=frozen_a has none; use one of \['fedadagrad', 'fedadam'"),
    ({"name": "fedadam", "lr_schedule": "step"}, r"strategy.lr_schedule='step' is unknown"),
    ({"name": "fedyogi", "beta_2": 1.0}, r"strategy.beta_1 and strategy.beta_2 must be in \[0, 1\)"),
])
def test_impossible_strategy_settings_say_why_and_what_instead(strategy, message):
    with pytest.raises(ConfigError, match=message):
        _settings(strategy)


def test_server_optimisers_refuse_client_level_dp():
    with pytest.raises(ConfigError, match=r"strategy=fedadam cannot be combined with client-level DP.*use "
                                          r"strategy=fedavg, fedprox or frozen_a"):
        _settings({"name": "fedadam"}, privacy={"update_clipping_norm": 1.0})
    _settings({"name": "fedprox", "mu": 0.01}, privacy={"update_clipping_norm": 1.0})  # mean-based: fine


def test_frozen_a_refuses_lower_client_ranks():
    with pytest.raises(ConfigError, match=r"strategy=frozen_a cannot be combined with lora.client_ranks=\[2, 8\]"):
        _settings({"name": "frozen_a"}, lora={"r": 8, "client_ranks": [2, 8]})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_with_dp_and_secagg(name):
    settings = _settings({"name": name, "mu": 0.01 if STRATEGIES[name].proximal else 0.0})
    assert settings.privacy.enabled and settings.secagg.enabled  # the defaults
    assert build_strategy(settings, ndarrays_to_parameters([np.zeros(2, np.float32)])) is not None
