"""The server half of privacy=distributed_dp_sgd: one DP-SGD step from the decoded sum, worked out by hand; its
state survives a resume, and a state from another optimiser is refused."""

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fedlm.distributed_dp import encode_share, grid_step
from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from strategies import build_strategy, check_strategy
from strategies.distributed_dp import CentralDPSGD
from tests.conftest import fit_reply

W0 = np.array([1.0, -2.0], np.float32)


def _settings(**train) -> RunSettings:
    return settings_from_dict(RunSettings, {
        "federation": {"num_clients": 3, "clients_per_round": 3},
        "privacy": {"name": "distributed_dp_sgd", "sample_rate": 0.5},
        "server": {"min_replies": 2},
        "train": {"optimizer": "sgd", "learning_rate": 0.5, "momentum": 0.0} | train})


def _round(strategy: CentralDPSGD, settings: RunSettings, sums: list[list[float]], sequences: list[int]):
    """What SecAgg+ hands the strategy: every reply carries the mean of the noise-free shares."""
    shares = [encode_share([np.array(s)], 0.0, grid_step(settings), np.random.default_rng(0)) for s in sums]
    mean = [sum(s[0] for s in shares) / len(shares)]
    results = [fit_reply(mean, 1000, node=str(i), sequences=n) for i, n in enumerate(sequences)]
    params, metrics = strategy.aggregate_fit(1, results, [])
    return parameters_to_ndarrays(params)[0], metrics


def test_one_round_is_one_sgd_step_along_the_sum_over_the_expected_batch():
    settings = _settings()
    strategy = build_strategy(settings, ndarrays_to_parameters([W0]))
    assert isinstance(strategy, CentralDPSGD)
    # sums (2, 4) + (1, -1) + (3, 3) = (6, 6) over the expected batch 0.5 x (4 + 6 + 2) = 6: gradient (1, 1);
    # w = (1, -2) - 0.5 x (1, 1) = (0.5, -2.5)
    w1, metrics = _round(strategy, settings, [[2.0, 4.0], [1.0, -1.0], [3.0, 3.0]], [4, 6, 2])
    np.testing.assert_allclose(w1, [0.5, -2.5], atol=1e-5)
    assert metrics["expected_batch"] == 6.0 and metrics["noisy_gradient_norm"] == pytest.approx(2**0.5, abs=1e-5)


def test_momentum_survives_a_resume_and_another_optimisers_state_is_refused():
    settings = _settings(momentum=0.9)
    first = build_strategy(settings, ndarrays_to_parameters([W0]))
    _round(first, settings, [[6.0, 0.0], [0.0, 6.0]], [6, 6])  # gradient (1, 1): buffer (1, 1), w = (0.5, -2.5)
    resumed = build_strategy(settings, ndarrays_to_parameters([W0]))
    resumed.load_state_dict(first.state_dict())
    # buffer 0.9 x (1, 1) + (1, 1) = (1.9, 1.9): w = (0.5, -2.5) - 0.5 x 1.9
    for strategy in (first, resumed):
        w2, _ = _round(strategy, settings, [[6.0, 0.0], [0.0, 6.0]], [6, 6])
        np.testing.assert_allclose(w2, [0.5 - 0.95, -2.5 - 0.95], atol=1e-5)
    adamw = build_strategy(_settings(optimizer="adamw", learning_rate=0.01), ndarrays_to_parameters([W0]))
    with pytest.raises(ValueError, match="train.optimizer=adamw keeps"):
        adamw.load_state_dict(first.state_dict())


def test_a_strategy_that_would_replace_the_dp_step_is_refused():
    for name, extra in (("fedprox", {"mu": 0.01}), ("fedadam", {})):
        settings = settings_from_dict(RunSettings, {
            "privacy": {"name": "distributed_dp_sgd"}, "strategy": {"name": name, **extra}})
        with pytest.raises(ConfigError, match="use strategy=fedavg"):
            check_strategy(settings)
