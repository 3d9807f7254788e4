"""A process that spends privacy budget the way a client does, for tests/fedlm/test_ledger_crash.py to kill."""

from __future__ import annotations

import os
from pathlib import Path

from fedlm.ledger import LedgerParameters, PrivacyLedger
from fedlm.protocol import BudgetExceeded

# RDP keeps each record cheap (many records per kill); the huge budget keeps the loop from ever stopping.
PARAMS = LedgerParameters(noise_multiplier=1.0, sample_rate=0.01, delta=1e-5, target_epsilon=1e6, accountant="rdp")


def spend_rounds(ledger_path: str, report_path: str, rounds: int) -> None:
    """Round by round, as LoraClient.train_private: begin (declined for a round already spent: its instruction is
    delivered again after a restart), commit its spend, and only then let its update "leave": one line in the
    report file."""
    ledger = PrivacyLedger(Path(ledger_path))
    report = os.open(report_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for rnd in range(rounds):
        key = f"round {rnd}"
        try:
            spend = ledger.begin(key, 1, new_parameters=lambda: PARAMS)
        except BudgetExceeded as refusal:
            if "never spent twice" not in str(refusal):
                raise
            continue
        ledger.commit(spend)
        os.write(report, f"{key}\n".encode())  # one write(2): a kill lands before or after it, never inside
