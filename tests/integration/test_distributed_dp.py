"""privacy=distributed_dp_sgd on Flower's real Simulation Engine and real SecAgg+: both epsilons against an
independent accountant, a round left with fewer than K_min shares never unmasked, and a resumed DP run whose
ledgers and server optimiser go on where they stopped."""

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import ray.cloudpickle
from flwr.app import Context, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from safetensors.numpy import load_file

from fedlm.ledger import PrivacyLedger
from fedlm.settings import RunSettings, settings_from_dict
from server.checkpoint import read_state
from server.record import read_metrics
from simulations.launch import simulate
from tests.conftest import make_text, pld_epsilon

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray ships the mod below to its workers

CLIENTS, RATE, LOST_ROUND, HORIZON = 3, 0.3, 3, 4


class FailInRound:
    """Client 2 fails its masked-vector stage in `server_round`: after the others have sent their shares."""

    def __init__(self, server_round: int) -> None:
        self.server_round = server_round

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (msg.metadata.message_type == MessageType.TRAIN and context.node_config["partition-id"] == 2
                and msg.metadata.group_id == str(self.server_round) and configs is not None
                and configs[Key.STAGE] == Stage.COLLECT_MASKED_VECTORS):
            raise RuntimeError("injected failure")
        return call_next(msg, context)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("distributed")
    for i in range(CLIENTS):
        (tmp / "data" / f"s{i}").mkdir(parents=True)
        (tmp / "data" / f"s{i}" / "a.txt").write_text(make_text(40 + i, 1200))
    settings = settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(tiny_llama_dir)},
        "dataset": {"path": str(tmp / "data"), "partitioner": "natural", "seq_len": 32, "min_train_sequences": 4,
                    "min_eval_sequences": 1},
        "federation": {"num_clients": CLIENTS, "clients_per_round": CLIENTS, "rounds": LOST_ROUND},
        "train": {"optimizer": "sgd", "learning_rate": 0.5, "batch_size": 8, "max_eval_sequences": 4},
        "privacy": {"name": "distributed_dp_sgd", "sample_rate": RATE, "target_epsilon": 6.0,
                    "horizon_rounds": HORIZON},  # room for the resumed run's fourth round
        "secagg": {"name": "secaggplus", "num_shares": 3, "reconstruction_threshold": 2, "timeout": 60.0},
        "server": {"min_replies": CLIENTS, "save_every": 1},
        "output_dir": str(tmp / "run"),
    })
    return settings, simulate(settings, client_mods=(FailInRound(LOST_ROUND),))


def _adapter(directory):
    tensors = load_file(directory / "adapter_model.safetensors")
    return [tensors[k] for k in sorted(tensors)]


def test_each_client_reports_both_epsilons_as_an_independent_accountant_computes_them(run):
    settings, outcome = run
    rows = read_metrics(outcome.output_dir)
    trained = rows[2]["clients"]
    assert rows[1]["clients_ok"] == rows[2]["clients_ok"] == CLIENTS and not rows[2]["abandoned"]
    sigma = trained[0]["noise_multiplier"]
    assert all(c["noise_multiplier"] == sigma and c["plan_shares"] == CLIENTS for c in trained)
    # The plan calibrated sigma so that the 4 rounds each client plans for spend the budget (6.0).
    assert pld_epsilon(sigma, RATE, HORIZON, 1e-5) == pytest.approx(6.0, abs=0.12)
    for c in trained:
        assert c["epsilon"] == pytest.approx(pld_epsilon(sigma, RATE, 2, 1e-5), abs=0.02)
        assert c["epsilon_alone"] == pytest.approx(pld_epsilon(sigma / math.sqrt(CLIENTS), RATE, 2, 1e-5), abs=0.03)
        assert c["epsilon_alone"] > 1.5 * c["epsilon"]
        assert "train_loss" not in c and "train_tokens" not in c  # nothing data-dependent beside the share
    assert rows[1]["eval_perplexity"] > rows[2]["eval_perplexity"]  # two central DP-SGD steps learned something


def test_a_round_left_with_fewer_than_k_min_shares_is_never_unmasked_and_its_spend_is_kept(run):
    settings, outcome = run
    last = read_metrics(outcome.output_dir)[LOST_ROUND]
    assert last["abandoned"] and last["abandoned_stage"] == "secagg unmask"
    assert "2 noise shares left" in last["abandoned_reason"] and "server.min_replies=3" in last["abandoned_reason"]
    before = _adapter(outcome.output_dir / "checkpoints" / "round_0002")
    for a, b in zip(_adapter(outcome.output_dir / "adapter"), before):
        np.testing.assert_array_equal(a, b)
    # The two clients whose shares left spent that round; the one that failed before training did not.
    spent = [len(PrivacyLedger(outcome.output_dir / "privacy" / f"client_{i}.json").read().history)
             for i in range(CLIENTS)]
    assert sorted(spent) == [2, 3, 3]
    assert json.loads((outcome.output_dir / "settings.json").read_text())["privacy"]["name"] == "distributed_dp_sgd"


def test_a_resumed_run_goes_on_spending_from_the_ledgers_and_restores_the_server_optimiser(run):
    settings, outcome = run
    more = dataclasses.replace(settings, resume=str(outcome.output_dir), output_dir=str(outcome.output_dir),
                               federation=dataclasses.replace(settings.federation, rounds=HORIZON))
    simulate(more)
    rows = read_metrics(outcome.output_dir)
    assert [r["round"] for r in rows] == list(range(HORIZON + 1)) and not rows[HORIZON]["abandoned"]
    sigma = rows[1]["clients"][0]["noise_multiplier"]
    for i in range(CLIENTS):
        state = PrivacyLedger(outcome.output_dir / "privacy" / f"client_{i}.json").read()
        rounds = len(state.history)  # client 2 lost round 3's instruction before training, the others spent it
        assert rounds == (3 if i == 2 else 4)
        assert state.epsilon == pytest.approx(pld_epsilon(sigma, RATE, rounds, 1e-5), abs=0.02) and state.epsilon <= 6.0
    saved = read_state(outcome.output_dir).strategy_state
    assert {"CentralDPSGD.weights.0", "CentralDPSGD.momentum_buffer.0"} <= set(saved)
