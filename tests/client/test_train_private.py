"""LoraClient.train_private over the ledger transaction: plan once, refuse before training, record before sending."""

from types import SimpleNamespace

import pytest
import torch

import client.lora_client as lora_client
from client.lora_client import LoraClient
from fedlm.ledger import LedgerParameters, PrivacyLedger
from fedlm.privacy import epsilon_of
from fedlm.protocol import DECLINES, BudgetExceeded
from fedlm.settings import FederationSettings, PrivacySettings, RunSettings, TrainSettings
from fedlm.training import TrainResult


@pytest.fixture()
def private_client(tmp_path, monkeypatch):
    """A LoraClient without a model: DP-SGD and the plan are stubbed (tests/fedlm/test_plan.py tests the plan),
    the ledger is real."""
    settings = RunSettings(train=TrainSettings(local_steps=5, batch_size=10),
                           federation=FederationSettings(rounds=4),
                           privacy=PrivacySettings(name="dp_sgd", target_epsilon=8.0), output_dir=str(tmp_path))
    client = object.__new__(LoraClient)
    ids = torch.zeros((40, 4), dtype=torch.long)
    client.settings, client.partition_id, client.node_config, client.run_id = settings, 1, {}, 3
    client.model, client.data = None, SimpleNamespace(train=ids, train_mask=torch.ones_like(ids))
    calls = SimpleNamespace(plan=[], train=[])

    def plan(settings, n):
        calls.plan.append(n)
        return LedgerParameters(1.5, 0.25, 1e-5, 8.0, "prv", sequences=n, planned_steps=20, planned_epsilon=7.0)

    def train(model, ids, mask, train, privacy, **kwargs):
        calls.train.append(kwargs)
        return TrainResult(loss=1.0, steps=train.local_steps, sequences=10, tokens=40, seconds=0.0)

    monkeypatch.setattr(lora_client, "plan_privacy", plan)
    monkeypatch.setattr(lora_client, "train_local_dp", train)
    return client, calls


def test_the_noise_is_calibrated_once_and_every_round_is_recorded_before_it_returns(private_client):
    client, calls = private_client
    _, first = client.train_private(server_round=1)
    assert calls.plan == [40]
    assert first == {"epsilon": pytest.approx(epsilon_of([(1.5, 0.25, 5)], 1e-5), abs=1e-9), "delta": 1e-5,
                     "noise_multiplier": 1.5, "plan_sequences": 40, "plan_sample_rate": 0.25, "plan_batch": 10.0,
                     "plan_noise_multiplier": 1.5, "plan_steps": 20, "plan_epsilon": 7.0, "plan_shares": 1}
    _, second = client.train_private(server_round=2)
    assert len(calls.plan) == 1  # the ledger exists: its lifetime plan is used
    assert [(c["noise_multiplier"], c["sample_rate"]) for c in calls.train] == [(1.5, 0.25), (1.5, 0.25)]
    state = client.ledger.read()
    assert state.parameters == LedgerParameters(1.5, 0.25, 1e-5, 8.0, "prv", 40, 20, 7.0)
    assert [e["key"] for e in state.history] == ["run 3 round 1", "run 3 round 2"]
    assert second["epsilon"] == state.epsilon > first["epsilon"]
    with pytest.raises(BudgetExceeded, match=f"client 1 {DECLINES}: it already trained 'run 3 round 2'"):
        client.train_private(server_round=2)
    assert len(calls.train) == 2 and len(client.ledger.read().history) == 2


def test_a_device_floor_refuses_before_the_ledger_fixes_the_noise(private_client):
    client, calls = private_client
    client.node_config = {"min-noise-multiplier": 2.0}
    with pytest.raises(BudgetExceeded, match="below this device's min-noise-multiplier=2"):
        client.train_private(server_round=1)
    assert calls.train == [] and not client.ledger.path.exists()
    # An existing ledger's stored noise is checked against the floor too.
    PrivacyLedger(client.ledger.path).begin("run 0 round 1", 5,
                                            new_parameters=lambda: LedgerParameters(1.0, 0.25, 1e-5, 8.0))
    with pytest.raises(BudgetExceeded, match="noise multiplier 1 "):
        client.train_private(server_round=1)
    assert calls.train == [] and client.ledger.read().history == ()
