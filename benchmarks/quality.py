"""`python benchmarks/quality.py [--datasets packages,descriptions] [--epsilons 0,1,4,8] [--quick]`: does federating
beat training alone, and what does privacy cost? Held-out perplexity of the base model, local-only, federated and
centralised training, without DP and at several epsilons, on every client's own held-out data."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import secrets
import shutil
import statistics
import sysconfig
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from common import ROOT, command_line, log, provenance, write_sections
from fedlm.data import ClientData, client_data_path
from fedlm.model import apply_lora, load_base_model
from fedlm.ledger import PrivacyLedger
from fedlm.plan import plan_privacy, planned_rounds
from fedlm.privacy import epsilon_of, train_local_dp
from fedlm.settings import RunSettings
from fedlm.training import evaluate, perplexity, resolve_precision, train_local
from simulations.launch import make_offline_safe, prepare, simulate
from simulations.run import compose_settings

SECTION = "7"
EPSILONS = (0.0, 1.0, 4.0, 8.0)  # 0: no DP
ROWS = ("base", "local-only", "federated", "centralised")
GAIN_KEPT_TARGET = 0.8  # the issue: DP at epsilon 8 keeps >= 80 % of the non-private federated gain over the base
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


def run_cell(dataset: str, epsilon: float, extra: list[str], out: Path, rows: list[str], cell: dict) -> dict:
    """`cell` completed with `rows` at one privacy level: per-client perplexities and the largest epsilon any
    client spent."""
    overrides = dataset_overrides(dataset) + privacy_overrides(epsilon) + extra
    out = out / f"eps{epsilon:g}"
    settings = compose_settings(overrides + ["secagg=disabled"], str(out / "federated"))
    prepare(settings)
    fed, train = settings.federation, settings.train
    clients = [ClientData.load(client_data_path(out / "federated" / "data", i)) for i in range(fed.num_clients)]
    base, _ = load_base_model(settings.model, settings.cache_dir)
    model = apply_lora(base, settings.lora, settings.seed)
    fresh = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    # A federated client's threads: the rows compare like with like, and two threads on a busy machine stall.
    limit, torch_threads = train.max_eval_sequences, fed.cpus_per_client
    torch.set_num_threads(torch_threads)

    def reset() -> None:
        model.load_state_dict(fresh, strict=False)

    cell = {**cell, "base": {"ppl": client_perplexities(model, clients, limit), "epsilon": 0.0}}
    if "local-only" in rows and "local-only" not in cell:
        cell["local-only"] = local_only(model, reset, clients, settings, f"{dataset} eps={epsilon:g}")
    if "centralised" in rows and "centralised" not in cell:
        log(f"{dataset} eps={epsilon:g}: centralised, on the pooled rows")
        reset()
        pooled = [torch.cat([getattr(c, k) for c in clients]) for k in ("train", "train_mask")]
        calls = fed.rounds * fed.clients_per_round  # the federation's total steps, the full budget over them
        spent = train_alone(model, *pooled, settings, calls)
        cell["centralised"] = {"ppl": client_perplexities(model, clients, limit), "epsilon": spent}
    if "federated" in rows and "federated" not in cell:
        log(f"{dataset} eps={epsilon:g}: federated (the real simulation, SecAgg+ off: it changes the sum by < 1e-6)")
        shutil.rmtree(out / "federated" / "privacy", ignore_errors=True)  # a re-run must not inherit spent budgets
        outcome = simulate(settings)
        reset()
        set_peft_model_state_dict(model, load_file(outcome.output_dir / "adapter" / "adapter_model.safetensors"))
        torch.set_num_threads(torch_threads)
        cell["federated"] = {"ppl": client_perplexities(model, clients, limit),
                             "epsilon": max((r.get("epsilon_max") or 0.0) for r in outcome.rows)}
    return cell


def local_only(model, reset, clients: list[ClientData], settings: RunSettings, label: str) -> dict:
    """Each client alone, for the rounds its plan expects it to join, with the same local steps, sampling rate
    and noise: the same mechanism, and so the same epsilon, as inside the federation."""
    fed, train = settings.federation, settings.train
    joined = planned_rounds(settings)
    log(f"{label}: local-only, {fed.num_clients} clients x {joined} rounds x {train.local_steps} steps")
    ppl, eps = [], []
    for c in clients:
        reset()
        eps.append(train_alone(model, c.train, c.train_mask, settings, joined))
        ppl += client_perplexities(model, [c], train.max_eval_sequences)
    return {"ppl": ppl, "epsilon": max(eps)}


def cell(ppl: list[float]) -> str:
    """A table cell: the clients' mean / worst (geometric mean) held-out perplexity."""
    return f"{statistics.mean(ppl):.1f} / {max(ppl):.1f} ({statistics.geometric_mean(ppl):.1f})"


def gain(results: dict, row: str, epsilon: float, center=statistics.mean) -> float:
    """How far `row` brought the clients' perplexity below the base's, by `center` (the mean client, or the
    geometric mean: exp of the mean client loss, which one outlying client sways far less)."""
    base = center(results[f"{epsilon:g}"]["base"]["ppl"])
    return base - center(results[f"{epsilon:g}"][row]["ppl"])


def plot(results: dict, dataset: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted((e for e in EPSILONS if f"{e:g}" in results), key=lambda e: e or math.inf)  # no DP: the far end
    xs = list(range(len(eps)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (center, name) in zip(axes, ((statistics.mean, "mean client"), (statistics.geometric_mean,
                                                                             "geometric mean"))):
        for row, style in zip(ROWS, ("k--", "C1o-", "C0o-", "C2o-")):
            ys = [center(results[f"{e:g}"][row]["ppl"]) if row in results[f"{e:g}"] else math.nan for e in eps]
            ax.plot(xs, ys, style, label=row)
        ax.set_xticks(xs, ["no DP" if e == 0 else f"ε={e:g}" for e in eps])
        ax.set_ylabel(f"held-out perplexity, {name}")
        ax.set_title(f"Learning quality: {dataset} ({name})")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def swing_note(results: dict, out: Path) -> str:
    """Why the mean and the geometric mean disagree: one client far above the others carries the mean, and its
    perplexity under the shared adapter swings with whether the last rounds sampled it."""
    names = [c["sources"][0] for c in json.loads((out / "eps0" / "federated" / "data" / "summary.json").read_text())]
    base = results["0"]["base"]["ppl"]
    i = max(range(len(base)), key=base.__getitem__)
    swings = []
    for e in ("0", "8"):
        metrics = (out / f"eps{e}" / "federated" / "metrics.jsonl").read_text().splitlines()
        worst = [json.loads(line).get("eval_perplexity_worst") for line in metrics]
        swings.append(f"{'no DP' if e == '0' else 'ε=8'}: " + ", ".join(f"{w:.0f}" for w in worst if w))
    return (f"The two measures disagree because one client carries the mean: {names[i]} (base {base[i]:.0f}, "
            f"{base[i] / statistics.median(base):.1f}x the median client's). Under the shared adapter its "
            "perplexity rises and falls with whether a round sampled it; the worst client's perplexity, round by "
            f"round from the base: {'; '.join(swings)}. Mean-client figures on this data set therefore rest largely "
            "on which rounds drew that one client; the geometric mean (exp of the mean client loss) is the steadier "
            "measure of the federation as a whole.")


def noise_to_signal(out: Path) -> str:
    """Why DP-SGD costs learning here: per step, the Gaussian noise added to a client's averaged clipped gradient
    against the largest signal that average can carry (norm C), for every client of the epsilon-8 run."""
    run = out / "eps8" / "federated"
    used = RunSettings.from_json((run / "settings.json").read_text())
    base, _ = load_base_model(used.model, used.cache_dir)
    d = sum(p.numel() for p in apply_lora(base, used.lora, used.seed).parameters() if p.requires_grad)
    k = used.federation.clients_per_round
    plans = [PrivacyLedger(path).read().parameters for path in sorted((run / "privacy").glob("client_*.json"))]
    sigmas = [p.noise_multiplier for p in plans]
    ratio = sorted(p.noise_multiplier * math.sqrt(d) / (p.sample_rate * p.sequences) for p in plans)
    return (f"Why DP costs this much learning here: at ε=8 each client's noise multiplier is "
            f"{min(sigmas):.2f}-{max(sigmas):.2f} (its plan: {plans[0].planned_steps} steps at its sampling rate), "
            f"so the noise added to each averaged step has norm σ·C·√d/B = {ratio[0]:.1f}-{ratio[-1]:.1f} times C "
            f"over the d = {d:,} adapter parameters, while the averaged clipped gradient itself has norm at most "
            f"C; averaging {k} clients' updates only divides it by √{k}. Most of each DP step is noise, so the "
            "adapter learns far less per step than without DP. Sections 7.1 and 7.2 measure the settings that "
            "might change that.")


def personalisation_note(results: dict, lost: list[float], out: Path) -> str:
    """Why local-only can win here: which clients gain more alone, and by how much."""
    names = [c["sources"][0] for c in json.loads(next(out.glob("eps*/federated/data/summary.json")).read_text())]
    parts = []
    for e in lost:
        cell = results[f"{e:g}"]
        local, fed, base = cell["local-only"]["ppl"], cell["federated"]["ppl"], cell["base"]["ppl"]
        better = [i for i in range(len(local)) if local[i] < fed[i]]
        i = max(range(len(local)), key=lambda j: fed[j] - local[j])
        parts.append(f"{'no DP' if e == 0 else f'ε={e:g}'}: local-only is better for {len(better)} of {len(local)} "
                     f"clients, most for {names[i]} ({base[i]:.0f} base -> {local[i]:.0f} alone vs {fed[i]:.0f} "
                     "federated)")
    return ("Why: each client is scored on its own held-out text, and the clients' data differ (one code base or "
            "one group of packages each). Local-only trains one adapter per client on exactly that distribution; "
            "federated (and centralised) training fits one shared adapter to all of them, and a client far from "
            "the others (high base perplexity) gains little from the average. " + "; ".join(parts) + ".")


def table(results: dict, dataset: str, label: str, plot_path: Path, out: Path) -> list[str]:
    eps = [e for e in EPSILONS if f"{e:g}" in results]
    cols = ["no DP" if e == 0 else f"ε = {e:g}" for e in eps]
    lines = [f"### {dataset}{f' ({label})' if label else ''}", "",
             "| row | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row in ROWS:
        cells = []
        for e in eps:
            ppl = results[f"{e:g}"].get(row, {}).get("ppl")
            cells.append(cell(ppl) if ppl else "not run")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    spent = "; ".join(f"ε={e:g}: " + ", ".join(f"{row} {results[f'{e:g}'][row]['epsilon']:.2f}" for row in ROWS[1:]
                                               if row in results[f"{e:g}"]) for e in eps if e)
    absent = [f"{'no DP' if e == 0 else f'ε={e:g}'}" for e in EPSILONS if f"{e:g}" not in results]
    if absent:
        lines += ["", f"Not measured yet: {', '.join(absent)} (`--epsilons` adds them; measured cells are kept)."]
    lines += ["", "Cells: mean / worst client (geometric mean) held-out perplexity." +
              (f" Largest epsilon actually spent: {spent}." if spent else "")]
    lines += [f"- {line}" for line in budget_spent(out, eps)] + [""]
    compared = [e for e in eps if {"federated", "local-only"} <= set(results[f"{e:g}"])]
    for center, who in ((statistics.mean, "the mean client"), (statistics.geometric_mean, "the geometric mean")):
        beats = {e: gain(results, "federated", e, center) > gain(results, "local-only", e, center) for e in compared}
        wins = [f"{'no DP' if e == 0 else f'ε={e:g}'}: {'yes' if won else '**no**'}" for e, won in beats.items()]
        if wins:
            lines.append(f"- Federated beats local-only for {who}: {', '.join(wins)}.")
    lost = [e for e in eps if {"federated", "local-only"} <= set(results[f"{e:g}"])
            and gain(results, "federated", e) <= gain(results, "local-only", e)]
    if lost:
        lines.append(f"  {personalisation_note(results, lost, out)}")
    worse = [e for e in eps if "centralised" in results[f"{e:g}"]
             and min(gain(results, "centralised", e), gain(results, "centralised", e, statistics.geometric_mean)) < 0]
    if worse:
        lines.append(f"- Centralised ends worse than the base at {', '.join(f'ε={e:g}' for e in worse)} (by the mean "
                     "or the geometric mean): not a "
                     "ceiling there. Likely cause (not isolated): it takes all the federation's steps on one adapter, "
                     "so the noise of each DP step accumulates over many more steps than any client takes; "
                     "federated clients take fewer steps each and their noise is averaged.")
    if all("federated" in results.get(k, {}) for k in ("0", "8")):
        kept = gain(results, "federated", 8.0) / gain(results, "federated", 0.0)
        kept_geo = (gain(results, "federated", 8.0, statistics.geometric_mean) /
                    gain(results, "federated", 0.0, statistics.geometric_mean))
        verdict = "met" if kept >= GAIN_KEPT_TARGET else "**not met**"
        lines.append(f"- DP at ε=8 keeps {100 * kept:.0f} % of the non-private federated gain over the base "
                     f"(target {100 * GAIN_KEPT_TARGET:.0f} %): {verdict}; by the geometric mean, "
                     f"{100 * kept_geo:.0f} %.")
        if min(kept, kept_geo) < GAIN_KEPT_TARGET:
            lines.append(f"  {noise_to_signal(out)}")
        if abs(kept - kept_geo) > 0.2:
            lines.append(f"  {swing_note(results, out)}")
    lines += ["", f"![perplexity vs epsilon, {dataset}]({plot_path.relative_to(ROOT).as_posix()})", ""]
    return lines


def budget_spent(out: Path, epsilons: list[float]) -> list[str]:
    """What each client of the federated row spent of its budget, from its own ledger (the target: >= 80 %)."""
    lines = []
    for e in (e for e in epsilons if e):
        ledgers = sorted((out / f"eps{e:g}" / "federated" / "privacy").glob("client_*.json"))
        spent = [PrivacyLedger(path).read().epsilon for path in ledgers]
        if spent:
            verdict = "met" if min(spent) >= 0.8 * e and max(spent) <= e else "**not met**"
            lines.append(f"Budget spent by each of the {len(spent)} federated clients at ε={e:g}: "
                         f"{min(spent):.2f}-{max(spent):.2f}, {100 * min(spent) / e:.0f}-{100 * max(spent) / e:.0f} % "
                         f"(target: every client at least 80 % and none above 100 %): {verdict}.")
    return lines


def trained_with(out: Path) -> str:
    """The settings the cached results were trained with, read from the federated runs' own settings.json: the
    non-private and the DP path each have their own batch, optimiser and learning rate (conf/privacy/)."""
    paths = {}
    for path in sorted(out.glob("eps*/federated/settings.json")):
        used = json.loads(path.read_text())
        paths.setdefault("DP" if used["privacy"]["name"] != "disabled" else "no DP", used)
    fed = next(iter(paths.values()))["federation"]
    described = []
    for name, used in paths.items():
        t = used["train"]
        batch = "auto (each client's plan)" if t["batch_size"] == "auto" else t["batch_size"]
        momentum = f" momentum {t['momentum']:g}" if t["optimizer"] == "sgd" else ""
        described.append(f"{name}: {t['optimizer']}{momentum} lr {t['learning_rate']:g}, batch {batch}"
                         + (f", max_grad_norm {used['privacy']['max_grad_norm']:g}, auto batch at most "
                            f"{used['privacy']['max_auto_batch']}" if name == "DP" else ""))
    t = next(iter(paths.values()))["train"]
    return (f"Trained with: {fed['num_clients']} clients, {fed['clients_per_round']} per round, {fed['rounds']} "
            f"rounds of {t['local_steps']} local steps; {'; '.join(described)}; precision {t['precision']} "
            f"({resolve_precision(t['precision'])} here).")


def measure(dataset: str, extra: list[str], epsilons: list[float], rows: list[str], cached: bool) -> tuple[dict, Path]:
    """The cached results of `dataset` trained with `extra`, completed with any missing `rows` at `epsilons`
    (unless `cached`), and their folder."""
    out = WORK / (dataset + "".join("-" + o.replace("=", "") for o in extra))
    cache = out / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    for epsilon in epsilons:
        key = f"{epsilon:g}"
        missing = any(row not in results.get(key, {}) for row in rows)  # finished rows are reused
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


def levers_section(dataset: str, quick: bool, cached: bool) -> list[str]:
    """Section 7.1's table: the federated row at no DP and at epsilon 8 for the defaults and every lever."""
    base_extra = QUICK if quick else []
    defaults, out = measure(dataset, base_extra, [0.0, 8.0], ["federated"], cached)
    if "0" not in defaults:
        return [f"### {dataset}", "", "Not measured yet.", ""]
    summary = json.loads((out / "eps0" / "federated" / "data" / "summary.json").read_text())
    sizes = [c["train_sequences"] for c in summary]
    lines = [f"### {dataset} ({' '.join(base_extra) or 'default rounds'})", "",
             "| setting | what it changes | no DP | ε = 8 | ε=8 keeps of the no-DP gain (geometric mean) |",
             "|---|---|---:|---:|---:|"]
    kept_geo = {}
    for label, why, changes_plain in (("defaults", "the settings of section 7", False), *LEVERS):
        extra = base_extra + (label.split() if label != "defaults" else [])
        results, _ = measure(dataset, extra, [0.0, 8.0] if changes_plain else [8.0], ["federated"], cached)
        plain = (results if changes_plain else defaults).get("0", {}).get("federated")
        private = (results if label != "defaults" else defaults).get("8", {}).get("federated")
        if not (plain and private):
            lines.append(f"| `{label}` | {why} | not measured yet | | |")
            continue
        base = defaults["0"]["base"]["ppl"]
        kept = [(center(base) - center(private["ppl"])) / (center(base) - center(plain["ppl"]))
                for center in (statistics.mean, statistics.geometric_mean)]
        lines.append(f"| `{label}` | {why} | {cell(plain['ppl'])} | {cell(private['ppl'])} | "
                     f"{100 * kept[0]:.0f} % ({100 * kept[1]:.0f} %) |")
        kept_geo[label] = kept[1]
    best = max(kept_geo, key=kept_geo.get)
    verdict = ("None keeps more of the gain than the defaults by the geometric mean (the mean is carried by one "
               "client, section 7)" if best == "defaults" else
               f"`{best}` keeps the most by the geometric mean, {100 * kept_geo[best]:.0f} %")
    return lines + ["", f"Cells: mean / worst client (geometric mean) held-out perplexity of the federated row; the "
                        f"base model: {cell(defaults['0']['base']['ppl'])}. Each setting is section 7's defaults "
                        "with only that override, in a real simulation of its own.", "",
                    f"{verdict}; the 80 % target stays out of reach. With {min(sizes):,}-{max(sizes):,} training "
                    "sequences per client, "
                    "the noise that ε=8 requires over a client's horizon outweighs one step's signal whichever way "
                    "the step is shaped. The lever these settings cannot pull is more data per client: it lets the "
                    "batch grow at the same sampling rate, so the same σ, and the noise on a step's mean falls as "
                    "1/B (at B times the compute per step).", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default="packages,descriptions", help="comma-separated: packages, descriptions")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS), help="0 means no DP")
    parser.add_argument("--quick", action="store_true", help=f"{' '.join(QUICK)} for every row")
    parser.add_argument("--rows", default=",".join(ROWS[1:]), help="rows to train (the base is always evaluated)")
    parser.add_argument("--set", default="", help="extra Hydra overrides for every row, e.g. 'train.batch_size=64' "
                        "(section 7.2)")
    parser.add_argument("--levers", action="store_true", help="section 7.1 only: the federated row under each "
                        "setting of LEVERS, without DP and at epsilon 8, on the first of --datasets")
    parser.add_argument("--cached", action="store_true", help="only tabulate what earlier runs measured")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    make_offline_safe()
    load, command = os.getloadavg()[0], command_line()
    stamp = provenance(command, load) + (" Tabulated from the cells that the same command without `--cached` "
                                         "measured and cached (outputs/bench-quality/)." if args.cached else "")
    if args.levers:
        body = levers_section(args.datasets.split(",")[0], args.quick, args.cached)
        section = "\n".join([
            f"## {SECTION}.1. Learning quality: what else might keep the gain under DP-SGD?", "",
            stamp, "", *body])
        write_sections(args.output, [section])
        print(section, flush=True)
        return
    extra = (QUICK if args.quick else []) + args.set.split()
    label = " ".join(extra)
    body = []
    for dataset in args.datasets.split(","):
        results, out = measure(dataset, extra, [float(e) for e in args.epsilons.split(",")], args.rows.split(","),
                               args.cached)
        if not results:
            body += [f"### {dataset}", "", "Not measured yet.", ""]
            continue
        plot_path = ROOT / "benchmarks" / "plots" / f"quality-{out.name}.png"
        plot(results, dataset, plot_path)
        body += table(results, dataset, label, plot_path, out) + [trained_with(out), ""]
    number, title = (SECTION, "") if not args.set else (f"{SECTION}.2", f" (other training settings: {args.set})")
    section = "\n".join([
        f"## {number}. Learning quality{title}: does federating beat training alone, and what does privacy cost?", "",
        stamp, "",
        "Every row is evaluated on every client's own held-out split (its first `train.max_eval_sequences` "
        "sequences), with the training settings listed under each table. **base**: the embedded base model, no "
        "adapter training. "
        "**local-only**: each client trains alone (in-process, `train_local` / `train_local_dp`) for the rounds "
        "the server's balanced sampling asks of it (rounds x clients per round / clients), with the same local "
        "steps and privacy plan (sampling rate, noise multiplier) as inside the federation, so the same epsilon. **federated**: the real "
        "simulation (`simulations.launch.simulate`, SecAgg+ off since it changes the aggregate by < 1e-6), its "
        "final global adapter evaluated per client. **centralised**: all clients' training rows pooled, the "
        "federation's total number of steps, with the privacy plan of one client holding them all over those steps "
        "(meant as the ceiling: pooling many more sequences makes each sampled step far cheaper in privacy).", "", *body])
    write_sections(args.output, [section])
    print(section, flush=True)


if __name__ == "__main__":
    main()
