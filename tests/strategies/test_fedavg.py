"""FedAvg over adapters: weights by example count, what it tells clients, and the registry's errors."""

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from strategies import build_strategy, strategy_layers
from fedlm.protocol import FROZEN_A, PROXIMAL_MU, ROUND
from tests.conftest import fit_reply


def test_fedavg_weights_adapters_by_example_counts():
    settings = settings_from_dict(RunSettings, {"federation": {"num_clients": 2, "clients_per_round": 2},
                                                "secagg": {"name": "disabled"}})
    strategy = build_strategy(settings, ndarrays_to_parameters([np.zeros(2, np.float32)]))
    params, _ = strategy.aggregate_fit(1, [
        fit_reply([np.array([1.0, 3.0], np.float32)], 1, node="1", train_loss=4.0, train_seconds=2.0),
        fit_reply([np.array([4.0, 0.0], np.float32)], 2, node="2", train_loss=1.0, train_seconds=2.0)], [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [3.0, 1.0])  # (1*a + 2*b) / 3


@pytest.mark.parametrize("name, mu, expected", [
    ("fedavg", 0.0, {ROUND: 3, PROXIMAL_MU: 0.0, FROZEN_A: False}),
    ("fedprox", 0.05, {ROUND: 3, PROXIMAL_MU: 0.05, FROZEN_A: False}),
    ("frozen_a", 0.0, {ROUND: 3, PROXIMAL_MU: 0.0, FROZEN_A: True}),
    ("fedadam", 0.0, {ROUND: 3, PROXIMAL_MU: 0.0, FROZEN_A: False}),
])
def test_instructions_tell_clients_how_to_train(name, mu, expected):
    settings = settings_from_dict(RunSettings, {"strategy": {"name": name, "mu": mu}})
    inner = strategy_layers(build_strategy(settings, ndarrays_to_parameters([np.zeros(1, np.float32)])))[-1]
    assert inner.on_fit_config_fn(3) == expected and inner.on_evaluate_config_fn(3) == expected


def test_clients_per_round_is_exact():
    settings = settings_from_dict(RunSettings, {"federation": {"num_clients": 7, "clients_per_round": 3}})
    strategy = build_strategy(settings, ndarrays_to_parameters([np.zeros(1, np.float32)]))
    assert strategy_layers(strategy)[-1].num_fit_clients(7) == (3, 7)


def test_unknown_strategy_lists_the_choices():
    settings = settings_from_dict(RunSettings, {"strategy": {"name": "fedsgd"}})
    with pytest.raises(ConfigError, match=r"strategy='fedsgd' is unknown; choose one of \['fedadagrad', 'fedadam', 'fedavg', "
                       r"'fedprox', 'fedyogi', 'frozen_a'\]"):
        build_strategy(settings, ndarrays_to_parameters([]))
