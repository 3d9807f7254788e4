"""DP-SGD in a real federation: cumulative epsilon, a client that declines the round that would exceed its
budget, and device privacy floors."""

import json

import pytest

from client.lora_client import LoraClient
from fedlm.ledger import PrivacyLedger
from fedlm.privacy import epsilon_of
from fedlm.protocol import DECLINES, BudgetExceeded
from fedlm.settings import RunSettings, settings_from_dict
from simulations.launch import simulate
from tests.conftest import make_text, pld_epsilon

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NOISE, STEPS, BATCH = 1.0, 2, 4


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A small and a large source: the small client samples each row more often and spends faster."""
    root = tmp_path_factory.mktemp("uneven")
    for i, (source, words) in enumerate([("small", 300), ("small", 300), ("large", 1500), ("large", 1500)]):
        (root / source).mkdir(exist_ok=True)
        (root / source / f"doc{i}.txt").write_text(make_text(900 + i, words))
    return root


def _settings(tmp_path, model_dir, data_dir, target) -> RunSettings:
    return settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"path": str(data_dir), "partitioner": "natural", "seq_len": 32,
                    "min_train_sequences": 4, "min_eval_sequences": 1},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 3},
        "train": {"local_steps": STEPS, "batch_size": BATCH, "learning_rate": 0.01},
        "privacy": {"name": "dp_sgd", "noise_multiplier": NOISE, "target_epsilon": target},
        "secagg": {"name": "disabled"},
        "output_dir": str(tmp_path / "run"),
    })


def _epsilon(n_train: int, rounds: int) -> float:
    return epsilon_of([(NOISE, BATCH / n_train, STEPS)] * rounds, min(1e-5, 1 / n_train))


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, tiny_llama_dir, two_sources):
    tmp = tmp_path_factory.mktemp("budget")
    # Prepare once with a placeholder budget to learn each client's size, then pick a budget that the
    # small client exhausts after exactly two rounds while the large one lasts all three.
    probe = simulate(_settings(tmp / "probe", tiny_llama_dir, two_sources, target=1e6))
    sizes = [c["train_sequences"] for c in json.loads((probe.output_dir / "data" / "summary.json").read_text())]
    small, large = (0, 1) if sizes[0] < sizes[1] else (1, 0)
    target = max(_epsilon(sizes[small], 2), _epsilon(sizes[large], 3)) * 1.001
    assert target < _epsilon(sizes[small], 3), "the data no longer separates the clients' spending"
    settings = _settings(tmp, tiny_llama_dir, two_sources, target)
    return settings, simulate(settings), sizes, small, large


def test_a_small_budget_declines_exactly_the_round_that_would_exceed_it(budget_run):
    settings, outcome, sizes, small, large = budget_run
    rows = outcome.rows
    assert [(r["clients_ok"], r["clients_declined"]) for r in rows[1:]] == [(2, 0), (2, 0), (1, 1)]
    # The refusal travels as its error code, so it is a non-participant, not a failure, and the round goes on.
    assert rows[3]["clients_failed"] == 0
    assert "past its lifetime budget" in rows[3]["declined"][0]["reason"]
    # One update is never published as the global adapter (server.min_replies), though its privacy was spent.
    assert [r["abandoned"] for r in rows[1:]] == [False, False, True]
    small_ledger = PrivacyLedger(outcome.output_dir / "privacy" / f"client_{small}.json").read()
    large_ledger = PrivacyLedger(outcome.output_dir / "privacy" / f"client_{large}.json").read()
    assert small_ledger.epsilon == pytest.approx(_epsilon(sizes[small], 2), abs=1e-9)
    assert large_ledger.epsilon == pytest.approx(_epsilon(sizes[large], 3), abs=1e-9)
    assert max(small_ledger.epsilon, large_ledger.epsilon) <= settings.privacy.target_epsilon


def test_reported_epsilon_is_cumulative_over_every_round_joined(budget_run):
    _, outcome, sizes, small, large = budget_run
    rows = outcome.rows
    assert "epsilon_max" not in rows[0]
    for r in (1, 2):
        assert rows[r]["epsilon_max"] == pytest.approx(_epsilon(min(sizes), r), abs=1e-6)
    assert rows[3]["epsilon_max"] == pytest.approx(_epsilon(sizes[large], 3), abs=1e-6)  # only the large one trained
    assert rows[3]["delta"] == pytest.approx(min(1e-5, 1 / sizes[large]))
    report = (outcome.output_dir / "report.md").read_text()
    assert "privacy unit is one training sequence" in report and (outcome.output_dir / "epsilon.png").exists()


def test_a_device_floor_refuses_a_run_asking_for_less_privacy(budget_run):
    settings, outcome, *_ = budget_run
    run = settings_from_dict(RunSettings, {**json.loads(settings.to_json()), "privacy": {"name": "dp_sgd", "target_epsilon": 8.0}})
    client = LoraClient(run, 0, {"partition-id": 0, "max-epsilon": 2.0, "state-dir": str(outcome.output_dir / "device")})
    with pytest.raises(BudgetExceeded, match=rf"{DECLINES}: the run's privacy.target_epsilon=8 exceeds this device's max-epsilon=2"):
        client.fit(client.get_parameters({}), {"round": 1})
    plain = settings_from_dict(RunSettings, {**json.loads(settings.to_json()), "privacy": {"name": "disabled"}})
    client = LoraClient(plain, 0, {"partition-id": 0, "min-noise-multiplier": 0.5})
    with pytest.raises(BudgetExceeded, match="privacy=disabled but this device requires differential privacy"):
        client.fit(client.get_parameters({}), {"round": 1})


def test_client_level_dp_under_secagg_reports_its_own_epsilon(tmp_path, tiny_llama_dir, text_folder):
    from fedlm.privacy import client_level_epsilon
    settings = settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(tiny_llama_dir)},
        "dataset": {"path": str(text_folder), "seq_len": 32, "min_train_sequences": 2, "min_eval_sequences": 1},
        "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2},
        "train": {"local_steps": 2, "batch_size": 4},
        "privacy": {"name": "disabled", "update_clipping_norm": 0.5, "update_noise_multiplier": 1.0},
        "output_dir": str(tmp_path / "run"),
    })
    rows = simulate(settings).rows
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3]
    for r in (1, 2):
        assert rows[r]["client_epsilon"] == pytest.approx(client_level_epsilon(1.0, 1.0, r, 1e-5))
    assert "epsilon_max" not in rows[2]  # the sample-level layer is off and reported as off


def test_planned_clients_join_the_rounds_they_planned_for_and_spend_their_whole_budget(tmp_path, tiny_llama_dir,
                                                                                       text_folder):
    settings = settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(tiny_llama_dir)},
        "dataset": {"path": str(text_folder), "partitioner": "iid", "seq_len": 32, "min_train_sequences": 4,
                    "min_eval_sequences": 1},
        "federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 3},  # 6 slots: 2 rounds each
        "train": {"local_steps": 2, "batch_size": "auto"},
        "privacy": {"name": "dp_sgd", "target_epsilon": 4.0},
        "secagg": {"name": "disabled"},
        "output_dir": str(tmp_path / "run"),
    })
    outcome = simulate(settings)
    sizes = [c["train_sequences"] for c in json.loads((outcome.output_dir / "data" / "summary.json").read_text())]
    trained = {}
    for row in outcome.rows[1:]:
        assert row["clients_ok"] == 2 and row["clients_declined"] == 0
        for metrics in row["clients"]:
            trained.setdefault(metrics["client"], []).append(metrics)
    assert sorted((c, len(m)) for c, m in trained.items()) == [(0, 2), (1, 2), (2, 2)]
    for client, metrics in trained.items():
        ledger = PrivacyLedger(outcome.output_dir / "privacy" / f"client_{client}.json").read()
        plan = ledger.parameters
        assert plan.sequences == sizes[client] and plan.planned_steps == 2 * 2
        assert plan.sample_rate * plan.sequences == metrics[0]["plan_batch"] <= sizes[client]
        # Every round trained with the plan's noise and rate (the ledger records what each spend used) ...
        assert {(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger.history} == {
            (plan.noise_multiplier, plan.sample_rate, 2)}
        # ... and at the end the whole budget is spent, never more, by an accountant independent of Opacus.
        independent = pld_epsilon(plan.noise_multiplier, plan.sample_rate, 4, plan.delta)
        assert 0.98 * 4.0 <= independent <= 4.0 + 0.01
        assert metrics[-1]["epsilon"] == ledger.epsilon == pytest.approx(independent, abs=0.01)
    report = (outcome.output_dir / "report.md").read_text()
    assert "Each client's privacy plan" in report and "| 100 % |" in report
