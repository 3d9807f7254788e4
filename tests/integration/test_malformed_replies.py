"""Malformed replies on Flower's real Simulation Engine: every bad reply is dropped, the run goes on, and the
global adapter equals the honest clients' weighted average."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedlm.settings import RunSettings, settings_from_dict
from server.checkpoint import read_state
from simulations.launch import simulate
from tests.conftest import make_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers get the mod by value

MAX_WEIGHT = 40
HONEST = 3
# Partition id HONEST + i misbehaves as CASES[i]. The first nine replies are dropped; "absurd_count" keeps
# honest tensors, so it stays in (capped); "straggler" behaves, but answers round 2 after the round's timeout.
CASES = ["nan", "inf", "wrong_shape", "int_dtype", "missing_tensor", "extra_tensor", "zero_count",
         "negative_count", "earlier_round", "absurd_count", "straggler"]
DROPPED = CASES.index("absurd_count")
CLIENTS = HONEST + len(CASES)
ROUND_TIMEOUT = 25.0  # round 0 must fit in it too, and there every Ray worker starts and loads the model


def spoil(case: str, arrays: list[np.ndarray], n: int, metrics: dict) -> tuple[list[np.ndarray], int, dict]:
    arrays = [a.copy() for a in arrays]
    if case == "nan":
        arrays[0].flat[0] = np.nan
    elif case == "inf":
        arrays[-1].flat[-1] = np.inf
    elif case == "wrong_shape":
        arrays[1] = arrays[1][:-1]
    elif case == "int_dtype":
        arrays = [a.astype(np.int32) for a in arrays]
    elif case == "missing_tensor":
        arrays = arrays[:-1]
    elif case == "extra_tensor":
        arrays.append(np.zeros(3, np.float32))
    elif case == "zero_count":
        n = 0
    elif case == "negative_count":
        n = -5
    elif case == "earlier_round":
        metrics = dict(metrics, round=metrics["round"] - 1)
    elif case == "absurd_count":
        n = 10**12
    return arrays, n, metrics


class Misbehave:
    """Records every training reply as the client computed it, then spoils it for the clients in CASES."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        client = int(context.node_config["partition-id"])
        training = msg.metadata.message_type == MessageType.TRAIN
        if training and client == HONEST + CASES.index("straggler") and msg.metadata.group_id == "2":
            time.sleep(ROUND_TIMEOUT + 5)
        reply = call_next(msg, context)
        if not training or reply.has_error():
            return reply
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays = parameters_to_ndarrays(res.parameters)
        np.savez(self.out / f"round{res.metrics['round']}_client{client}.npz", *arrays, n=res.num_examples)
        if HONEST <= client < CLIENTS - 1:
            arrays, res.num_examples, res.metrics = spoil(CASES[client - HONEST], arrays, res.num_examples,
                                                          res.metrics)
            res.parameters = ndarrays_to_parameters(arrays)
            reply.content = compat.fitres_to_recorddict(res, keep_input=True)
        return reply


def honest_average(out: Path, server_round: int) -> list[np.ndarray]:
    """What the global adapter must be after round 2: the honest replies that came in time, plus the capped
    claimant, weighted by count."""
    kept = [*range(HONEST), HONEST + DROPPED]
    replies = [np.load(out / f"round{server_round}_client{c}.npz") for c in kept]
    weights = [min(int(r["n"]), MAX_WEIGHT) for r in replies]
    weights[-1] = MAX_WEIGHT  # its claim of 10^12 is capped
    count = len([k for k in replies[0].files if k.startswith("arr_")])
    return [sum(w * r[f"arr_{i}"].astype(np.float64) for w, r in zip(weights, replies)) / sum(weights)
            for i in range(count)]


def test_every_malformed_reply_is_dropped_and_the_run_goes_on(tmp_path, tiny_llama_dir):
    data = tmp_path / "texts"
    data.mkdir()
    for i in range(CLIENTS):
        (data / f"doc{i:02d}.txt").write_text(make_text(900 + i, 300))
    recorded = tmp_path / "replies"
    recorded.mkdir()
    settings = settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(tiny_llama_dir)},
        "dataset": {"path": str(data), "seq_len": 32, "min_train_sequences": 4, "min_eval_sequences": 1},
        "federation": {"num_clients": CLIENTS, "clients_per_round": CLIENTS, "rounds": 2,
                       "max_client_weight": MAX_WEIGHT},
        "train": {"local_steps": 2, "batch_size": 4, "max_eval_sequences": 2},
        "server": {"round_timeout": ROUND_TIMEOUT},
        "privacy": {"name": "disabled"}, "secagg": {"name": "disabled"},  # the server sees each reply
        "output_dir": str(tmp_path / "run"),
    })
    outcome = simulate(settings, client_mods=(Misbehave(recorded),))

    rows = outcome.rows
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients_sampled"] for r in rows[1:]] == [CLIENTS, CLIENTS]
    # Round 2 went on without the straggler.
    assert [r["clients_ok"] for r in rows[1:]] == [HONEST + 2, HONEST + 1]
    assert [r["replies_dropped"] for r in rows[1:]] == [DROPPED, DROPPED]
    assert not any(r["abandoned"] for r in rows)
    final = read_state(outcome.output_dir).arrays
    for got, want in zip(final, honest_average(recorded, 2), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    json.dumps(rows, allow_nan=False)  # raises if any NaN or Inf reached metrics.jsonl
    assert any("holds NaN or Inf" in line for line in rows[1]["dropped"])  # ...but why a reply was dropped did


class Undecodable:
    """Client 0 answers round 1's training with an empty message, which Flower's own decoding chokes on."""

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.group_id == "1" and \
                context.node_config["partition-id"] == 0:
            return Message(RecordDict(), reply_to=msg)
        return reply


def test_a_reply_flower_cannot_decode_loses_its_round_not_the_run(tmp_path, tiny_llama_dir, text_folder):
    settings = settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(tiny_llama_dir)},
        "dataset": {"path": str(text_folder), "seq_len": 32, "min_train_sequences": 4, "min_eval_sequences": 1},
        "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2},
        "train": {"local_steps": 2, "batch_size": 4, "max_eval_sequences": 2},
        "privacy": {"name": "disabled"}, "secagg": {"name": "disabled"},
        "output_dir": str(tmp_path / "run"),
    })
    rows = simulate(settings, client_mods=(Undecodable(),)).rows
    assert [(r["round"], r["abandoned"]) for r in rows] == [(0, False), (1, True), (2, False)]
    assert rows[2]["clients_ok"] == 3 and rows[2]["eval_perplexity"] < rows[0]["eval_perplexity"]
