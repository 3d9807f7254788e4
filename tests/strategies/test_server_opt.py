"""Server optimisers and the learning-rate schedule: one or two rounds worked out by hand, and state round trips."""

import math

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fedlm.settings import RunSettings, settings_from_dict
from strategies import build_strategy, strategy_layers
from strategies.server_opt import ServerOptimizer, server_learning_rate
from tests.conftest import fit_reply

W0 = np.array([0.0, 1.0])
TAU = 1e-9  # negligible against every sqrt(v) below, so the hand values need no tau


def _strategy(name, rounds=10, **strategy) -> ServerOptimizer:
    settings = settings_from_dict(RunSettings, {
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": rounds},
        "secagg": {"name": "disabled"}, "strategy": {"name": name, "tau": TAU, **strategy}})
    return strategy_layers(build_strategy(settings, ndarrays_to_parameters([W0.copy()])))[-1]


def _round(strategy, server_round, client_values):
    """Aggregate one round of clients sending (values, n); returns the new global array."""
    results = [fit_reply([np.array(v)], n, server_round) for v, n in client_values]
    params, _ = strategy.aggregate_fit(server_round, results, [])
    return parameters_to_ndarrays(params)[0]


# Round 1: clients send [0, 1.5] (n=1) and [0.3, 0] (n=2): mean [0.2, 0.5], so delta_1 = [0.2, -0.5].
ROUND_1 = [([0.0, 1.5], 1), ([0.3, 0.0], 2)]


def test_fedadam_two_rounds_by_hand():
    s = _strategy("fedadam", server_learning_rate=0.075, beta_1=0.5, beta_2=0.6)
    # m_1 = 0.5 d = [0.1, -0.25]; v_1 = 0.4 d^2 = [0.016, 0.1]; Flower's bias correction uses t + 1 = 2:
    # eta_1 = 0.075 * sqrt(1 - 0.6^2) / (1 - 0.5^2) = 0.075 * 0.8 / 0.75 = 0.08.
    w1 = _round(s, 1, ROUND_1)
    np.testing.assert_allclose(w1, [0.08 * 0.1 / math.sqrt(0.016), 1 - 0.08 * 0.25 / math.sqrt(0.1)], rtol=1e-6)
    # Round 2: both clients send w1 + 0.1, so delta_2 = [0.1, 0.1].
    # m_2 = 0.5 m_1 + 0.5 d = [0.1, -0.075]; v_2 = 0.6 v_1 + 0.4 d^2 = [0.0136, 0.064];
    # eta_2 = 0.075 * sqrt(1 - 0.6^3) / (1 - 0.5^3).
    w2 = _round(s, 2, [(w1 + 0.1, 1), (w1 + 0.1, 1)])
    eta2 = 0.075 * math.sqrt(1 - 0.216) / 0.875
    np.testing.assert_allclose(w2, w1 + eta2 * np.array([0.1 / math.sqrt(0.0136), -0.075 / math.sqrt(0.064)]),
                               rtol=1e-6)


def test_fedyogi_two_rounds_by_hand():
    s = _strategy("fedyogi", server_learning_rate=0.1, beta_1=0.5, beta_2=0.6)
    # v_0 = 0: v_1 = v_0 - 0.4 d^2 sign(v_0 - d^2) = 0.4 d^2 = [0.016, 0.1]; m_1 = [0.1, -0.25]; no bias correction.
    w1 = _round(s, 1, ROUND_1)
    np.testing.assert_allclose(w1, [0.1 * 0.1 / math.sqrt(0.016), 1 - 0.1 * 0.25 / math.sqrt(0.1)], rtol=1e-6)
    # delta_2 = [0.1, 0.1], d^2 = 0.01 < v_1, so Yogi subtracts: v_2 = v_1 - 0.4 * 0.01 = [0.012, 0.096]
    # (Adam would have decayed v towards d^2 instead: [0.0136, 0.064]); m_2 = [0.1, -0.075].
    w2 = _round(s, 2, [(w1 + 0.1, 1), (w1 + 0.1, 1)])
    np.testing.assert_allclose(w2, w1 + 0.1 * np.array([0.1 / math.sqrt(0.012), -0.075 / math.sqrt(0.096)]),
                               rtol=1e-6)


def test_fedadagrad_two_rounds_by_hand_with_a_cosine_schedule():
    s = _strategy("fedadagrad", rounds=2, server_learning_rate=0.1, lr_schedule="cosine")
    # Adagrad: m = d (beta_1 = 0), v_1 = d^2, so round 1 moves every entry by eta_1 = 0.1 towards the mean.
    w1 = _round(s, 1, ROUND_1)
    np.testing.assert_allclose(w1, [0.1, 0.9], rtol=1e-6)
    # Round 2 of 2: eta_2 = 0.1 * (1 + cos(pi / 2)) / 2 = 0.05; v_2 = [0.04 + 0.01, 0.25 + 0.01].
    w2 = _round(s, 2, [(w1 + 0.1, 1), (w1 + 0.1, 1)])
    np.testing.assert_allclose(w2, w1 + 0.05 * np.array([0.1 / math.sqrt(0.05), 0.1 / math.sqrt(0.26)]), rtol=1e-6)


def test_cosine_schedule_by_hand():
    # eta (1 + cos(pi (t - 1) / T)) / 2 with eta 0.1, T = 4: 0.1, 0.05 (1 + 1/sqrt 2), 0.05, 0.05 (1 - 1/sqrt 2).
    got = [server_learning_rate(0.1, "cosine", t, 4) for t in (1, 2, 3, 4)]
    np.testing.assert_allclose(got, [0.1, 0.05 * (1 + 2 ** -0.5), 0.05, 0.05 * (1 - 2 ** -0.5)])
    assert server_learning_rate(0.1, "constant", 3, 4) == 0.1
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        server_learning_rate(0.1, "linear", 1, 4)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_optimiser_state_survives_a_file_round_trip(tmp_path, name):
    first = _strategy(name, server_learning_rate=0.05)
    w1 = _round(first, 1, ROUND_1)
    assert first.state_dict()["m_t.0"].any()
    np.savez(tmp_path / "state.npz", **first.state_dict())
    restored = _strategy(name, server_learning_rate=0.05)
    with np.load(tmp_path / "state.npz") as saved:
        restored.load_state_dict(dict(saved))
    round_2 = [(w1 + 0.1, 1), (w1 - 0.3, 3)]
    after_restore = _round(restored, 2, round_2)
    np.testing.assert_array_equal(after_restore, _round(first, 2, round_2))
    # Without the state, a fresh optimiser steps differently: the round trip is what makes them equal.
    assert not np.allclose(_round(_strategy(name, server_learning_rate=0.05), 2, round_2), after_restore)


def test_state_before_the_first_round_and_a_mismatched_state():
    s = _strategy("fedadam")
    assert set(s.state_dict()) == {"current_weights.0"}  # no moments yet
    s.load_state_dict(s.state_dict())
    assert s.m_t is None and s.v_t is None
    with pytest.raises(ValueError, match="expected 1 arrays of this adapter's shapes"):
        s.load_state_dict({"current_weights.0": np.zeros(3)})
