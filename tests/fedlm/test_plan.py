"""A client's privacy plan (fedlm/plan.py): the budget it spends, checked by an independent accountant, the batch
`train.batch_size=auto` picks, and the rounds it plans for."""

import math

import pytest
from opacus.accountants.utils import get_noise_multiplier

from fedlm.plan import auto_batch, plan_privacy, planned_rounds
from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from tests.conftest import pld_epsilon


def _settings(**sections) -> RunSettings:
    base = {"federation": {"num_clients": 8, "clients_per_round": 4, "rounds": 10}, "train": {"local_steps": 10}}
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value
    return settings_from_dict(RunSettings, base)


def test_a_plan_spends_at_most_the_budget_by_an_independent_accountant_and_nearly_all_of_it():
    for n, epsilon in ((746, 8.0), (120, 1.0)):
        settings = _settings(privacy={"target_epsilon": epsilon})
        plan = plan_privacy(settings, n)
        assert plan.sequences == n and plan.delta == 1e-5
        assert plan.planned_steps == 5 * 10  # 10 rounds x 4 of 8 clients: 5 rounds each, of 10 local steps
        independent = pld_epsilon(plan.noise_multiplier, plan.sample_rate, plan.planned_steps, plan.delta)
        # PLD's discretisation (1e-4) and PRV's error bound (0.005) differ by well under 0.01.
        assert 0.98 * epsilon <= independent <= epsilon + 0.01
        assert plan.planned_epsilon == pytest.approx(independent, abs=0.01)


def test_auto_picks_the_batch_where_the_noise_on_a_steps_mean_stops_paying_for_its_compute():
    settings, n, steps = _settings(privacy={"max_auto_batch": 256}), 746, 50
    batch = auto_batch(settings, n, steps, 1e-5)

    def sigma_per_root_batch(b):  # Opacus' own calibration, on its RDP accountant: not the plan's search
        return get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=b / n, steps=steps,
                                    accountant="rdp") / math.sqrt(b)

    assert sigma_per_root_batch(batch) <= min(sigma_per_root_batch(batch // 2), sigma_per_root_batch(2 * batch))
    assert 40 <= batch <= 200  # sampling rates of 0.05-0.27, where sigma reaches ~1 over 50 steps
    assert auto_batch(_settings(), n, steps, 1e-5) == 32  # the default cap: a step's compute, as without DP
    assert auto_batch(settings, 10, steps, 1e-5) <= 10  # never more than the client holds


def test_a_number_wins_over_auto_and_a_fixed_noise_needs_a_number():
    plan = plan_privacy(_settings(train={"batch_size": 32}, privacy={"accountant": "rdp"}), 800)
    assert plan.sample_rate == 32 / 800
    with pytest.raises(ConfigError, match="privacy.noise_multiplier=1 fixes the noise"):
        _settings(privacy={"noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="privacy=disabled has none; set a number"):
        _settings(privacy={"name": "disabled"})


def test_planned_rounds_follow_the_servers_sampling():
    assert planned_rounds(_settings()) == 5
    assert planned_rounds(_settings(federation={"num_clients": 8, "clients_per_round": 3, "rounds": 10})) == 4
    assert planned_rounds(_settings(privacy={"horizon_rounds": 7})) == 7
    # Client-level DP samples cohorts at random: any client may be asked every round.
    assert planned_rounds(_settings(privacy={"update_clipping_norm": 1.0})) == 10
