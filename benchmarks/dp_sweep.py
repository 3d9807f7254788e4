"""`python benchmarks/dp_sweep.py [--out DIR] [--datasets packages,descriptions] [--smoke] [--federations]`: which
optimiser, learning rate and expected batch should DP-SGD train with by default?

One client of each data set that benchmarks/quality.py uses (packages: the default federation's client 0;
descriptions: the prose federation's client 0) trains ALONE on its own training rows as a federated client does
over its lifetime: 5 calls of 10 local steps, a fresh optimizer per call (one per round it joins), the noise
calibrated once for the lifetime's 50 steps at sample rate B/n (target epsilon 8, delta from resolve_delta,
max_grad_norm 1, precision as the settings resolve it). Every config starts from the same fresh adapter and is
scored by the held-out perplexity of the client's first 64 eval sequences, against the base model and a no-DP
AdamW reference ("gain kept" = (base - dp) / (base - no-DP)).

Each result is appended to DIR/results.jsonl as soon as it is measured; a restart skips the configs already
there. The figures go to benchmarks/results/dp_sweep.json and BENCHMARKS.md section 7.2 is rendered from them
(--smoke: DIR/table-smoke.md). `--federations`: instead, the candidates in the real default federation at epsilon 8
(benchmarks/results/dp_sweep_federations.json, shown in section 7.2)."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedlm.data.preparation import ClientData, client_data_path
from fedlm.model import apply_lora, load_base_model
from fedlm.plan import plan_privacy
from fedlm.privacy import epsilon_of, train_local_dp
from fedlm.training import evaluate, perplexity, resolve_precision, train_local
from common import ROOT, Provenance, log, publish
from quality import descriptions_folder
from simulations.launch import make_offline_safe, prepare
from simulations.run import compose_settings

CALLS, STEPS = 5, 10  # 5 rounds joined x 10 local steps: the client's lifetime
TARGET_EPSILON, MAX_GRAD_NORM, EVAL_SEQUENCES, CLIENT = 8.0, 1.0, 64, 0
STAGE = [  # steps 2-4 of the sweep, all at B 32: (optimiser, lr)
    *(("adamw", lr) for lr in (3e-3, 1e-2, 3e-2)),
    *(("adam-eps", lr) for lr in (1e-2, 3e-2, 1e-1)),
    *(("sgd-momentum", lr) for lr in (0.03, 0.1, 0.3)),
]
LARGER_BATCHES = (64, 128)
CLIPPING_ONLY = [("sgd-momentum", 0.1), ("sgd-momentum", 1.0), ("adamw", 1e-2)]
"""Per-sequence clipping without noise (no guarantee): what the noise costs, apart from the clipping."""
FEDERATIONS = [  # --federations: (overrides of `simulations.run secagg=disabled`, what the row is)
    ("train.optimizer=sgd train.learning_rate=0.1 train.batch_size=32", "momentum SGD at the sweep's B 32 pick"),
    ("train.optimizer=adamw train.learning_rate=0.01 train.batch_size=32", "AdamW lr 0.01, with the plan's horizon"),
    ("train.optimizer=sgd train.learning_rate=0.1 train.local_steps=5 privacy.max_auto_batch=64",
     "the same compute in fewer, bigger steps"),
]


def overrides(dataset: str, out: Path) -> list[str]:
    """quality.py's data set overrides, its descriptions corpus written under `out` instead of the repository."""
    if dataset == "packages":
        return []
    return [f"dataset.path={descriptions_folder(out / 'corpora', clients=8)}", "dataset.partitioner=natural"]


def key(r: dict) -> tuple:
    return (r["dataset"], r["optimiser"], float(r["lr"]), int(r["batch"]), int(r["steps"]), r.get("noised", True))


def make_optimizer(optimiser: str, lr: float, eps: float | None):
    if optimiser == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if optimiser == "adam-eps":  # pfl-research's adaptivity degree: eps = sigma C / B, the noise's std on a mean
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, eps=eps)
    if optimiser == "sgd-momentum":
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(optimiser)


class Client:
    """One data set's client 0: its rows, the model with a fresh adapter, and the base perplexity."""

    def __init__(self, dataset: str, out: Path):
        self.dataset = dataset
        self.settings = compose_settings(overrides(dataset, out) + ["secagg=disabled", "privacy=dp_sgd",
                                                                     f"privacy.target_epsilon={TARGET_EPSILON:g}",
                                                                     f"privacy.max_grad_norm={MAX_GRAD_NORM:g}",
                                                                     f"train.local_steps={STEPS}"],
                                         str(out / "data" / dataset))
        prepare(self.settings)
        self.data = ClientData.load(client_data_path(out / "data" / dataset / "data", CLIENT))
        base, _ = load_base_model(self.settings.model, self.settings.cache_dir)
        self.model = apply_lora(base, self.settings.lora, self.settings.seed)
        self.fresh = {k: v.detach().clone() for k, v in self.model.state_dict().items() if "lora_" in k}
        torch.set_num_threads(1)
        self.n = len(self.data.train)
        self.base_ppl = self.ppl()

    def reset(self) -> None:
        self.model.load_state_dict(self.fresh, strict=False)

    def ppl(self) -> float:
        d = self.data
        return perplexity(evaluate(self.model, d.eval[:EVAL_SEQUENCES], d.eval_mask[:EVAL_SEQUENCES])[0])

    def run(self, optimiser: str, lr: float, batch: int, steps: int, noised: bool = True) -> dict:
        """Train one config from the fresh adapter over `CALLS` calls of `steps` steps; its record."""
        s = self.settings
        train = replace(s.train, optimizer="adamw", learning_rate=lr, batch_size=batch, local_steps=steps,
                        weight_decay=0.0)  # the optimiser itself comes from make_optimizer below
        privacy, seed = s.privacy, s.seed
        self.reset()
        torch.manual_seed(seed)
        start = time.perf_counter()
        record = {"dataset": self.dataset, "optimiser": optimiser, "lr": lr, "batch": batch, "steps": steps,
                  "lifetime_steps": CALLS * steps, "n_train": self.n, "precision": resolve_precision(train.precision)}
        if optimiser == "nodp-adamw":
            for call in range(CALLS):
                train_local(self.model, self.data.train, self.data.train_mask, train, seed=seed * 1_009 + call)
            record.update(expected_batch=batch, sigma=0.0, epsilon=None, extra="")  # no guarantee: strict JSON has no inf
        else:
            # The plan a client holding these rows makes for CALLS rounds of `steps` steps at this batch.
            plan = plan_privacy(replace(s, train=train, privacy=replace(privacy, horizon_rounds=CALLS)), self.n)
            rate, delta = plan.sample_rate, plan.delta
            sigma = plan.noise_multiplier if noised else 0.0
            expected = max(1, round(rate * self.n))  # what DPOptimizer divides the noisy sum by
            eps = sigma * privacy.max_grad_norm / expected if optimiser == "adam-eps" else None
            extra = f"eps {eps:.3g}" if eps is not None else {"adamw": "wd 0", "sgd-momentum": "momentum 0.9"}[optimiser]
            extra += "" if noised else ", clipping only: no noise, no guarantee"
            factory = make_optimizer(optimiser, lr, eps)
            for call in range(CALLS):  # a fresh optimizer per call, as in every round a client joins
                train_local_dp(self.model, self.data.train, self.data.train_mask, train, privacy,
                               noise_multiplier=sigma, sample_rate=rate, seed=seed * 1_009 + call,
                               make_optimizer=factory)
            epsilon = epsilon_of([(sigma, rate, CALLS * steps)], delta, privacy.accountant) if noised else None
            record.update(expected_batch=expected, sample_rate=rate, delta=delta, sigma=sigma, epsilon=epsilon,
                          extra=extra, noised=noised)
        train_seconds = time.perf_counter() - start
        record.update(ppl=self.ppl(), base_ppl=self.base_ppl, seconds=round(train_seconds, 1))
        return record


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def sweep_figures(rows: list[dict], datasets: list[str], steps: int) -> dict:
    """Section 7.2's figures: every measured config per data set, with its share of the no-DP gain kept."""
    out = []
    for dataset in datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        if not mine:
            continue
        ref = next((r for r in mine if r["optimiser"] == "nodp-adamw"), None)
        for r in mine:
            r["gain_kept"] = (r["base_ppl"] - r["ppl"]) / (r["base_ppl"] - ref["ppl"]) if ref else None
        out.append({"name": dataset, "n_train": mine[0]["n_train"], "base_ppl": mine[0]["base_ppl"],
                    "precision": mine[0]["precision"], "rows": mine})
    delta = next((r["delta"] for r in rows if "delta" in r), None)
    return {"calls": CALLS, "steps": steps, "target_epsilon": TARGET_EPSILON, "delta": delta,
            "max_grad_norm": MAX_GRAD_NORM, "client": CLIENT, "datasets": out}


def federations(out: Path, output: Path) -> None:
    """The sweep's candidates in the real default federation at epsilon 8: perplexity round 0 -> last."""
    from simulations.launch import simulate

    stamp, rows = Provenance(), []
    for overrides, about in FEDERATIONS:
        log(f"federation: secagg=disabled {overrides}")
        settings = compose_settings(["secagg=disabled", "privacy=dp_sgd", f"privacy.target_epsilon={TARGET_EPSILON:g}",
                                     *overrides.split()], str(out / "federations" / str(len(rows))))
        start = time.perf_counter()
        outcome = simulate(settings)
        rows.append({"overrides": overrides, "about": about, "ppl_initial": outcome.initial_perplexity,
                     "ppl_final": outcome.final_perplexity, "seconds": time.perf_counter() - start})
    rounds = settings.federation.rounds
    publish("dp_sweep_federations", stamp, {
        "command": "python -m simulations.run secagg=disabled", "rounds": rounds,
        "about": f"the default packages federation, {rounds} rounds, epsilon {TARGET_EPSILON:g}, each client's plan.",
        "rows": rows}, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-dp-sweep")
    parser.add_argument("--datasets", default="packages,descriptions")
    parser.add_argument("--smoke", action="store_true", help="2 steps per call, one config per optimiser, to results-smoke")
    parser.add_argument("--federations", action="store_true", help="only the candidates in the real federation")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="rendered from the results")
    args = parser.parse_args()
    make_offline_safe()
    if args.federations:
        federations(args.out, args.output)
        return
    stamp = Provenance()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / ("results-smoke.jsonl" if args.smoke else "results.jsonl")
    steps = 2 if args.smoke else STEPS
    done = {key(r): r for r in load(results)}

    def measure(client: Client, optimiser: str, lr: float, batch: int, noised: bool = True) -> dict:
        k = (client.dataset, optimiser, float(lr), batch, steps, noised)
        if k in done:
            print(f"[sweep] skip (measured): {k}", flush=True)
            return done[k]
        print(f"[sweep] {client.dataset}: {optimiser} lr {lr:g} B {batch} ...", flush=True)
        r = client.run(optimiser, lr, batch, steps, noised)
        with results.open("a") as f:
            f.write(json.dumps(r) + "\n")
        done[k] = r
        print(f"[sweep]   sigma {r['sigma']:.3f} eps {r['epsilon'] or math.inf:.3f} ppl {r['ppl']:.3f} (base "
              f"{r['base_ppl']:.3f}) {r['seconds']:.0f} s", flush=True)
        return r

    for dataset in args.datasets.split(","):
        client = Client(dataset, args.out)
        print(f"[sweep] {dataset}: client {CLIENT}, {client.n} training sequences, base ppl {client.base_ppl:.3f}",
              flush=True)
        measure(client, "nodp-adamw", 1e-2, 32)
        stage = STAGE[::3] if args.smoke else STAGE  # smoke: one config of each optimiser
        measured = [measure(client, opt, lr, 32) for opt, lr in stage]
        if args.smoke:
            continue
        for r in sorted(measured, key=lambda r: r["ppl"])[:2]:
            for batch in LARGER_BATCHES:
                measure(client, r["optimiser"], r["lr"], batch)
        for optimiser, lr in CLIPPING_ONLY:
            measure(client, optimiser, lr, 32, noised=False)
        del client

    datasets = args.datasets.split(",")
    rows = [r for r in load(results) if r["dataset"] in datasets and r["steps"] == steps]
    publish("dp_sweep", stamp, sweep_figures(rows, datasets, steps),
            args.out / "table-smoke.md" if args.smoke else args.output)


if __name__ == "__main__":
    main()
