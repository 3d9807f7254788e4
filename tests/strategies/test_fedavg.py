"""FedAvg over adapters: weights by example count, metrics aggregation, and the registry's errors."""

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from strategies import build_strategy, strategy_layers
from strategies.fedavg import eval_metrics, fit_metrics
from tests.conftest import fit_reply


def test_fedavg_weights_adapters_by_example_counts():
    settings = settings_from_dict(RunSettings, {"federation": {"num_clients": 2, "clients_per_round": 2},
                                                "secagg": {"name": "disabled"}})
    strategy = build_strategy(settings, ndarrays_to_parameters([np.zeros(2, np.float32)]))
    params, metrics = strategy.aggregate_fit(1, [
        fit_reply([np.array([1.0, 3.0], np.float32)], 1, node="1", train_loss=4.0, train_seconds=2.0),
        fit_reply([np.array([4.0, 0.0], np.float32)], 2, node="2", train_loss=1.0, train_seconds=2.0)], [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [3.0, 1.0])  # (1*a + 2*b) / 3
    assert metrics["train_loss"] == pytest.approx(2.0)  # (1*4 + 2*1) / 3
    assert metrics["client_train_seconds"] == 4.0 and metrics["clients_ok"] == 2


def test_eval_metrics_report_worst_and_mean_client():
    out = eval_metrics([(10, {"perplexity": 20.0}), (30, {"perplexity": 40.0})])
    assert out == {"eval_perplexity_worst": 40.0, "eval_perplexity_client_mean": 30.0, "eval_clients": 2}


def test_fit_metrics_weight_the_loss():
    assert fit_metrics([(3, {"train_loss": 1.0, "train_seconds": 1.0, "train_tokens": 5}),
                        (1, {"train_loss": 5.0, "train_seconds": 2.5, "train_tokens": 7})])["train_loss"] == 2.0


def test_clients_per_round_is_exact():
    settings = settings_from_dict(RunSettings, {"federation": {"num_clients": 7, "clients_per_round": 3}})
    strategy = build_strategy(settings, ndarrays_to_parameters([np.zeros(1, np.float32)]))
    assert strategy_layers(strategy)[-1].num_fit_clients(7) == (3, 7)


def test_unknown_strategy_lists_the_choices():
    settings = settings_from_dict(RunSettings, {"strategy": {"name": "fedsgd"}})
    with pytest.raises(ConfigError, match=r"strategy='fedsgd' is unknown; choose one of \['fedadagrad', 'fedadam', 'fedavg', "
                       r"'fedprox', 'fedyogi', 'frozen_a'\]"):
        build_strategy(settings, ndarrays_to_parameters([]))
