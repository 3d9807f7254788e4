"""The privacy ledger under kill -9 at random moments: every restart finds a consistent ledger that holds
every spend whose update left, and an instruction delivered again is never spent twice."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from fedlm.ledger import PrivacyLedger
from fedlm.protocol import BudgetExceeded
from tests.fedlm.ledger_writer import PARAMS, spend_rounds

pytestmark = pytest.mark.integration  # kills writer processes with SIGKILL
KILLS = 25
# Children fork from a server that has imported fedlm.ledger (and so fedlm.privacy) once (about 4 s): a fresh interpreter per kill
# would make this test minutes long. Each child is still a separate process, killed for real.
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["tests.fedlm.ledger_writer"])


def start_writer(ledger: Path, report: Path, rounds: int = 10**6) -> multiprocessing.Process:
    child = CTX.Process(target=spend_rounds, args=(str(ledger), str(report), rounds), daemon=True)
    child.start()
    return child


def kill(child: multiprocessing.Process) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL, f"the writer ended by itself (exit code {child.exitcode})"


def reported(report: Path) -> list[str]:
    return report.read_text().splitlines() if report.exists() else []


def assert_consistent(ledger: Path, report: Path) -> list[str]:
    """The on-disk ledger after a kill; returns its keys."""
    left = reported(report)
    assert len(left) == len(set(left)), "an update left twice"
    if not ledger.exists():  # killed before the ledger was first written
        assert not left
        return []
    stored = json.loads(ledger.read_text())  # whole and valid JSON, never torn
    keys = [entry["key"] for entry in stored["history"]]
    assert keys == [f"round {i}" for i in range(len(keys))], "a round spent twice or skipped"
    assert set(left) <= set(keys), f"updates left without their spend on disk: {sorted(set(left) - set(keys))}"
    epsilons = [entry["epsilon"] for entry in stored["history"]]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:])), "epsilon went down"
    fresh = PrivacyLedger(ledger)
    state = fresh.read()
    assert state.epsilon == (epsilons[-1] if epsilons else 0.0)
    assert state.parameters == PARAMS
    if keys:
        with pytest.raises(BudgetExceeded, match="never spent twice"):
            fresh.begin(keys[-1], 1)
    return keys


def test_kill_9_at_random_moments_never_loses_or_repeats_a_spend(tmp_path: Path) -> None:
    ledger, report = tmp_path / "privacy" / "client_0.json", tmp_path / "left.txt"
    rng, mid_write = random.Random(0), 0
    for _ in range(KILLS):
        child = start_writer(ledger, report)
        time.sleep(rng.uniform(0.0, 0.15))  # when the kill lands, not a timing assertion
        kill(child)
        mid_write += any(ledger.parent.glob(".*.tmp"))  # killed between writing a temporary file and its rename
        assert_consistent(ledger, report)
    spent = assert_consistent(ledger, report)
    # A last writer restarts on what the kills left, re-receives every earlier round, and spends 5 new ones.
    final = start_writer(ledger, report, rounds=len(spent) + 5)
    final.join(60)
    assert final.exitcode == 0
    keys = assert_consistent(ledger, report)
    assert len(keys) == len(spent) + 5 and reported(report)[-5:] == keys[-5:]
    assert sorted(p.name for p in ledger.parent.iterdir()) == ["client_0.json"]  # leftovers cleaned
    print(f"\n{KILLS} kills, {len(spent)} spends survived them, {mid_write} kills left a temporary file")


def test_kill_9_while_the_ledger_is_first_created(tmp_path: Path) -> None:
    rng = random.Random(1)
    for i in range(10):
        ledger, report = tmp_path / f"client_{i}" / "ledger.json", tmp_path / f"left_{i}.txt"
        child = start_writer(ledger, report)
        time.sleep(rng.uniform(0.0, 0.02))
        kill(child)
        # A kill after a spend but before its update left is legitimate: the spend stays, nothing was sent.
        spent = assert_consistent(ledger, report)
        spend_rounds(str(ledger), str(report), rounds=len(spent) + 1)  # a restart carries on with one new round
        assert assert_consistent(ledger, report)[-1] == f"round {len(spent)}"
