"""Reply checks: duplicates count once, too few valid replies abandon the round, bad evaluations are dropped."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedlm.adapter import WireFormat
from fedlm.settings import RunSettings, settings_from_dict
from server.record import RoundRecord
from server.validation import ValidatedReplies
from strategies import build_strategy
from tests.conftest import fit_reply

ZERO = [np.zeros(2, np.float32)]


def _strategy(min_replies=2):
    settings = settings_from_dict(RunSettings, {
        "federation": {"num_clients": 4, "clients_per_round": 4, "max_client_weight": 10},
        "server": {"min_replies": min_replies}, "secagg": {"name": "disabled"}})
    initial = ndarrays_to_parameters(ZERO)
    wire = WireFormat(names=("w",), shapes=((2,),))
    strategy = ValidatedReplies(build_strategy(settings, initial), wire, min_replies=min_replies, max_weight=10)
    strategy.begin(RoundRecord(1))
    return strategy


def test_a_duplicated_reply_counts_once():
    strategy = _strategy()
    first = fit_reply([np.array([1.0, 1.0], np.float32)], 1, node="7")
    params, metrics = strategy.aggregate_fit(1, [first, first, fit_reply([np.array([4.0, 4.0], np.float32)], 1,
                                                                         node="8")], [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [2.5, 2.5])
    row = strategy.record.row()
    assert row["clients_ok"] == 2 and row["replies_dropped"] == 1
    assert strategy.record.dropped == ["node 7 (client ?): a second reply from the same node"]


def test_too_few_valid_replies_abandon_the_round_and_say_why(caplog):
    strategy = _strategy(min_replies=3)
    nan = np.array([np.nan, 0.0], np.float32)
    replies = [fit_reply([np.ones(2, np.float32)], 2, 5, node="1", client=0),
               fit_reply([np.ones(2, np.float32)], 2, 5, node="2", client=1),
               fit_reply([nan], 2, 5, node="3", client=2)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert strategy.aggregate_fit(5, replies, []) == (None, {})
    row = strategy.record.row()
    assert row["abandoned"] and row["abandoned_stage"] == "aggregate"
    assert row["abandoned_reason"] == "2 valid replies, server.min_replies=3"
    assert row["clients_ok"] == 2  # they trained and spent privacy, so they are recorded
    assert "round 5: dropped the reply of node 3 (client 2): tensor 0 holds NaN or Inf" in caplog.text
    assert "round 5 abandoned: 2 valid replies, server.min_replies=3" in caplog.text


def test_a_claimed_weight_is_capped():
    strategy = _strategy()
    params, _ = strategy.aggregate_fit(1, [fit_reply([np.zeros(2, np.float32)], 10, node="1"),
                                           fit_reply([np.ones(2, np.float32)], 10**15, node="2")], [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [0.5, 0.5])  # 10 vs a claim capped at 10


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_non_finite_evaluation_is_dropped(loss):
    strategy = _strategy()
    good = SimpleNamespace(cid="1"), EvaluateRes(Status(Code.OK, ""), 2.0, 10, {"perplexity": 7.4, "client": 0})
    bad = SimpleNamespace(cid="2"), EvaluateRes(Status(Code.OK, ""), loss, 10, {"perplexity": loss, "client": 1})
    loss_out, _ = strategy.aggregate_evaluate(1, [good, bad], [])
    row = strategy.record.row()
    assert loss_out == 2.0 and row["eval_clients"] == 1 and row["eval_perplexity_worst"] == 7.4
