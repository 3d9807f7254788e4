"""`python benchmarks/dp_sweep.py [--out DIR] [--datasets packages,descriptions] [--smoke]`: which optimiser,
learning rate and expected batch should DP-SGD train with by default?

One client of each data set that benchmarks/quality.py uses (packages: the default federation's client 0;
descriptions: the prose federation's client 0) trains ALONE on its own training rows as a federated client does
over its lifetime: 5 calls of 10 local steps, a fresh optimizer per call (one per round it joins), the noise
calibrated once for the lifetime's 50 steps at sample rate B/n (target epsilon 8, delta from resolve_delta,
max_grad_norm 1, precision as the settings resolve it). Every config starts from the same fresh adapter and is
scored by the held-out perplexity of the client's first 64 eval sequences, against the base model and a no-DP
AdamW reference ("gain kept" = (base - dp) / (base - no-DP)).

Each result is appended to DIR/results.jsonl as soon as it is measured; a restart skips the configs already
there. The tables go to stdout and DIR/table.md."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedlm.data import ClientData, client_data_path
from fedlm.model import apply_lora, load_base_model
from fedlm.plan import plan_privacy
from fedlm.privacy import epsilon_of, train_local_dp
from fedlm.training import evaluate, native_bf16, perplexity, resolve_precision, train_local
from common import ROOT
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


def fmt(x: float, digits: int = 2) -> str:
    return "∞" if not math.isfinite(x) else f"{x:.{digits}f}"


def table(rows: list[dict], dataset: str) -> list[str]:
    mine = [r for r in rows if r["dataset"] == dataset]
    if not mine:
        return [f"### {dataset}", "", "Not measured.", ""]
    ref = next((r for r in mine if r["optimiser"] == "nodp-adamw"), None)
    first = mine[0]
    lines = [f"### {dataset} (client {CLIENT}: {first['n_train']} training sequences; base perplexity "
             f"{first['base_ppl']:.2f}; precision {first['precision']})", "",
             "| optimiser | lr | extra | B | σ | ε spent | perplexity | gain kept | seconds |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in mine:
        gain = (r["base_ppl"] - r["ppl"]) / (r["base_ppl"] - ref["ppl"]) if ref else math.nan
        dp = r["optimiser"] != "nodp-adamw"
        lines.append(f"| {r['optimiser'] if dp else 'AdamW, no DP'} | {r['lr']:g} | {r.get('extra', '')} | "
                     f"{r['expected_batch']} | {fmt(r['sigma'], 3) if dp else '-'} | "
                     f"{fmt(r['epsilon'] or math.inf) if dp else '-'} | {r['ppl']:.2f} | {100 * gain:.0f} % | {r['seconds']:.0f} |")
    dps = [r for r in mine if r["optimiser"] != "nodp-adamw" and r.get("noised", True)]
    if dps and ref:
        best = min(dps, key=lambda r: r["ppl"])
        lines += ["", f"Best under DP: {best['optimiser']} lr {best['lr']:g} B {best['expected_batch']}, perplexity "
                      f"{best['ppl']:.2f} (base {best['base_ppl']:.2f}, no DP {ref['ppl']:.2f})."]
    return lines + [""]


def cpu() -> str:
    name = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    name = name.split(":", 1)[-1].strip() or "unknown CPU"
    flags = Path("/proc/cpuinfo").read_text().split()
    return f"{name}, avx512_bf16 in /proc/cpuinfo: {'yes' if 'avx512_bf16' in flags else 'no'} (native bf16: " \
           f"{'yes' if native_bf16() else 'no'}), {torch.get_num_threads()} torch thread"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-dp-sweep")
    parser.add_argument("--datasets", default="packages,descriptions")
    parser.add_argument("--smoke", action="store_true", help="2 steps per call, one config per optimiser, to results-smoke")
    args = parser.parse_args()
    make_offline_safe()
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

    rows = load(results)
    order = {(d): i for i, d in enumerate(args.datasets.split(","))}
    rows = [r for r in rows if r["dataset"] in order and r["steps"] == steps]
    text = "\n".join([f"## DP-SGD optimiser x lr x batch sweep ({CALLS} calls x {steps} steps, ε target "
                      f"{TARGET_EPSILON:g}, C {MAX_GRAD_NORM:g})", "", f"CPU: {cpu()}.", "",
                      *(line for d in order for line in table(rows, d))])
    print(text, flush=True)
    (args.out / ("table-smoke.md" if args.smoke else "table.md")).write_text(text + "\n")


if __name__ == "__main__":
    main()
