"""What a run leaves behind after each round: a metrics row, a progress line, the committed run state (for
resume) and adapter checkpoints."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from peft import PeftModel

from fedlm.adapter import WireFormat, save_adapter
from fedlm.files import write_atomic
from fedlm.settings import RunSettings
from server.checkpoint import write_state
from server.record import RoundRecord, read_metrics


def global_arrays(context: LegacyContext) -> list:
    """The current global adapter, as wire arrays."""
    return context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()


class RunRecorder:
    """Called by the round loop with every round's record (round 0 included): writes and commits it."""

    def __init__(self, out_dir: Path, model: PeftModel, wire: WireFormat, settings: RunSettings,
                 first_round: int = 0) -> None:
        self.out_dir = out_dir
        self.model = model
        self.wire = wire
        self.settings = settings
        self.rounds = settings.federation.rounds
        self.metrics_path = out_dir / "metrics.jsonl"
        self._keep_rows_before(first_round)

    def _keep_rows_before(self, first_round: int) -> None:
        """A new run starts an empty file; a resumed one drops rows of rounds it did not commit (it reruns them)."""
        rows = read_metrics(self.out_dir) if first_round and self.metrics_path.exists() else []
        kept = [json.dumps(row) + "\n" for row in rows if row["round"] < first_round]
        write_atomic(self.metrics_path, lambda f: f.write("".join(kept).encode()))

    def __call__(self, record: RoundRecord, context: LegacyContext) -> None:
        row = record.row()
        with self.metrics_path.open("a") as f:  # one complete line per round, on disk before we go on
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log(logging.WARNING if row["abandoned"] else logging.INFO, "%s", progress_line(row, self.rounds))
        arrays = global_arrays(context)
        server_round = record.round
        write_state(self.out_dir, server_round, arrays, context.strategy, self.settings)  # the commit point
        save_every = self.settings.server.save_every
        if server_round == self.rounds or (save_every and server_round and server_round % save_every == 0):
            self.wire.load(self.model, arrays)
            target = "adapter" if server_round == self.rounds else f"checkpoints/round_{server_round:04d}"
            (self.out_dir / target).parent.mkdir(parents=True, exist_ok=True)
            save_adapter(self.model, self.out_dir / target)


def progress_line(row: dict[str, Any], rounds: int) -> str:
    """One human line per round: what a user watches while a run goes on."""
    parts = [f"round {row['round']}/{rounds}"]
    if row["train_loss"] is not None:
        parts.append(f"train loss {row['train_loss']:.3f}")
    if row["eval_loss"] is not None:
        parts.append(f"held-out loss {row['eval_loss']:.3f} ppl {row['eval_perplexity']:.1f}")
    if "central_perplexity" in row:
        parts.append(f"central ppl {row['central_perplexity']:.1f}")
    if "epsilon_max" in row:
        parts.append(f"epsilon max {row['epsilon_max']:.2f}")
    if row["round"]:
        extra = "".join(f", {row[key]} {label}" for key, label in (
            ("clients_declined", "declined"), ("clients_failed", "failed"), ("replies_dropped", "replies dropped"))
            if row.get(key))
        parts.append(f"{row['clients_ok']}/{row['clients_sampled']} clients{extra}")
        if row["abandoned"]:
            parts.append(f"ABANDONED at {row['abandoned_stage']} ({row['abandoned_reason']}): adapter unchanged")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)
