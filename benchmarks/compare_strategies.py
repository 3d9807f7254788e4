"""`python benchmarks/compare_strategies.py [--rounds N]`: every strategy on the default federation, DP off and at
epsilon 8: held-out perplexity after the same rounds, and upload bytes per client per round."""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

from simulations.launch import make_offline_safe, simulate
from simulations.run import compose_settings

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "frozen_a")
# SecAgg+ is off for speed: it changes the aggregate by under 1e-6 (tests/integration/test_secagg.py),
# so perplexity and plain upload bytes are what they would be with it (its bytes are in section 4).
SECTION = "## 5. Strategies on the default federation"
PRIVACY = {"DP off": ["privacy=disabled"], "DP-SGD, epsilon 8": ["privacy=dp_sgd", "privacy.target_epsilon=8"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"), help="its section 5 is replaced")
    args = parser.parse_args()
    make_offline_safe()
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
