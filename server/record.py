"""One record per round: the loop creates it, every stage fills it, the recorder writes it as a metrics.jsonl row."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlm.training import perplexity


@dataclass
class RoundRecord:
    """Everything that happened in one round (round 0: the base model's evaluation).

    Client metrics are kept whole, one dict per client as the client sent it, so a new client metric reaches
    metrics.jsonl with no change here; the round's summaries are computed from them in `row()`.
    """

    round: int
    sampled: set[int] = field(default_factory=set)
    """Nodes sent training instructions."""
    declined: list[dict] = field(default_factory=list)
    """Clients that declined to train (budget or privacy floor): non-participants, not failures."""
    failed: list[dict] = field(default_factory=list)
    """Error replies other than refusals: a crashed client, a timed-out protocol stage."""
    dropped: list[str] = field(default_factory=list)
    """Replies dropped by the server's checks: the node, the client it claimed to be, and why."""
    abandoned: dict | None = None
    """{"stage": ..., "reason": ...} when the round published no new adapter."""
    trained: list[dict] = field(default_factory=list)
    """Each valid training reply's metrics, with its weight (`num_examples`); kept even if the round is
    abandoned, since those clients still spent privacy."""
    aggregated: bool = False
    aggregate: dict = field(default_factory=dict)
    """What the strategy reports about the aggregate (server learning rate, client-level epsilon)."""
    evaluated: list[dict] = field(default_factory=list)
    """Each valid evaluation reply: client metrics plus `loss` and `tokens`."""
    central: dict = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0

    def abandon(self, stage: str, reason: str) -> None:
        """The round publishes nothing; the first stage that gave up is the one named."""
        if self.abandoned is None:
            self.abandoned = {"stage": stage, "reason": reason}

    def note_failure(self, node: int, stage: str, reason: str) -> None:
        self.failed.append({"node": node, "stage": stage, "reason": reason})

    def row(self) -> dict[str, Any]:
        """The metrics.jsonl row: the round's summaries first, then the per-client detail they come from."""
        losses = [(float(m["num_examples"]), float(m["train_loss"])) for m in self.trained if "train_loss" in m]
        epsilons = [float(m["epsilon"]) for m in self.trained if "epsilon" in m]
        tokens = sum(float(e["tokens"]) for e in self.evaluated)
        eval_loss = sum(float(e["loss"]) * float(e["tokens"]) for e in self.evaluated) / tokens if tokens else None
        ppl = [float(e["perplexity"]) for e in self.evaluated]
        row: dict[str, Any] = {
            "round": self.round,
            # privacy=distributed_dp_sgd clients report no training loss: it would leak outside the mechanism
            "train_loss": sum(w * loss for w, loss in losses) / sum(w for w, _ in losses) if losses else None,
            "eval_loss": eval_loss,  # token-weighted, so exp(loss) is the usual held-out perplexity
            "eval_perplexity": None if eval_loss is None else perplexity(eval_loss),
            "eval_perplexity_worst": max(ppl) if ppl else None,
            "eval_perplexity_client_mean": sum(ppl) / len(ppl) if ppl else None,
            "eval_perplexity_geomean": math.exp(sum(map(math.log, ppl)) / len(ppl)) if ppl else None,
            "eval_clients": len(self.evaluated) or None,
            "clients_sampled": len(self.sampled),
            "clients_ok": len(self.trained),
            "clients_declined": len(self.declined),
            "clients_failed": len(self.failed),
            "replies_dropped": len(self.dropped),
            "abandoned": self.abandoned is not None,
            "abandoned_stage": (self.abandoned or {}).get("stage"),
            "abandoned_reason": (self.abandoned or {}).get("reason"),
            "train_tokens": sum(int(m.get("train_tokens", 0)) for m in self.trained),
            "client_train_seconds": sum(float(m.get("train_seconds", 0.0)) for m in self.trained) or None,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "seconds": round(self.seconds, 3),
        }
        if epsilons:  # each is that client's cumulative spend over every round it joined
            row |= {"epsilon_max": max(epsilons), "epsilon_mean": sum(epsilons) / len(epsilons),
                    "delta": max(float(m["delta"]) for m in self.trained if "delta" in m)}
            alone = [float(m["epsilon_alone"]) for m in self.trained if "epsilon_alone" in m]
            if alone:  # distributed DP: the guarantee of a client's own noise share, if all others collude
                row["epsilon_alone_max"] = max(alone)
        row |= self.aggregate
        if self.central:
            row |= {"central_loss": self.central["loss"], "central_perplexity": perplexity(self.central["loss"]),
                    **{f"central_{k}": v for k, v in self.central.items() if k != "loss"}}
        return row | {"clients": self.trained, "evaluations": self.evaluated, "declined": self.declined,
                      "failed": self.failed, "dropped": self.dropped}


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl, as `RoundRecord.row()` wrote it (the one reader of that file)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
