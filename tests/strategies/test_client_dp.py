"""Client-level DP: noise of the right size on the average, its own accountant, no round thrown away."""

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fedlm.privacy import client_level_epsilon
from fedlm.settings import RunSettings, settings_from_dict
from strategies import build_strategy, strategy_layers
from strategies.client_dp import ClientLevelDP
from tests.conftest import fit_reply


def _results(vectors, server_round=1):
    return [fit_reply([v], 1, server_round, node=str(i)) for i, v in enumerate(vectors)]


def _strategy(noise, size=3):
    settings = settings_from_dict(RunSettings, {
        "federation": {"num_clients": 10, "clients_per_round": 4},
        "privacy": {"update_clipping_norm": 2.0, "update_noise_multiplier": noise}})
    return build_strategy(settings, ndarrays_to_parameters([np.zeros(size, np.float32)]))


def test_the_wrapper_is_built_from_settings_and_accounts_per_round():
    strategy = _strategy(noise=1.0)
    dp = strategy_layers(strategy)[0]
    assert isinstance(dp, ClientLevelDP) and dp.sample_rate == 0.4
    vectors = [np.full(3, float(i), np.float32) for i in range(4)]
    for rounds in (1, 2):
        _, metrics = strategy.aggregate_fit(rounds, _results(vectors, rounds), [])
        assert metrics["client_epsilon"] == pytest.approx(client_level_epsilon(1.0, 0.4, rounds, 1e-5))
    assert client_level_epsilon(1.0, 0.4, 2, 1e-5) > client_level_epsilon(1.0, 0.4, 1, 1e-5)


def test_noise_has_std_z_c_over_k_and_failures_do_not_discard_the_round():
    strategy = _strategy(noise=1.5, size=200_000)
    big = [np.zeros(200_000, np.float32) for _ in range(4)]
    params, _ = strategy.aggregate_fit(1, _results(big), failures=[RuntimeError("a client dropped")])
    noise = parameters_to_ndarrays(params)[0]
    assert noise.std() == pytest.approx(1.5 * 2.0 / 4, rel=0.02)  # z * C / k, k = the 4 that arrived
    assert abs(noise.mean()) < 0.01


def test_client_level_is_off_by_default():
    layers = strategy_layers(build_strategy(RunSettings(), ndarrays_to_parameters([])))
    assert not any(isinstance(layer, ClientLevelDP) for layer in layers)
