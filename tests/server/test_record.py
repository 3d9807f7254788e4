"""The round record: its summaries, worked out by hand, and the per-client detail kept whole."""

import math

import pytest

from server.record import RoundRecord
from server.recorder import progress_line


def _record() -> RoundRecord:
    record = RoundRecord(3, sampled={11, 12, 13})
    record.trained = [{"client": 0, "train_loss": 4.0, "num_examples": 1, "train_tokens": 10, "epsilon": 2.0,
                       "delta": 1e-5, "noise_multiplier": 0.9, "train_seconds": 1.5},
                      {"client": 1, "train_loss": 1.0, "num_examples": 2, "train_tokens": 30, "epsilon": 3.0,
                       "delta": 2e-5, "noise_multiplier": 0.7, "train_seconds": 2.5}]
    record.evaluated = [{"client": 0, "loss": 2.0, "tokens": 100, "perplexity": 8.0},
                        {"client": 1, "loss": 3.0, "tokens": 300, "perplexity": 32.0}]
    record.declined.append({"node": 13, "reason": "client 2 declines to train this round: ..."})
    return record


def test_summaries_are_weighted_as_documented():
    row = _record().row()
    assert row["train_loss"] == pytest.approx(2.0)  # (1 * 4 + 2 * 1) / 3: weighted by sequences
    assert row["eval_loss"] == pytest.approx(2.75)  # (100 * 2 + 300 * 3) / 400: weighted by tokens
    assert row["eval_perplexity"] == pytest.approx(math.exp(2.75))
    assert row["eval_perplexity_worst"] == 32.0 and row["eval_perplexity_client_mean"] == 20.0
    assert row["eval_perplexity_geomean"] == pytest.approx(16.0)  # sqrt(8 * 32)
    assert (row["epsilon_max"], row["epsilon_mean"], row["delta"]) == (3.0, 2.5, 2e-5)
    assert (row["clients_sampled"], row["clients_ok"], row["clients_declined"]) == (3, 2, 1)
    assert row["train_tokens"] == 40 and row["client_train_seconds"] == 4.0
    assert row["abandoned"] is False and row["abandoned_stage"] is None


def test_every_client_metric_reaches_the_row_whole():
    row = _record().row()
    assert [c["noise_multiplier"] for c in row["clients"]] == [0.9, 0.7]  # no whitelist drops it


def test_an_abandoned_round_names_its_first_stage_and_says_so():
    record = _record()
    record.abandon("secagg share-keys", "SecAgg+ halted: 1 of 3 clients still active")
    record.abandon("aggregate", "a later stage does not overwrite the first")
    row = record.row()
    assert (row["abandoned"], row["abandoned_stage"]) == (True, "secagg share-keys")
    line = progress_line(row, rounds=10)
    assert "2/3 clients, 1 declined" in line
    assert "ABANDONED at secagg share-keys (SecAgg+ halted: 1 of 3 clients still active): adapter unchanged" in line


def test_round_zero_without_training_has_no_train_summaries():
    row = RoundRecord(0).row()
    assert row["train_loss"] is None and row["eval_loss"] is None and "epsilon_max" not in row
