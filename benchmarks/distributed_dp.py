"""`python benchmarks/distributed_dp.py [--datasets packages] [--round-cost] [--cached]`: the defaults of
privacy=distributed_dp_sgd (section 7.4) and where its rounds' time goes (section 4.1).

The sweep runs real federations (Simulation Engine, SecAgg+ on) at epsilon 8, one per setting, beside the
non-private federation and the per-client DP path at their defaults; each is scored by the clients' held-out
perplexity at every evaluated round. The round cost runs the same federation with its default sampling rate and
with a rate so small that every batch is empty: the second is the round loop's and SecAgg+'s own overhead.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import ROOT, Provenance, log, publish
from quality import dataset_overrides
from server.record import read_metrics
from simulations.launch import make_offline_safe, simulate
from simulations.run import compose_settings

WORK = ROOT / "outputs" / "bench-distributed"  # one folder per run: a finished run is reused, not re-run
DISTRIBUTED = ["privacy=distributed_dp_sgd"]
# (label, overrides): the references, then privacy=distributed_dp_sgd's settings (its defaults: conf/privacy/).
REFERENCES = (
    ("no DP", ["privacy=disabled", "secagg=disabled"]),
    ("DP-SGD on each client", ["secagg=disabled"]),
)
SETTINGS = (
    ("SGD lr 1, C 1, q 0.1", ["privacy.sample_rate=0.1", "privacy.max_grad_norm=1.0", "train.optimizer=sgd",
                               "train.learning_rate=1.0", "strategy.lr_schedule=constant"]),
    ("AdamW lr 0.003, C 1, q 0.1", ["privacy.sample_rate=0.1", "privacy.max_grad_norm=1.0", "train.optimizer=adamw",
                                     "train.learning_rate=0.003", "strategy.lr_schedule=constant"]),
    ("AdamW lr 0.01 cosine, C 0.1, q 0.1", ["privacy.sample_rate=0.1", "privacy.max_grad_norm=0.1",
                                             "train.optimizer=adamw", "train.learning_rate=0.01",
                                             "strategy.lr_schedule=cosine"]),
)
EMPTY_BATCHES = "privacy.sample_rate=1e-6"  # no sequence is sampled: the round's time without client compute
COST_ROUNDS = 8
WARM_UP = 2  # the first rounds also start Ray's workers and load the model in each


def run(label: str, overrides: list[str], out: Path, cached: bool) -> list[dict] | None:
    """The metrics rows of one federation, run unless a finished one is in `out` (with `cached`: never run;
    None when it has not finished)."""
    settings = compose_settings(overrides, str(out))
    done = (out / "metrics.jsonl").exists() and read_metrics(out)[-1]["round"] == settings.federation.rounds
    if not done:
        if cached:
            return None
        log(f"{label}: {' '.join(overrides)}")
        simulate(settings)
    return read_metrics(out)


def scored(label: str, overrides: list[str], rows: list[dict]) -> dict:
    evaluated = [r for r in rows if r.get("eval_perplexity_geomean")]
    spent = [c["epsilon"] for r in rows for c in r["clients"] if "epsilon" in c]
    return {"label": label, "overrides": overrides, "rounds": rows[-1]["round"],
            "by_round": [{"round": r["round"], "mean": r["eval_perplexity_client_mean"],
                          "worst": r["eval_perplexity_worst"], "geomean": r["eval_perplexity_geomean"]}
                         for r in evaluated],
            "epsilon_max": max(spent, default=None),
            "seconds_per_round": statistics.median(r["seconds"] for r in rows[1:])}


def sweep(dataset: str, cached: bool) -> dict:
    base = dataset_overrides(dataset)
    out = WORK / dataset
    runs = []
    for label, overrides in REFERENCES + tuple((label, DISTRIBUTED + o) for label, o in SETTINGS):
        rows = run(label, base + overrides, out / label.replace(" ", "_").replace(",", ""), cached)
        if rows:
            runs.append(scored(label, overrides, rows))
    return {"name": dataset, "runs": runs}


def round_cost(cached: bool) -> dict:
    """Median seconds of a distributed round (no evaluation) at the default rate and with empty batches."""
    figures = {"rounds": COST_ROUNDS - WARM_UP - 1}
    common = DISTRIBUTED + [f"federation.rounds={COST_ROUNDS}", f"server.eval_every={COST_ROUNDS}"]
    for key, extra in (("default", []), ("empty", [EMPTY_BATCHES])):
        rows = run(f"round cost ({key})", common + extra, WORK / "round-cost" / key, cached)
        if not rows:
            return {}
        figures[key] = statistics.median(r["seconds"] for r in rows[1 + WARM_UP:-1])  # round 0 and the last evaluate
    used = compose_settings(DISTRIBUTED, str(WORK / "round-cost" / "default"))
    figures |= {"clients_per_round": used.federation.clients_per_round, "sample_rate": used.privacy.sample_rate}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default="packages", help="comma-separated: packages, descriptions")
    parser.add_argument("--round-cost", action="store_true", help="section 4.1 only")
    parser.add_argument("--cached", action="store_true", help="only tabulate runs already in " + str(WORK))
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    make_offline_safe()
    stamp = Provenance()
    if args.round_cost:
        publish("distributed_round", stamp, round_cost(args.cached), args.output)
        return
    publish("distributed_sweep", stamp, {"datasets": [sweep(d, args.cached) for d in args.datasets.split(",")]},
            args.output)


if __name__ == "__main__":
    main()
