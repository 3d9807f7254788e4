"""What a run leaves behind after each round: a metrics row, a progress line, the committed run state (for
resume) and adapter checkpoints."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from flwr.server import LegacyContext
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from peft import PeftModel

from fedlm.adapter import arrays_to_adapter, save_adapter
from fedlm.files import write_atomic
from fedlm.settings import RunSettings
from fedlm.training import perplexity
from server.checkpoint import write_state
from server.metering import MeteredGrid

INFO = 20


def _at(series: list[tuple[int, Any]], server_round: int) -> Any:
    return next((value for r, value in series if r == server_round), None)


def global_arrays(context: LegacyContext) -> list:
    """The current global adapter, as wire arrays."""
    return context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()


class RunRecorder:
    """Called at the end of every round (0 included) by the round loop."""

    def __init__(self, out_dir: Path, model: PeftModel, grid: MeteredGrid, settings: RunSettings,
                 first_round: int = 0) -> None:
        self.out_dir = out_dir
        self.model = model
        self.grid = grid
        self.settings = settings
        self.rounds = settings.federation.rounds
        self.metrics_path = out_dir / "metrics.jsonl"
        self._keep_rows_before(first_round)
        self._clock = time.perf_counter()
        self._bytes = (0, 0)

    def _keep_rows_before(self, first_round: int) -> None:
        """A new run starts an empty file; a resumed one drops rows of rounds it did not commit (it reruns them)."""
        lines = self.metrics_path.read_text().splitlines() if first_round and self.metrics_path.exists() else []
        kept = [line for line in lines if line and json.loads(line)["round"] < first_round]
        write_atomic(self.metrics_path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))

    def __call__(self, server_round: int, context: LegacyContext) -> None:
        row = self.metrics_row(server_round, context)
        with self.metrics_path.open("a") as f:  # one complete line per round, on disk before we go on
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log(INFO, "%s", progress_line(row, self.rounds))
        arrays = global_arrays(context)
        write_state(self.out_dir, server_round, arrays, context.strategy, self.settings)  # the commit point
        save_every = self.settings.server.save_every
        if server_round == self.rounds or (save_every and server_round and server_round % save_every == 0):
            arrays_to_adapter(self.model, arrays)
            target = "adapter" if server_round == self.rounds else f"checkpoints/round_{server_round:04d}"
            (self.out_dir / target).parent.mkdir(parents=True, exist_ok=True)
            save_adapter(self.model, self.out_dir / target)

    def metrics_row(self, server_round: int, context: LegacyContext) -> dict[str, Any]:
        history = context.history
        audit = context.strategy.audit
        # An abandoned round leaves no history, but its clients trained (and spent privacy): say so.
        fit = {k: value for k, series in history.metrics_distributed_fit.items()
               if (value := _at(series, server_round)) is not None} or audit.metrics
        evaluation = {k: _at(v, server_round) for k, v in history.metrics_distributed.items()}
        eval_loss = _at(history.losses_distributed, server_round)
        central_loss = _at(history.losses_centralized, server_round)
        now, (down, up) = time.perf_counter(), self._bytes
        row = {
            "round": server_round,
            "train_loss": fit.get("train_loss"),
            "eval_loss": eval_loss,
            "eval_perplexity": None if eval_loss is None else perplexity(eval_loss),
            "eval_perplexity_worst": evaluation.get("eval_perplexity_worst"),
            "eval_clients": evaluation.get("eval_clients"),
            "clients_sampled": len(self.grid.train_nodes),
            "clients_ok": fit.get("clients_ok", 0),
            "clients_declined": len(self.grid.declined_nodes),
            "bytes_down": self.grid.bytes_down - down,
            "bytes_up": self.grid.bytes_up - up,
            "seconds": round(now - self._clock, 3),
            "client_train_seconds": fit.get("client_train_seconds"),
            "replies_dropped": len(audit.dropped),
            "abandoned": audit.abandoned,
        }
        for key in ("epsilon_max", "epsilon_mean", "delta", "client_epsilon"):
            if fit.get(key) is not None:
                row[key] = fit[key]
        if central_loss is not None:
            row["central_loss"] = central_loss
            row["central_perplexity"] = perplexity(central_loss)
        self._clock, self._bytes = now, (self.grid.bytes_down, self.grid.bytes_up)
        self.grid.train_nodes.clear()
        self.grid.declined_nodes.clear()
        return row


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
        declined = f", {row['clients_declined']} declined" if row["clients_declined"] else ""
        dropped = f", {row['replies_dropped']} replies dropped" if row["replies_dropped"] else ""
        parts.append(f"{row['clients_ok']}/{row['clients_sampled']} clients{declined}{dropped}")
        if row["abandoned"]:
            parts.append("ABANDONED: adapter unchanged")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)
