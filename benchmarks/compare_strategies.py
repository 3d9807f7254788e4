"""`python benchmarks/compare_strategies.py [--rounds N] [--bytes]`: every strategy on the default federation, DP off
and at epsilon 8: held-out perplexity after the same rounds, and upload bytes per client per round. `--bytes`: only
two short rounds per strategy, for the bytes down and up per client per round (section 9)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import ROOT, Provenance, log, publish

from simulations.launch import make_offline_safe, simulate
from simulations.run import compose_settings
from strategies import STRATEGIES as REGISTERED

STRATEGIES = sorted(REGISTERED)
# SecAgg+ is off for speed: it changes the aggregate by under 1e-6 (tests/integration/test_secagg.py),
# so perplexity and plain upload bytes are what they would be with it (its bytes are in section 4).
PRIVACY = {"DP off": ["privacy=disabled"], "DP-SGD, epsilon 8": ["privacy=dp_sgd", "privacy.target_epsilon=8"]}


# Bytes do not depend on how long a client trains: the smallest rounds that still send every message. Two rounds:
# round 2 carries the adapter as the strategy's first aggregation left it (its dtype included).
TINY_ROUNDS = ["federation.rounds=2", "train.local_steps=1", "train.batch_size=4", "train.max_eval_sequences=4",
               "privacy=disabled"]


def bytes_by_strategy(work: Path) -> dict:
    """Section 9's figures: payload bytes clients receive and send per round, per strategy, plain and SecAgg+."""
    rows = []
    # SecAgg+'s messages do not depend on the server's optimiser: its two distinct payloads (A and B, or B only)
    # are enough to show its cost next to every plain strategy.
    runs = [(s, "disabled") for s in STRATEGIES] + [("fedavg", "secaggplus"), ("frozen_a", "secaggplus")]
    for strategy, secagg in runs:
        log(f"bytes: strategy={strategy} secagg={secagg}")
        settings = compose_settings(TINY_ROUNDS + [f"strategy={strategy}", f"secagg={secagg}"],
                                    str(work / f"bytes-{strategy}-{secagg}"))
        outcome = simulate(settings)
        first, second = outcome.rows[1], outcome.rows[2]  # rows[0]: round 0, evaluation of the base only
        n, k = second["eval_clients"], second["clients_ok"]
        rows.append({"strategy": strategy, "secagg": secagg == "secaggplus", "eval_clients": n,
                     "training_clients": k, "down_1": first["bytes_down"] / n, "down_2": second["bytes_down"] / n,
                     "up": second["bytes_up"] / k})
    fed = settings.federation
    return {"num_clients": fed.num_clients, "clients_per_round": fed.clients_per_round, "lora_r": settings.lora.r,
            "rounds": fed.rounds, "overrides": TINY_ROUNDS, "rows": rows}


def perplexity_by_strategy(work: Path, rounds: int) -> dict:
    """Section 5's figures: every strategy, DP off and at epsilon 8, the same rounds: perplexity and upload."""
    rows = []
    for strategy in STRATEGIES:
        for label, privacy in PRIVACY.items():
            overrides = [f"strategy={strategy}", *privacy, "secagg=disabled", f"federation.rounds={rounds}"]
            log(f"strategies: {' '.join(overrides)}")
            settings = compose_settings(overrides, str(work / f"{strategy}-{len(rows)}"))
            outcome = simulate(settings)
            trained = [r for r in outcome.rows[1:] if r["clients_ok"]]
            up = sum(r["bytes_up"] for r in trained) / sum(r["clients_ok"] for r in trained)
            rows.append({"strategy": strategy, "privacy": label, "ppl_initial": outcome.initial_perplexity,
                         "ppl_final": outcome.final_perplexity, "kb_up": up / 1e3})
    fed = settings.federation
    return {"rounds": rounds, "num_clients": fed.num_clients, "clients_per_round": fed.clients_per_round,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bytes", action="store_true", help="only section 9: two short rounds per strategy")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="rendered from its results (section 5, or 9 with --bytes, replaced)")
    args = parser.parse_args()
    make_offline_safe()
    stamp = Provenance()
    with tempfile.TemporaryDirectory(prefix="pollinate-strategies-") as tmp:
        if args.bytes:
            publish("bytes", stamp, bytes_by_strategy(Path(tmp)), args.output)
        else:
            publish("strategies", stamp, perplexity_by_strategy(Path(tmp), args.rounds), args.output)


if __name__ == "__main__":
    main()
