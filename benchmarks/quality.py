"""`python benchmarks/quality.py [--datasets packages,descriptions] [--epsilons 0,1,4,8] [--quick]`: does federating
beat training alone, and what does privacy cost? Held-out perplexity of the base model, local-only, federated and
centralised training, without DP and at several epsilons, on every client's own held-out data."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import secrets
import shutil
import statistics
import sysconfig
from pathlib import Path
from typing import Callable

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from common import ROOT, Provenance, log, publish
from fedlm.data.preparation import ClientData, client_data_path
from fedlm.model import apply_lora, load_base_model
from fedlm.ledger import PrivacyLedger
from fedlm.plan import plan_privacy, planned_rounds
from fedlm.privacy import epsilon_of, train_local_dp
from fedlm.settings import RunSettings
from fedlm.training import evaluate, perplexity, resolve_precision, train_local
from server.record import read_metrics
from simulations.launch import make_offline_safe, prepare, simulate
from simulations.run import compose_settings

EPSILONS = (0.0, 1.0, 4.0, 8.0)  # 0: no DP
QUICK = ["federation.rounds=4"]  # --quick: a shorter federation (every row keeps the same budget as its federation)
WORK = ROOT / "outputs" / "bench-quality"  # results are cached here, so an interrupted run resumes


def descriptions_folder(root: Path, clients: int) -> Path:
    """English prose found on this machine: every installed distribution's long description (its README), one
    .txt document per distribution, in `clients` subfolders of alphabetically adjacent names (a natural split:
    each client holds its own packages' documentation)."""
    texts = {}
    # Only this interpreter's site-packages: once Ray is imported, sys.path also holds its vendored packages
    # (ray/thirdparty_files), and the corpus would change halfway through a run.
    paths = sysconfig.get_paths()
    for dist in importlib.metadata.distributions(path=list(dict.fromkeys((paths["purelib"], paths["platlib"])))):
        name, body = dist.metadata["Name"], dist.metadata.get_payload() or dist.metadata["Description"] or ""
        if name and name.lower() != "pollinate" and len(body) >= 2_000:  # skip stubs ("UNKNOWN", one line)
            texts[name.lower()] = body
    names = sorted(texts)
    total, folder = sum(len(t) for t in texts.values()), root / "descriptions"
    done, wanted = 0, set()
    for name in names:  # contiguous groups of about equal character counts
        group = min(clients - 1, int(clients * done / total))
        done += len(texts[name])
        path = folder / f"group_{group:02d}" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        wanted.add(path)
        if not path.exists() or path.read_text() != texts[name]:  # unchanged files keep their mtime: data is reused
            path.write_text(texts[name])
    for stale in set(folder.rglob("*.txt")) - wanted:  # a package since removed, or moved to another group
        stale.unlink()
    return folder


def dataset_overrides(name: str) -> list[str]:
    if name == "packages":
        return []  # the default federation: one installed package's source code per client
    folder = descriptions_folder(WORK / "corpora", clients=8)
    return [f"dataset.path={folder}", "dataset.partitioner=natural"]


def privacy_overrides(epsilon: float) -> list[str]:
    return ["privacy=disabled"] if epsilon == 0 else ["privacy=dp_sgd", f"privacy.target_epsilon={epsilon:g}"]


def client_perplexities(model, clients: list[ClientData], limit: int) -> list[float]:
    """Each client's held-out perplexity (its first `limit` held-out sequences, as the federation evaluates)."""
    return [perplexity(evaluate(model, c.eval[:limit], c.eval_mask[:limit])[0]) for c in clients]


def train_alone(model, ids: torch.Tensor, mask: torch.Tensor, settings: RunSettings, calls: int) -> float:
    """`calls` calls of `train.local_steps` steps (a fresh optimiser each, as in every federated round) on one
    data set; under DP, with the privacy plan of a client holding these rows and planning for `calls` rounds.
    Returns the epsilon spent (0 without DP)."""
    train, privacy = settings.train, settings.privacy
    if not privacy.enabled:
        for call in range(calls):
            train_local(model, ids, mask, train, seed=settings.seed * 1_009 + call)
        return 0.0
    plan = plan_privacy(dataclasses.replace(settings, privacy=dataclasses.replace(privacy, horizon_rounds=calls)),
                        len(ids))
    for _ in range(calls):
        train_local_dp(model, ids, mask, train, privacy, noise_multiplier=plan.noise_multiplier,
                       sample_rate=plan.sample_rate, seed=secrets.randbits(63))
    return epsilon_of([(plan.noise_multiplier, plan.sample_rate, calls * train.local_steps)], plan.delta,
                      privacy.accountant)


@dataclasses.dataclass
class Cell:
    """One data set at one privacy level, as every row trains and scores it: the federation's settings and
    clients, the model with a fresh adapter (`reset()` restores it), and how each client is evaluated."""
    settings: RunSettings
    clients: list[ClientData]
    model: object
    reset: Callable[[], None]
    out: Path
    label: str
    overrides: list[str]
    """The data set's and the run's extra overrides, without the privacy ones (a row may choose its own path)."""

    def perplexities(self) -> list[float]:
        """Each client's held-out perplexity (its first max_eval_sequences, as the federation evaluates)."""
        torch.set_num_threads(self.settings.federation.cpus_per_client)
        return client_perplexities(self.model, self.clients, self.settings.train.max_eval_sequences)


def local_only(c: Cell) -> dict:
    """Each client alone, for the rounds its plan expects it to join, with the same local steps, sampling rate
    and noise: the same mechanism, and so the same epsilon, as inside the federation."""
    fed, train = c.settings.federation, c.settings.train
    joined = planned_rounds(c.settings)
    log(f"{c.label}: local-only, {fed.num_clients} clients x {joined} rounds x {train.local_steps} steps")
    ppl, eps = [], []
    for client in c.clients:
        c.reset()
        eps.append(train_alone(c.model, client.train, client.train_mask, c.settings, joined))
        ppl += client_perplexities(c.model, [client], train.max_eval_sequences)
    return {"ppl": ppl, "epsilon": max(eps)}


def simulated(c: Cell, settings: RunSettings, folder: str) -> dict:
    """The real simulation of `settings` in c.out/folder (a finished one there is reused: an interrupted benchmark
    resumes), its final global adapter evaluated on every client."""
    out = c.out / folder
    finished = (out / "adapter").exists() and read_metrics(out)[-1]["round"] == settings.federation.rounds
    if not finished:
        shutil.rmtree(out / "privacy", ignore_errors=True)  # a re-run must not inherit spent budgets
        simulate(settings)
    rows = read_metrics(out)
    c.reset()
    set_peft_model_state_dict(c.model, load_file(out / "adapter" / "adapter_model.safetensors"))
    return {"ppl": c.perplexities(), "epsilon": max((r.get("epsilon_max") or 0.0) for r in rows)}


def federated(c: Cell) -> dict:
    """The real simulation; its final global adapter evaluated on every client."""
    log(f"{c.label}: federated (the real simulation, SecAgg+ off: it changes the sum by < 1e-6)")
    return simulated(c, c.settings, "federated")


def distributed(c: Cell) -> dict | None:
    """privacy=distributed_dp_sgd at the cell's budget, with that path's own defaults (conf/privacy/): the real
    simulation with SecAgg+, its final global adapter evaluated on every client. Nothing without DP."""
    privacy = c.settings.privacy
    if not privacy.enabled:
        return None
    log(f"{c.label}: federated, distributed DP (the real simulation, SecAgg+ on)")
    settings = compose_settings(c.overrides + ["privacy=distributed_dp_sgd",
                                               f"privacy.target_epsilon={privacy.target_epsilon:g}"],
                                str(c.out / "distributed"))
    return simulated(c, settings, "distributed")


def centralised(c: Cell) -> dict:
    """All clients' rows pooled, the federation's total steps, the full budget over them."""
    log(f"{c.label}: centralised, on the pooled rows")
    fed = c.settings.federation
    c.reset()
    pooled = [torch.cat([getattr(client, k) for client in c.clients]) for k in ("train", "train_mask")]
    spent = train_alone(c.model, *pooled, c.settings, fed.rounds * fed.clients_per_round)
    return {"ppl": c.perplexities(), "epsilon": spent}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of section 7's table: what it is (BENCHMARKS.md prints `about`), its plot style, and how it is
    trained from the fresh adapter of a `Cell` (None: the base, always evaluated, never trained)."""
    name: str
    about: str
    style: str
    train: Callable[[Cell], dict] | None


# A new row: one entry here (its `train` returns {"ppl": one perplexity per client, "epsilon": the most spent}).
ROWS = (
    Row("base", "the embedded base model, no adapter training.", "k--", None),
    Row("local-only", "each client trains alone (in-process, `train_local` / `train_local_dp`) for the rounds the "
        "server's balanced sampling asks of it (rounds x clients per round / clients), with the same local steps "
        "and privacy plan (sampling rate, noise multiplier) as inside the federation, so the same epsilon.", "C1o-",
        local_only),
    Row("federated", "the real simulation (`simulations.launch.simulate`, SecAgg+ off: it changes the aggregate "
        "only within what tests/integration/test_secagg.py allows), its final global adapter evaluated per client.",
        "C0o-", federated),
    Row("distributed", "`privacy=distributed_dp_sgd` at the same budget, with that path's own defaults "
        "(conf/privacy/distributed_dp_sgd.yaml: its rounds, sampling rate, clipping and server step): one central "
        "DP-SGD step per round over the sampled clients' data, noised in shares under SecAgg+ (on); the real "
        "simulation, its final global adapter evaluated per client. Not run without DP.", "C3s-", distributed),
    Row("centralised", "all clients' training rows pooled, the federation's total number of steps, with the privacy "
        "plan of one client holding them all over those steps (meant as the ceiling: pooling many more sequences "
        "makes each sampled step far cheaper in privacy).", "C2o-", centralised),
)


def run_cell(dataset: str, epsilon: float, extra: list[str], out: Path, rows: list[str], cell: dict) -> dict:
    """`cell` completed with `rows` at one privacy level: per-client perplexities and the largest epsilon any
    client spent."""
    overrides = dataset_overrides(dataset) + privacy_overrides(epsilon) + extra
    out = out / f"eps{epsilon:g}"
    settings = compose_settings(overrides + ["secagg=disabled"], str(out / "federated"))
    prepare(settings)
    clients = [ClientData.load(client_data_path(out / "federated" / "data", i))
               for i in range(settings.federation.num_clients)]
    base, _ = load_base_model(settings.model, settings.cache_dir)
    model = apply_lora(base, settings.lora, settings.seed)
    fresh = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    # A federated client's threads: the rows compare like with like, and two threads on a busy machine stall.
    c = Cell(settings, clients, model, lambda: model.load_state_dict(fresh, strict=False), out,
             f"{dataset} eps={epsilon:g}", dataset_overrides(dataset) + extra)
    cell = {**cell, "base": {"ppl": c.perplexities(), "epsilon": 0.0}}
    for row in ROWS:
        if row.train and row.name in rows and row.name not in cell:
            measured = row.train(c)
            if measured is not None:
                cell[row.name] = measured
    return cell


def plot(results: dict, dataset: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted((e for e in EPSILONS if f"{e:g}" in results), key=lambda e: e or math.inf)  # no DP: the far end
    xs = list(range(len(eps)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (center, name) in zip(axes, ((statistics.mean, "mean client"), (statistics.geometric_mean,
                                                                             "geometric mean"))):
        for row in ROWS:
            ys = [center(results[f"{e:g}"][row.name]["ppl"]) if row.name in results[f"{e:g}"] else math.nan
                  for e in eps]
            ax.plot(xs, ys, row.style, label=row.name)
        ax.set_xticks(xs, ["no DP" if e == 0 else f"ε={e:g}" for e in eps])
        ax.set_ylabel(f"held-out perplexity, {name}")
        ax.set_title(f"Learning quality: {dataset} ({name})")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(ppl: list[float], epsilon: float = 0.0) -> dict:
    """What BENCHMARKS.md shows of one row: the clients' mean, worst and geometric-mean perplexity."""
    return {"mean": statistics.mean(ppl), "worst": max(ppl), "geomean": statistics.geometric_mean(ppl),
            "epsilon": epsilon}


def client_names(out: Path) -> list[str]:
    summary_file = next(out.glob("eps*/federated/data/summary.json"))
    return [c["sources"][0] for c in json.loads(summary_file.read_text())]


def swing(results: dict, out: Path) -> dict | None:
    """The client far above the others (it carries the mean) and the worst client's perplexity round by round:
    under the shared adapter it swings with whether a round sampled that client."""
    if "0" not in results:
        return None
    base = results["0"]["base"]["ppl"]
    i = max(range(len(base)), key=base.__getitem__)
    worst = {}
    for e in (e for e in ("0", "8") if (out / f"eps{e}" / "federated" / "metrics.jsonl").exists()):
        metrics = (out / f"eps{e}" / "federated" / "metrics.jsonl").read_text().splitlines()
        worst[e] = [w for w in (json.loads(line).get("eval_perplexity_worst") for line in metrics) if w]
    return {"client": client_names(out)[i], "base": base[i], "times_median": base[i] / statistics.median(base),
            "worst_by_round": worst}


def noise_to_signal(out: Path) -> dict | None:
    """Per step, the Gaussian noise added to a client's averaged clipped gradient against the largest signal that
    average can carry (norm C), for every client of the epsilon-8 run."""
    run = out / "eps8" / "federated"
    if not (run / "settings.json").exists():
        return None
    used = RunSettings.from_json((run / "settings.json").read_text())
    base, _ = load_base_model(used.model, used.cache_dir)
    d = sum(p.numel() for p in apply_lora(base, used.lora, used.seed).parameters() if p.requires_grad)
    plans = [PrivacyLedger(path).read().parameters for path in sorted((run / "privacy").glob("client_*.json"))]
    if not plans:
        return None
    sigmas = [p.noise_multiplier for p in plans]
    ratio = [p.noise_multiplier * math.sqrt(d) / (p.sample_rate * p.sequences) for p in plans]
    return {"sigma_min": min(sigmas), "sigma_max": max(sigmas), "planned_steps": plans[0].planned_steps,
            "ratio_min": min(ratio), "ratio_max": max(ratio), "adapter_parameters": d,
            "clients_per_round": used.federation.clients_per_round}


def personalisation(results: dict, out: Path) -> dict:
    """Per privacy level: for how many clients local-only beats federated, and the client it helps most."""
    names, notes = client_names(out), {}
    for e, cell in results.items():
        if not {"local-only", "federated"} <= set(cell):
            continue
        local, fed, base = cell["local-only"]["ppl"], cell["federated"]["ppl"], cell["base"]["ppl"]
        i = max(range(len(local)), key=lambda j: fed[j] - local[j])
        notes[e] = {"better": sum(local[j] < fed[j] for j in range(len(local))), "clients": len(local),
                    "client": names[i], "base": base[i], "alone": local[i], "federated": fed[i]}
    return notes


def budget_spent(out: Path, epsilons: list[str], row: str = "federated") -> dict:
    """What each client of a federated row spent of its budget, from its own ledger."""
    spent_by = {}
    for e in (e for e in epsilons if float(e)):
        spent = [PrivacyLedger(path).read().epsilon
                 for path in sorted((out / f"eps{e}" / row / "privacy").glob("client_*.json"))]
        if spent:
            spent_by[e] = {"clients": len(spent), "min": min(spent), "max": max(spent)}
    return spent_by


def trained_with(out: Path) -> dict:
    """The settings the cached results were trained with, read from the federated runs' own settings.json: the
    non-private and the DP path each have their own batch, optimiser and learning rate (conf/privacy/)."""
    paths = {}
    for path in sorted(out.glob("eps*/federated/settings.json")):
        used = json.loads(path.read_text())
        paths.setdefault("DP" if used["privacy"]["name"] != "disabled" else "no DP", used)
    fed, t = next(iter(paths.values()))["federation"], next(iter(paths.values()))["train"]
    described = []
    for name, used in paths.items():
        p = used["train"]
        described.append({"name": name, "optimizer": p["optimizer"], "momentum": p["momentum"],
                          "learning_rate": p["learning_rate"], "batch_size": p["batch_size"],
                          **({"max_grad_norm": used["privacy"]["max_grad_norm"],
                              "max_auto_batch": used["privacy"]["max_auto_batch"]} if name == "DP" else {})})
    return {"num_clients": fed["num_clients"], "clients_per_round": fed["clients_per_round"], "rounds": fed["rounds"],
            "local_steps": t["local_steps"], "paths": described, "precision": t["precision"],
            "resolved_precision": resolve_precision(t["precision"])}


def dataset_figures(results: dict, dataset: str, label: str, out: Path) -> dict:
    """One data set's table and the figures behind its notes, from the cached per-client results."""
    if not results:
        return {"name": dataset, "label": label, "cells": {}}
    plot_path = ROOT / "benchmarks" / "plots" / f"quality-{out.name}.png"
    plot(results, dataset, plot_path)
    return {"name": dataset, "label": label, "plot": plot_path.relative_to(ROOT).as_posix(),
            "cells": {e: {row: summary(r["ppl"], r["epsilon"]) for row, r in cell.items()} for e, cell in results.items()},
            "budget": budget_spent(out, list(results)), "budget_distributed": budget_spent(out, list(results),
                                                                                          "distributed"),
            "personalisation": personalisation(results, out),
            "noise": noise_to_signal(out), "swing": swing(results, out), "trained_with": trained_with(out)}


def measure(dataset: str, extra: list[str], epsilons: list[float], rows: list[str], cached: bool) -> tuple[dict, Path]:
    """The cached results of `dataset` trained with `extra`, completed with any missing `rows` at `epsilons`
    (unless `cached`), and their folder."""
    out = WORK / (dataset + "".join("-" + o.replace("=", "") for o in extra))
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    for epsilon in epsilons:
        key = f"{epsilon:g}"
        # finished rows are reused (distributed has no cell without DP)
        missing = any(row not in results.get(key, {}) for row in rows if epsilon or row != "distributed")
        if missing and not cached:
            measured = run_cell(dataset, epsilon, extra, out, rows, results.get(key, {}))
            cache.parent.mkdir(parents=True, exist_ok=True)
            # Re-read first: another process may have added other epsilons (each writes only its own).
            results = {**(json.loads(cache.read_text()) if cache.exists() else {}), key: measured}
            cache.write_text(json.dumps(results, indent=1))
    return results, out


# Section 7.1: settings that might keep more of the federated gain under DP-SGD, each measured against itself
# without DP (the flag: False when the setting cannot change a run without DP, whose defaults cell is reused).
LEVERS = (
    ("privacy.max_grad_norm=0.1", "clip every sequence's gradient: at C = 1 most per-sequence gradients are "
     "below C at the start, so the noise, scaled to C, is larger than the signal needs", False),
    ("train.batch_size=128 train.local_steps=3", "4x the expected batch over about the same sequences per round: "
     "the noise on a step's mean falls as σ/B, σ rising more slowly", True),
    ("lora.r=2 lora.alpha=4", "a quarter of the adapter's parameters: the noise's norm grows as √d, the "
     "clipped signal's does not", True),
)


def levers_figures(dataset: str, quick: bool, cached: bool) -> dict:
    """Section 7.1's figures: the federated row at no DP and at epsilon 8 for the defaults and every lever."""
    base_extra = QUICK if quick else []
    defaults, out = measure(dataset, base_extra, [0.0, 8.0], ["federated"], cached)
    figures = {"dataset": dataset, "label": " ".join(base_extra), "settings": []}
    if "0" not in defaults:
        return figures
    sizes = [c["train_sequences"] for c in
             json.loads((out / "eps0" / "federated" / "data" / "summary.json").read_text())]
    figures.update(base=summary(defaults["0"]["base"]["ppl"]), train_sequences={"min": min(sizes), "max": max(sizes)})
    for label, why, changes_plain in (("defaults", "the settings of section 7", False), *LEVERS):
        extra = base_extra + (label.split() if label != "defaults" else [])
        results, _ = measure(dataset, extra, [0.0, 8.0] if changes_plain else [8.0], ["federated"], cached)
        plain = (results if changes_plain else defaults).get("0", {}).get("federated")
        private = (results if label != "defaults" else defaults).get("8", {}).get("federated")
        figures["settings"].append({"setting": label, "why": why, "plain": plain and summary(plain["ppl"]),
                                    "private": private and summary(private["ppl"])})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default="packages,descriptions", help="comma-separated: packages, descriptions")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS), help="0 means no DP")
    parser.add_argument("--quick", action="store_true", help=f"{' '.join(QUICK)} for every row")
    parser.add_argument("--rows", default=",".join(row.name for row in ROWS[1:]),
                        help="rows to train (the base is always evaluated)")
    parser.add_argument("--set", default="", help="extra Hydra overrides for every row, e.g. 'train.batch_size=64' "
                        "(section 7.3)")
    parser.add_argument("--levers", action="store_true", help="section 7.1 only: the federated row under each "
                        "setting of LEVERS, without DP and at epsilon 8, on the first of --datasets")
    parser.add_argument("--cached", action="store_true", help="only tabulate what earlier runs measured")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    make_offline_safe()
    stamp = Provenance()
    if args.levers:
        publish("levers", stamp, levers_figures(args.datasets.split(",")[0], args.quick, args.cached), args.output)
        return
    extra = (QUICK if args.quick else []) + args.set.split()
    datasets = []
    for dataset in args.datasets.split(","):
        results, out = measure(dataset, extra, [float(e) for e in args.epsilons.split(",")], args.rows.split(","),
                               args.cached)
        datasets.append(dataset_figures(results, dataset, " ".join(extra), out))
    figures = {"rows": [{"name": row.name, "about": row.about} for row in ROWS], "epsilons_offered": list(EPSILONS),
               "datasets": datasets}
    if args.set:
        figures["set"] = args.set
    publish("quality-set" if args.set else "quality", stamp, figures, args.output)


if __name__ == "__main__":
    main()
