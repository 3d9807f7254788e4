"""`python benchmarks/compare_strategies.py [--rounds N] [--bytes]`: every strategy on the default federation, DP off
and at epsilon 8: held-out perplexity after the same rounds, and upload bytes per client per round. `--bytes`: only
two short rounds per strategy, for the bytes down and up per client per round (section 9)."""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from pathlib import Path

from common import command_line, log, provenance, write_sections

from simulations.launch import make_offline_safe, simulate
from simulations.run import compose_settings
from strategies import STRATEGIES as REGISTERED

STRATEGIES = sorted(REGISTERED)
# SecAgg+ is off for speed: it changes the aggregate by under 1e-6 (tests/integration/test_secagg.py),
# so perplexity and plain upload bytes are what they would be with it (its bytes are in section 4).
SECTION = "## 5. Strategies on the default federation"
PRIVACY = {"DP off": ["privacy=disabled"], "DP-SGD, epsilon 8": ["privacy=dp_sgd", "privacy.target_epsilon=8"]}


# Bytes do not depend on how long a client trains: the smallest rounds that still send every message. Two rounds:
# round 2 carries the adapter as the strategy's first aggregation left it (its dtype included).
TINY_ROUNDS = ["federation.rounds=2", "train.local_steps=1", "train.batch_size=4", "train.max_eval_sequences=4",
               "privacy=disabled"]


def bytes_by_strategy(work: Path) -> list[str]:
    """Section 9: payload bytes clients receive and send per round, per strategy, plain and with SecAgg+."""
    rows, grown = [], []
    # SecAgg+'s messages do not depend on the server's optimiser: its two distinct payloads (A and B, or B only)
    # are enough to show its cost next to every plain strategy.
    runs = [(s, "disabled") for s in STRATEGIES] + [("fedavg", "secaggplus"), ("frozen_a", "secaggplus")]
    for strategy, secagg in runs:
        log(f"bytes: strategy={strategy} secagg={secagg}")
        outcome = simulate(compose_settings(TINY_ROUNDS + [f"strategy={strategy}", f"secagg={secagg}"],
                                            str(work / f"bytes-{strategy}-{secagg}")))
        first, second = outcome.rows[1], outcome.rows[2]  # rows[0]: round 0, evaluation of the base only
        n, k = second["eval_clients"], second["clients_ok"]
        down = [r["bytes_down"] / n for r in (first, second)]
        up = second["bytes_up"] / k
        rows.append(f"| `{strategy}` | {'SecAgg+' if secagg == 'secaggplus' else 'plain'} | {down[0] / 1e3:,.0f} "
                    f"| {down[1] / 1e3:,.0f} | {up / 1e3:,.0f} | {(second['bytes_down'] + second['bytes_up']) / n / 1e3:,.0f} |")
        if down[1] > 1.01 * down[0]:
            grown.append(f"`{strategy}` ({secagg}): {down[1] / down[0]:.2f}x")
    return [
        "## 9. Bytes down and up per client per round, by strategy", "",
        "Default federation (8 clients, 4 trained per round, all 8 evaluated every round), embedded base, LoRA "
        "r=8. Two rounds per strategy (`" + " ".join(TINY_ROUNDS) + "`): payload bytes do not depend on how long "
        "a client trains or on DP. Down: every message the server sends in a round (the adapter with each fit and "
        "each evaluate instruction, SecAgg+'s protocol messages) divided by the 8 clients; a training client "
        "receives two adapters a round, an evaluating-only client one. Up: what each training client sends "
        "(evaluation replies are metrics only).", "",
        "| strategy | aggregation | KB down per client, round 1 | KB down per client, round 2 | KB up per training "
        "client | KB per client per round, all traffic, round 2 |",
        "|---|---|---:|---:|---:|---:|", *rows, "",
        "`frozen_a` sends only the B matrices both ways (A is rebuilt from the shared seed). SecAgg+ roughly "
        "doubles the upload (masked int64 values instead of float32) and adds key and share exchanges on both "
        "legs. " + ("The download grew after the first aggregation for " + ", ".join(grown) + ": the global adapter "
                    "came out of the aggregation as float64 (Flower's FedAdam multiplies by a NumPy float64 "
                    "bias-corrected step, which NumPy 2 does not downcast; SecAgg+ dequantizes its sum with "
                    "`astype(float)`), so every later message carries float64 arrays, twice the float32 bytes." if grown else "No strategy's download grew after its first "
                    "aggregation: the global adapter stays float32."), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bytes", action="store_true", help="only section 9: two short rounds per strategy")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"), help="its section 5 is replaced")
    args = parser.parse_args()
    make_offline_safe()
    if args.bytes:
        load, command = os.getloadavg()[0], command_line()
        with tempfile.TemporaryDirectory(prefix="pollinate-bytes-") as tmp:
            lines = bytes_by_strategy(Path(tmp))
        write_sections(args.output, ["\n".join(lines[:2] + [provenance(command, load), ""] + lines[2:])])
        print("\n".join(lines), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="pollinate-strategies-") as tmp:
        for strategy in STRATEGIES:
            for label, privacy in PRIVACY.items():
                overrides = [f"strategy={strategy}", *privacy, "secagg=disabled", f"federation.rounds={args.rounds}"]
                print(f"[strategies] {' '.join(overrides)}", flush=True)
                outcome = simulate(compose_settings(overrides, str(Path(tmp) / f"{strategy}-{len(rows)}")))
                trained = [r for r in outcome.rows[1:] if r["clients_ok"]]
                up = sum(r["bytes_up"] for r in trained) / sum(r["clients_ok"] for r in trained)
                rows.append(f"| `{strategy}` | {label} | {outcome.initial_perplexity:.1f} | "
                            f"{outcome.final_perplexity:.1f} | {up / 1e3:,.0f} |")
    command = f"python benchmarks/compare_strategies.py --rounds {args.rounds}"
    lines = [f"{SECTION} ({args.rounds} rounds)", "",
             f"`{command}` ({datetime.date.today()}): 8 clients, 4 per round, {args.rounds} rounds, SecAgg+ off (it does not change the "
             "aggregate beyond 1e-6). Held-out perplexity is the federated, token-weighted figure over every "
             "client's own held-out split; upload is the adapter payload per training client per round.", "",
             "| strategy | privacy | round 0 ppl | final ppl | KB up per client per round |",
             "|---|---|---:|---:|---:|", *rows, ""]
    section = "\n".join(lines)
    text = args.output.read_text() if args.output.exists() else ""
    start = text.find(SECTION)
    end = text.find("\n## ", start + 1) if start >= 0 else -1
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    args.output.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
