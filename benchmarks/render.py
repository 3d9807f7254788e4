"""`python benchmarks/render.py [--output BENCHMARKS.md] [--results DIR]`: BENCHMARKS.md from the measured figures.

Every benchmark script writes its figures and their provenance to benchmarks/results/<name>.json; this module is the
only place that turns them into Markdown. Every number and every verdict in the output (met / not met, which
setting is best, which client carries the mean) is computed here from those files; the prose holds none of its
own. The header (the text before the first "## " section) is kept as it is in the existing file.

A new figure: measure it in its script and add it to the `figures` dict the script publishes, then show it in
that section's function below. A new section: its script calls `common.publish(NAME, ...)`, and SECTIONS below
gets one entry (number, title, function). Imports no torch: it runs in a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import common` also when imported as benchmarks.render

from common import RESULTS, ROOT, read_result  # noqa: E402

SECAGG_TARGET = 1.3
"""The issue's bound on SecAgg+ round time / plain round time, at SECAGG_TARGET_CLIENTS clients."""
SECAGG_TARGET_CLIENTS = 20
GAIN_KEPT_TARGET = 0.8
"""The issue: DP-SGD on each client at epsilon 8 keeps >= 80 % of the non-private federated gain over the base,
by the geometric-mean client."""
DISTRIBUTED_KEPT_TARGET = 0.9
"""The issue: federation-wide DP-SGD at epsilon 8 keeps >= 90 % of that gain, by the geometric-mean client."""
BUDGET_TARGET = 0.8
"""Every federated client spends at least this share of its budget, and none more than all of it."""

HEADER = """# Pollinate benchmarks

Every section opens with the command that produced it, its date, the versions and the machine. `make bench`
(`python benchmarks/run.py`) runs them all; `python benchmarks/run.py --only SECTION[,SECTION]` re-runs some and
keeps the rest. Ratios are measured side by side in one run; nothing here is a timed test.
"""
"""The header of a BENCHMARKS.md that has none yet; an existing file's header is kept as it is."""

Get = Callable[[str], "dict | None"]


# ---- formatting --------------------------------------------------------------------------------------------------

def provenance(p: dict) -> list[str]:
    """The line a section opens with; what was not recorded is said to be unknown, not left out."""
    when = p.get("date") or "an unrecorded date"
    code = f" (code of commit {p['commit']})" if p.get("commit") else ""
    versions = p.get("versions") or "versions not recorded"
    where = p.get("machine") or "machine not recorded"
    start, end = p.get("load_start"), p.get("load_end")
    if start is None and end is None:
        load = "load average not recorded"
    else:
        load = "1-minute load average " + ", ".join(
            f"{f'{v:.2f}' if v is not None else 'not recorded'} at {which}" for v, which in ((start, "start"),
                                                                                        (end, "end")))
    line = f"_Produced by `{p['command']}` on {when}{code}; {versions}; {where}; {load}._"
    if "--cached" in p["command"].split():
        line += (" Tabulated from the cells that the same command without `--cached` measured and cached "
                 "(outputs/bench-quality/).")
    lines = [line]
    if p.get("note"):
        lines += ["", f"_{p['note']}_"]
    return lines


def table(head: list[str], align: str, rows: list[list]) -> list[str]:
    """A Markdown table: `align` has one character per column, l (left) or r (right)."""
    return (["| " + " | ".join(head) + " |", "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def sci(x: float) -> str:
    """1e-05 as 1e-5."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def eps_name(e: float | str) -> str:
    return "no DP" if float(e) == 0 else f"ε={float(e):g}"


def listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- sections 1-4: benchmarks/run.py and privacy_cost.py -----------------------------------------------------------

def throughput(get: Get) -> list[str]:
    f = get("throughput")["figures"]
    n = f["n_base"]
    rows = [[r["threads"], f"{r['train_tokens_per_s']:,.0f}", f"{r['train_seconds']:.2f}",
             f"{r['eval_tokens_per_s']:,.0f}", f"{r['peak_gflops']:.1f}",
             # LoRA: forward 2N + backward through activations 2N per token; frozen weights get no weight gradient.
             f"{100 * 4 * n * r['train_tokens_per_s'] / (r['peak_gflops'] * 1e9):.1f} %",
             f"{100 * 2 * n * r['eval_tokens_per_s'] / (r['peak_gflops'] * 1e9):.1f} %"] for r in f["rows"]]
    return [
        f"Embedded Llama base, N = {n:,} parameters; LoRA r={f['lora_r']} on every linear projection: "
        f"{f['n_lora']:,} trainable ({100 * f['n_lora'] / n:.1f} % of N). One `train_local` call = "
        f"{f['local_steps']} steps x {f['batch_size']} sequences x {f['seq_len']} tokens ({f['tokens']:,} real "
        f"tokens) on client 0's data; evaluation = its first {f['max_eval_sequences']} held-out sequences (at most).",
        "",
        *table(["torch threads", "train tokens/s", "s per `train_local`", "eval tokens/s",
                "fp32 matmul peak GFLOP/s", "train % of peak", "eval % of peak"], "rrrrrrr", rows), "",
        f"Median of {f['repeats']} timed calls after a warm-up call at each thread count; the peak is the best of "
        f"{f['matmul_repeats']} {f['matmul_size']}x{f['matmul_size']} fp32 `torch.matmul` calls at the same thread "
        "count. Training FLOPs are taken as 4·N per token, not the usual 6·N: with LoRA the frozen weights need the "
        "forward pass (2·N) and the backward pass through activations (2·N) but no weight gradients (the adapter's "
        "own cost is negligible). Evaluation is 2·N per token. Attention scores are left out, so the percentages "
        f"slightly understate the work done. The gap to peak: this model's matrices are narrow (d={f['hidden_size']}), "
        "and softmax, norms, the loss, the optimizer and Python dispatch are not matmuls. This is plain "
        "`train_local`; under DP-SGD clients run `train_local_dp`, whose extra cost is section 3.",
    ]


def federation(get: Get) -> list[str]:
    f = get("federation")["figures"]
    o, slots, rounds = f["overhead"], f["slots"], f["rounds"]
    return [
        f"{f['num_clients']} clients, {f['clients_per_round']} per round, {rounds} rounds, {f['local_steps']} local "
        f"steps, privacy={f['privacy']}, secagg={f['secagg']}, cpus_per_client={f['cpus_per_client']} on "
        f"{f['cores']} cores: {slots} clients train at once.", "",
        *table(["measure", "value"], "lr", [
            ["data preparation (once, before the run; reused by it)", f"{f['prep_seconds']:.1f} s"],
            ["end-to-end wall time of `simulate` (Ray start, model loads, all rounds, shutdown)",
             f"{f['wall_seconds']:.1f} s"],
            ["round 0 (base evaluation on all clients, worker start-up)", f"{f['round0_seconds']:.1f} s"],
            [f"sum of round seconds, rounds 1-{rounds}", f"{f['rounds_seconds']:.1f} s"],
            ["summed client training seconds (`client_train_seconds`)", f"{f['client_train_seconds']:.1f} s"],
            ["overhead end-to-end = wall / summed client training", f"{o['end_to_end']:.2f}"],
            ["overhead rounds-only = round seconds / summed client training", f"{o['rounds_only']:.2f}"],
            [f"per slot, end-to-end = wall x {slots} / summed client training", f"{o['per_slot_end_to_end']:.2f}"],
            [f"per slot, rounds-only = round seconds x {slots} / summed client training",
             f"{o['per_slot_rounds_only']:.2f}"],
            ["client training tokens/s inside the federation (each client, ≈)", f"{f['tokens_per_s']:,.0f}"],
            [f"held-out perplexity, round 0 (base) -> round {f['last_round']}",
             f"{f['ppl_initial']:.1f} -> {f['ppl_final']:.1f}"],
            [f"MB down / MB up per round (mean of rounds 1-{rounds})", f"{f['mb_down']:.2f} / {f['mb_up']:.2f}"],
            [f"bytes up per training client per round (the adapter alone: {f['n_lora']:,} fp32 values = "
             f"{4 * f['n_lora']:,} B)", f"{f['bytes_up_per_client']:,.0f}"],
        ]), "",
        "Summed client training time adds up every client's own local-training seconds. Because "
        f"{slots} clients train concurrently, the wall time can be *below* that sum (a ratio under 1 is parallel "
        f"speed-up, not negative overhead). The per-slot ratios multiply by the {slots} slots: 1.00 would mean the "
        "cores did nothing but client training; the excess is Ray and worker start-up, model loading, evaluating "
        "every client each round, aggregation, serialisation, and idle slots while a round's last client finishes. "
        "Clients running side by side also slow each other (shared caches and memory bandwidth): compare the "
        "in-federation tokens/s above with the 1-thread figure in section 1 (under DP-SGD, scaled by section 3's "
        f"step cost). Bytes are payload bytes: down, the adapter to the {f['clients_per_round']} training clients "
        "and to every evaluating client; up, the training clients' updates (evaluation replies carry only metrics). "
        "Secure aggregation adds its key, share and unmasking messages and uploads masked int64 values.",
    ]


def model_label(name: str, params: int) -> str:
    return f"{name}, {params / 1e6:.1f}M" if params < 1e8 else f"{name}, {params / 1e6:.0f}M"


def dp_cost(get: Get) -> list[str]:
    f = get("dp")["figures"]
    embedded, big = f["models"]
    rows = [[model_label(m["name"], m["params"]), m["batch"], r["threads"], f"{r['plain']:,.0f}", f"{r['dp']:,.0f}",
             f"{r['ratio']:.2f}", f"{r['rss_plain']:.2f} / {r['rss_dp']:.2f}"] for m in f["models"] for r in m["rows"]]
    return [
        f"One step = one AdamW update of the LoRA adapter (r={f['lora_r']}) on sequences of {f['seq_len']} tokens. "
        "Plain: `train_local`, the whole batch at once. DP: `train_local_dp` (Opacus per-sequence clipping, noise "
        f"multiplier {embedded['noise']:.2f} / {big['noise']:.2f} as each client calibrates it for the default "
        f"horizon), a Poisson batch of that expected size processed in physical chunks of {f['physical_batch']}. "
        f"Embedded base: client 0's real rows of the default federation, {embedded['steps']} steps per call. "
        f"{big['name']}: random weights and token ids, batch {big['batch']} (not {embedded['batch']}: a step takes "
        f"seconds on this CPU), {big['steps']} step per call.", "",
        *table(["model", "sequences per step", "torch threads", "plain ms/step", "DP ms/step", "DP / plain",
                "peak RSS GiB, plain / DP"], "lrrrrrr", rows), "",
        f"DP and plain calls alternate ({embedded['pairs']} pairs for the embedded base, {big['pairs']} for the "
        f"{big['name']} model, after a warm-up call of each at every thread count); the ratio is the median of the "
        "pairs' ratios, the ms/step the medians of each. Both are normalised to exactly the expected batch (seconds "
        "per sequence x batch), since a DP (Poisson) batch varies around it. What DP adds: per-sample gradient hooks "
        "on every LoRA layer, per-sequence norms and clipping, the noise draw, and smaller physical batches. Peak "
        "RSS: the whole benchmark process's high-water mark during one warm-up call (reset just before it), so it "
        "includes what was already loaded (the model, data, earlier sections' leftovers).",
    ]


def secagg_cost(get: Get) -> list[str]:
    f = get("secagg")["figures"]
    rows = [[r["clients"], f"{r['plain_seconds']:.1f}", f"{r['secagg_seconds']:.1f}", f"{r['time_ratio']:.2f}",
             f"{r['plain_bytes_up']:,.0f}", f"{r['secagg_bytes_up']:,.0f}",
             f"{r['secagg_bytes_up'] / r['plain_bytes_up']:.2f}"] for r in f["rows"]]
    at = next((r for r in f["rows"] if r["clients"] == SECAGG_TARGET_CLIENTS), None)
    verdict = "not measured" if at is None else "**met**" if at["time_ratio"] <= SECAGG_TARGET else "**not met**"
    return [
        "Embedded base, default data source (one installed package per client), `federation.num_clients` = "
        f"`clients_per_round` = K, {f['rounds']} rounds, `privacy=disabled` in both runs so only aggregation "
        f"differs; small local work to isolate the protocol: `{' '.join(f['local_work'])}`; "
        f"`secagg.num_shares={f['num_shares']}`, `reconstruction_threshold={f['reconstruction_threshold']}`. One "
        "simulation per cell, plain first.", "",
        *table(["K clients", "plain round s", "SecAgg+ round s", "time ratio", "bytes up per client, plain",
                "bytes up per client, SecAgg+", "bytes ratio"], "rrrrrrr", rows), "",
        f"Issue target, at most {SECAGG_TARGET}x round time at {SECAGG_TARGET_CLIENTS} clients: {verdict}. Round "
        f"seconds are the median `seconds` of rounds 1-{f['rounds']} (fit and federated evaluation of all K clients; "
        "Ray workers are warm from round 0); bytes up are `bytes_up` / K (payload bytes, masked vectors included; "
        "the same every round). A round lasts seconds, so any other load on the machine moves the ratio. SecAgg+ "
        "uploads int64 masked integers where plain FedAvg uploads float32 values (8 bytes a value instead of 4), "
        f"plus public keys, encrypted shares for `num_shares` = {f['num_shares']} neighbours and unmasking shares, a "
        "nearly fixed per-client amount because the neighbourhood does not grow with K. Its extra time is four "
        "protocol stages of messages per round (setup, key sharing, masked upload, unmasking) and the server's "
        "reconstruction of masks.",
    ]


# ---- sections 5, 6, 9: compare_strategies.py, deployment.py ------------------------------------------------------

def strategies(get: Get) -> list[str]:
    f = get("strategies")["figures"]
    rows = [[f"`{r['strategy']}`", r["privacy"], f"{r['ppl_initial']:.1f}", f"{r['ppl_final']:.1f}",
             f"{r['kb_up']:,.0f}"] for r in f["rows"]]
    return [
        f"{f['num_clients']} clients, {f['clients_per_round']} per round, {f['rounds']} rounds, SecAgg+ off (it "
        "does not change the aggregate beyond what tests/integration/test_secagg.py allows). Held-out perplexity is "
        "the federated, token-weighted figure over every client's own held-out split; upload is the adapter payload "
        "per training client per round.", "",
        *table(["strategy", "privacy", "round 0 ppl", "final ppl", "KB up per client per round"], "llrrr", rows),
    ]


def deployment(get: Get) -> list[str]:
    f = get("deployment")["figures"]
    sim, dep, c = f["simulation"], f["deployment"], f["costs"]
    light, heavy = f["light_messages"], f["heavy_messages"]
    per_client = light * c["light"] + heavy * c["heavy"]
    every_heavy = (light + heavy) * c["heavy"]
    slots = min(f["cores"], f["clients"])
    # Clients' processes overlap on the machine's cores: a round's overhead in wall time is about the sum of every
    # client's process cost spread over those cores.
    overhead = f["clients"] * per_client / slots
    return [
        f"The embedded base model, {f['clients']} clients (one standard-library package's code each), all "
        f"{f['clients']} every round, {f['rounds']} rounds, {f['local_steps']} local DP-SGD steps, SecAgg+ "
        f"({f['num_shares']} shares, threshold {f['reconstruction_threshold']}). Simulation: Flower's Simulation "
        f"Engine in one process tree. Deployment: a SuperLink with TLS and device authentication and "
        f"{f['clients']} `client.daemon` devices, all on loopback on this machine.", "",
        *table(["", "simulation", "loopback deployment", "deployment / simulation"], "lrrr", [
            [f"seconds per round (median of rounds 1-{f['rounds']})", f"{sim['round_seconds']:.1f}",
             f"{dep['round_seconds']:.1f}", f"{dep['round_seconds'] / sim['round_seconds']:.2f}"],
            ["round 0 (evaluation of the base model)", f"{sim['round0_seconds']:.1f}", f"{dep['round0_seconds']:.1f}",
             f"{dep['round0_seconds'] / sim['round0_seconds']:.2f}"],
            ["held-out perplexity after the last round", f"{sim['ppl_final']:.1f}", f"{dep['ppl_final']:.1f}", ""],
        ]), "",
        "A SuperNode starts a fresh `flwr-clientapp` process for every message. What such a process pays before it "
        f"works (fresh Python processes, median of {f['repeats']}):", "",
        *table(["per message", "seconds"], "lr", [
            ["Python interpreter alone", f"{c['interpreter']:.2f}"],
            ["light message (SecAgg+ setup, share keys, unmask): interpreter + `import client.app`",
             f"{c['light']:.2f}"],
            [f"heavy message (train, evaluate): + torch/PEFT/Opacus imports ({c['heavy_import']:.2f} s in all) + "
             f"base model, LoRA and the device's cached data ({c['model']:.2f} s)", f"{c['heavy']:.2f}"],
            [f"per client per round: {light} light + {heavy} heavy", f"{per_client:.1f}"],
            ["the same if every message imported the training stack (the ClientApp module before the split)",
             f"{every_heavy:.1f}"],
        ]), "",
        f"Starting processes and loading the model: about {overhead:.1f} s of each deployed round ({f['clients']} "
        f"clients x {per_client:.1f} s over {slots} cores), {pct(overhead / dep['round_seconds'])} of it; the "
        "simulation loads the model once per worker. Keeping torch, PEFT and Opacus out of `client/app.py`'s "
        f"module level spares SecAgg+'s {light} bookkeeping stages {light * (c['heavy'] - c['light']):.1f} s per "
        "client per round. On real devices each client has its own cores, so the overhead is one client's share, "
        "not the sum. The rest of the gap is not itemized here: SuperNodes and the ServerApp exchange messages by "
        "polling the SuperLink, each `flwr-clientapp` process also connects to its SuperNode and fetches its "
        "message and the app bundle, SecAgg+'s four stages run one after another (each waits for its slowest "
        "client), and contention from other work on the machine (see the load average) slows all of it.",
    ]


def bytes_by_strategy(get: Get) -> list[str]:
    f = get("bytes")["figures"]
    rows, grown = [], []
    for r in f["rows"]:
        n, k = r["eval_clients"], r["training_clients"]
        rows.append([f"`{r['strategy']}`", "SecAgg+" if r["secagg"] else "plain", f"{r['down_1'] / 1e3:,.0f}",
                     f"{r['down_2'] / 1e3:,.0f}", f"{r['up'] / 1e3:,.0f}",
                     f"{(r['down_2'] * n + r['up'] * k) / n / 1e3:,.0f}"])
        if r["down_2"] > 1.01 * r["down_1"]:
            grown.append(f"`{r['strategy']}` ({'SecAgg+' if r['secagg'] else 'plain'}): "
                         f"{r['down_2'] / r['down_1']:.2f}x")
    plain = {r["strategy"]: r["up"] for r in f["rows"] if not r["secagg"]}
    doubled = [f"{r['up'] / plain[r['strategy']]:.2f}x for `{r['strategy']}`" for r in f["rows"]
               if r["secagg"] and r["strategy"] in plain]
    n = f["rows"][0]["eval_clients"]
    return [
        f"Default federation ({f['num_clients']} clients, {f['clients_per_round']} trained per round, all {n} "
        f"evaluated every round), embedded base, LoRA r={f['lora_r']}. {f['rounds']} rounds per strategy "
        f"(`{' '.join(f['overrides'])}`): payload bytes do not depend on how long a client trains or on DP. Down: "
        "every message the server sends in a round (the adapter with each fit and each evaluate instruction, "
        f"SecAgg+'s protocol messages) divided by the {n} clients; a training client receives two adapters a round, "
        "an evaluating-only client one. Up: what each training client sends (evaluation replies are metrics only).",
        "",
        *table(["strategy", "aggregation", "KB down per client, round 1", "KB down per client, round 2",
                "KB up per training client", "KB per client per round, all traffic, round 2"], "llrrrr", rows), "",
        "`frozen_a` sends only the B matrices both ways (A is rebuilt from the shared seed). "
        + (f"SecAgg+ multiplies the upload by {listing(doubled)} (masked int64 values instead of float32) and adds "
           "key and share exchanges on both legs. " if doubled else "")
        + ("The download grew after the first aggregation for " + ", ".join(grown) + ": the global adapter came out "
           "of the aggregation wider than float32, so every later message carries wider arrays." if grown else
           "No strategy's download grew after its first aggregation: the global adapter stays float32."),
    ]


# ---- section 7: quality.py ---------------------------------------------------------------------------------------

def cell(c: dict | None) -> str:
    """A quality table cell: the clients' mean / worst (geometric mean) held-out perplexity."""
    return f"{c['mean']:.1f} / {c['worst']:.1f} ({c['geomean']:.1f})" if c else "not run"


CENTERS = (("mean", "the mean client"), ("geomean", "the geometric mean"))


def gain(cells: dict, row: str, eps: str, center: str = "mean") -> float:
    """How far `row` brought the clients' perplexity below the base's, by `center`."""
    return cells[eps]["base"][center] - cells[eps][row][center]


def quality_table(d: dict, rows: list[dict], offered: list[float]) -> list[str]:
    cells = d["cells"]
    eps = sorted(cells, key=float)
    lines = [f"### {d['name']}" + (f" ({d['label']})" if d.get("label") else ""), "", *table(["row", *("no DP" if float(e) == 0 else f"ε = {float(e):g}" for e in eps)], "l" + "r" * len(eps),
                   [[row["name"], *(cell(cells[e].get(row["name"])) for e in eps)] for row in rows])]
    absent = [eps_name(e) for e in offered if f"{e:g}" not in cells]
    if absent:
        lines += ["", f"Not measured yet: {', '.join(absent)} (`--epsilons` adds them; measured cells are kept)."]
    spent = "; ".join(f"{eps_name(e)}: " + ", ".join(f"{row['name']} {cells[e][row['name']]['epsilon']:.2f}"
                                                    for row in rows[1:] if row["name"] in cells[e])
                      for e in eps if float(e))
    lines += ["", "Cells: mean / worst client (geometric mean) held-out perplexity."
              + (f" Largest epsilon actually spent: {spent}." if spent else "")]
    for row, key in (("federated", "budget"), ("distributed", "budget_distributed")):
        for e, b in sorted(d.get(key, {}).items(), key=lambda kv: float(kv[0])):
            met = b["min"] >= BUDGET_TARGET * float(e) and b["max"] <= float(e)
            lines.append(f"- Budget spent by each of the {b['clients']} clients of the {row} row at {eps_name(e)}: "
                         f"{b['min']:.2f}-{b['max']:.2f}, {100 * b['min'] / float(e):.0f}-{100 * b['max'] / float(e):.0f} % "
                         f"(target: every client at least {pct(BUDGET_TARGET)} and none above 100 %): "
                         f"{'met' if met else '**not met**'}.")
    lines.append("")
    compared = [e for e in eps if {"federated", "local-only"} <= set(cells[e])]
    for center, who in CENTERS:
        wins = [f"{eps_name(e)}: {'yes' if gain(cells, 'federated', e, center) > gain(cells, 'local-only', e, center) else '**no**'}"
                for e in compared]
        if wins:
            lines.append(f"- Federated beats local-only for {who}: {', '.join(wins)}.")
    lost = [e for e in compared if gain(cells, "federated", e) <= gain(cells, "local-only", e)]
    notes = d.get("personalisation", {})
    if lost and all(e in notes for e in lost):
        parts = [f"{eps_name(e)}: local-only is better for {notes[e]['better']} of {notes[e]['clients']} clients, most "
                 f"for {notes[e]['client']} ({notes[e]['base']:.0f} base -> {notes[e]['alone']:.0f} alone vs "
                 f"{notes[e]['federated']:.0f} federated)" for e in lost]
        lines.append("  Why: each client is scored on its own held-out text, and the clients' data differ (one code "
                     "base or one group of packages each). Local-only trains one adapter per client on exactly that "
                     "distribution; federated (and centralised) training fits one shared adapter to all of them, and "
                     "a client far from the others (high base perplexity) gains little from the average. "
                     + "; ".join(parts) + ".")
    worse = [e for e in eps if "centralised" in cells[e]
             and min(gain(cells, "centralised", e, c) for c, _ in CENTERS) < 0]
    if worse:
        lines.append(f"- Centralised ends worse than the base at {', '.join(eps_name(e) for e in worse)} (by the mean "
                     "or the geometric mean): not a ceiling there. Likely cause (not isolated): it takes all the "
                     "federation's steps on one adapter, so the noise of each DP step accumulates over many more "
                     "steps than any client takes; federated clients take fewer steps each and their noise is "
                     "averaged.")
    private = max((e for e in eps if float(e) and "federated" in cells[e]), key=float, default=None)
    for row, target, what in (("federated", GAIN_KEPT_TARGET, "DP-SGD on each client"),
                              ("distributed", DISTRIBUTED_KEPT_TARGET, "federation-wide DP-SGD (distributed)")):
        at = max((e for e in eps if float(e) and row in cells[e]), key=float, default=None)
        if "0" in cells and "federated" in cells["0"] and at:
            kept, kept_geo = (gain(cells, row, at, c) / gain(cells, "federated", "0", c) for c, _ in CENTERS)
            lines.append(f"- {what} at {eps_name(at)} keeps {pct(kept_geo)} of the non-private federated gain over the "
                         f"base by the geometric mean (target {pct(target)}): "
                         f"{'met' if kept_geo >= target else '**not met**'}; by the mean client, {pct(kept)}.")
    if "0" in cells and "federated" in cells["0"] and private:
        kept, kept_geo = (gain(cells, "federated", private, c) / gain(cells, "federated", "0", c) for c, _ in CENTERS)
        n = d.get("noise")
        if min(kept, kept_geo) < GAIN_KEPT_TARGET and n:
            lines.append(
                f"  Why DP costs this much learning here: at {eps_name(private)} each client's noise multiplier is "
                f"{n['sigma_min']:.2f}-{n['sigma_max']:.2f} (its plan: {n['planned_steps']} steps at its sampling "
                f"rate), so the noise added to each averaged step has norm σ·C·√d/B = {n['ratio_min']:.1f}-"
                f"{n['ratio_max']:.1f} times C over the d = {n['adapter_parameters']:,} adapter parameters, while the "
                "averaged clipped gradient itself has norm at most C; averaging "
                f"{n['clients_per_round']} clients' updates only divides it by √{n['clients_per_round']}. Most of "
                "each DP step is noise, so the adapter learns far less per step than without DP. Sections 7.1 and "
                "7.2 measure the settings that might change that.")
        s = d.get("swing")
        if abs(kept - kept_geo) > 0.2 and s:
            rounds = "; ".join(f"{eps_name(e)}: " + ", ".join(f"{w:.0f}" for w in worst)
                               for e, worst in sorted(s["worst_by_round"].items(), key=lambda kv: float(kv[0])))
            lines.append(
                f"  The two measures disagree because one client carries the mean: {s['client']} (base "
                f"{s['base']:.0f}, {s['times_median']:.1f}x the median client's). Under the shared adapter its "
                "perplexity rises and falls with whether a round sampled it; the worst client's perplexity, round by "
                f"round from the base: {rounds}. Mean-client figures on this data set therefore rest largely on which "
                "rounds drew that one client; the geometric mean (exp of the mean client loss) is the steadier "
                "measure of the federation as a whole.")
    lines += ["", f"![perplexity vs epsilon, {d['name']}]({d['plot']})", ""]
    if d.get("trained_with"):
        lines.append(trained_with(d["trained_with"]))
    return lines


def trained_with(t: dict) -> str:
    described = []
    for p in t["paths"]:
        momentum = f" momentum {p['momentum']:g}" if p["optimizer"] == "sgd" else ""
        batch = "auto (each client's plan)" if p["batch_size"] == "auto" else p["batch_size"]
        described.append(f"{p['name']}: {p['optimizer']}{momentum} lr {p['learning_rate']:g}, batch {batch}"
                         + (f", max_grad_norm {p['max_grad_norm']:g}, auto batch at most {p['max_auto_batch']}"
                            if "max_grad_norm" in p else ""))
    return (f"Trained with: {t['num_clients']} clients, {t['clients_per_round']} per round, {t['rounds']} rounds of "
            f"{t['local_steps']} local steps; {'; '.join(described)}; precision {t['precision']} "
            f"({t['resolved_precision']} here).")


def quality(get: Get, name: str = "quality") -> list[str]:
    f = get(name)["figures"]
    about = " ".join(f"**{row['name']}**: {row['about']}" for row in f["rows"])
    body = []
    for d in f["datasets"]:
        body += quality_table(d, f["rows"], f["epsilons_offered"]) if d.get("cells") else [
            f"### {d['name']}", "", "Not measured yet."]
        body.append("")
    return ["Every row is evaluated on every client's own held-out split (its first `train.max_eval_sequences` "
            "sequences), with the training settings listed under each table. " + about, "", *body[:-1]]


def levers(get: Get) -> list[str]:
    f = get("levers")["figures"]
    if not f["settings"]:
        return [f"### {f['dataset']}", "", "Not measured yet."]
    base = f["base"]
    rows, kept_by = [], {}
    for s in f["settings"]:
        if not (s["plain"] and s["private"]):
            rows.append([f"`{s['setting']}`", s["why"], "not measured yet", "", ""])
            continue
        kept = {c: (base[c] - s["private"][c]) / (base[c] - s["plain"][c]) for c, _ in CENTERS}
        kept_by[s["setting"]] = kept
        rows.append([f"`{s['setting']}`", s["why"], cell(s["plain"]), cell(s["private"]),
                     f"{pct(kept['mean'])} ({pct(kept['geomean'])})"])
    lines = [f"### {f['dataset']} ({f['label'] or 'default rounds'})", "",
             *table(["setting", "what it changes", "no DP", "ε = 8", "ε=8 keeps of the no-DP gain (geometric mean)"],
                    "llrrr", rows), "",
             "Cells: mean / worst client (geometric mean) held-out perplexity of the federated row; the base model: "
             f"{cell(base)}. Each setting is section 7's defaults with only that override, in a real simulation of its "
             "own."]
    if not kept_by:
        return lines
    best = max(kept_by, key=lambda k: kept_by[k]["geomean"])
    verdict = [("None keeps more of the gain than the defaults by the geometric mean (the mean is carried by one "
                "client, section 7)" if best == "defaults" else
                f"`{best}` keeps the most by the geometric mean, {pct(kept_by[best]['geomean'])}") + "."]
    for center, who in CENTERS:
        reach = [f"`{k}` ({pct(v[center])})" for k, v in kept_by.items() if v[center] >= GAIN_KEPT_TARGET]
        verdict.append(f"By {who}, the {pct(GAIN_KEPT_TARGET)} target is "
                       + (f"reached by {listing(reach)}." if reach else "reached by none of them."))
    if all(v["geomean"] < GAIN_KEPT_TARGET for v in kept_by.values()):
        n = f["train_sequences"]
        verdict.append(f"With {n['min']:,}-{n['max']:,} training sequences per client, the noise that ε=8 requires "
                       "over a client's horizon outweighs one step's signal whichever way the step is shaped. The "
                       "lever these settings cannot pull is more data per client: it lets the batch grow at the same "
                       "sampling rate, so the same σ, and the noise on a step's mean falls as 1/B (at B times the "
                       "compute per step).")
    return lines + ["", " ".join(verdict)]


# ---- section 7.2: dp_sweep.py ------------------------------------------------------------------------------------

def sweep_name(r: dict) -> str:
    return f"{r['optimiser']} lr {r['lr']:g} B {r['expected_batch']}"


def dp_sweep(get: Get) -> list[str]:
    f = get("dp_sweep")["figures"]
    lines = [
        f"One client trains alone, as a federated client does over its lifetime: {f['calls']} calls of {f['steps']} "
        f"steps, a fresh optimiser per call, the noise calibrated once for its {f['calls'] * f['steps']} steps at "
        f"epsilon {f['target_epsilon']:g} (delta {sci(f['delta'])}, C = {f['max_grad_norm']:g}). Gain kept = (base - DP) "
        "/ (base - no DP). One run per row (the DP noise is fresh each time), so small differences between rows are "
        "not significant.", ""]
    summary = {}
    for d in f["datasets"]:
        mine = d["rows"]
        ref = next((r for r in mine if r["optimiser"] == "nodp-adamw"), None)
        lines += [f"### {d['name']} (client {f['client']}: {d['n_train']} training sequences; base perplexity "
                  f"{d['base_ppl']:.2f}; precision {d['precision']})", ""]
        rows = []
        for r in mine:
            dp = r["optimiser"] != "nodp-adamw"
            spent = ("-" if not dp else f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else "∞")
            rows.append([r["optimiser"] if dp else "AdamW, no DP", f"{r['lr']:g}", r.get("extra", ""),
                         r["expected_batch"], f"{r['sigma']:.3f}" if dp else "-", spent, f"{r['ppl']:.2f}",
                         pct(r['gain_kept']), f"{r['seconds']:.0f}"])
        lines += table(["optimiser", "lr", "extra", "B", "σ", "ε spent", "perplexity", "gain kept", "seconds"],
                       "rrlrrrrrr".replace("r", "l", 1), rows)
        noised = [r for r in mine if r["optimiser"] != "nodp-adamw" and r.get("noised", True)]
        if noised and ref:
            best = min(noised, key=lambda r: r["ppl"])
            lines += ["", f"Best under DP: {sweep_name(best)}, perplexity {best['ppl']:.2f} (base {d['base_ppl']:.2f}, "
                          f"no DP {ref['ppl']:.2f})."]
            summary[d["name"]] = (d, ref, noised, [r for r in mine if not r.get("noised", True)])
        lines.append("")
    lines += sweep_federations(get)
    decides = sweep_findings(summary)
    if decides:
        lines += ["What the sweep shows (computed from the rows above):", *decides]
    return lines[:-1] if lines[-1] == "" else lines


def sweep_findings(summary: dict) -> list[str]:
    """The sweep's conclusions, each computed from its rows: the best at the smallest batch, what clipping alone
    keeps against clipping with noise, and where each optimiser diverges."""
    out = []
    for name, (d, ref, noised, clipping) in summary.items():
        smallest = min(r["expected_batch"] for r in noised)
        best = max((r for r in noised if r["expected_batch"] == smallest), key=lambda r: r["gain_kept"])
        top = max(noised, key=lambda r: r["gain_kept"])
        out.append(f"- {name}: at B {smallest} the most is kept by {sweep_name(best)} "
                   f"({pct(best['gain_kept'])}); over every batch by {sweep_name(top)} "
                   f"({pct(top['gain_kept'])}).")
        for c in clipping:
            same = [r for r in noised if (r["optimiser"], r["lr"], r["expected_batch"]) ==
                    (c["optimiser"], c["lr"], c["expected_batch"])]
            with_noise = f"; with the noise, {pct(same[0]['gain_kept'])}" if same else ""
            out.append(f"  Clipping only (no noise), {sweep_name(c)} keeps {pct(c['gain_kept'])} of the no-DP "
                       f"gain{with_noise}.")
        diverged = [sweep_name(r) for r in noised if r["gain_kept"] < 0]
        if diverged:
            out.append(f"  Worse than the base model (diverged under the noise): {', '.join(diverged)}.")
    return out


def sweep_federations(get: Get) -> list[str]:
    run = get("dp_sweep_federations")
    if not run:
        return []
    f = run["figures"]
    rows = [[(f"`{r['overrides']}`" + (f" ({r['about']})" if r.get("about") else "")) if r["overrides"] else r["about"],
             f"{r['ppl_initial']:.2f} -> {r['ppl_final']:.2f}",
             f"{r['seconds']:.0f}" + (f" ({r['note']})" if r.get("note") else "")] for r in f["rows"]]
    best = min((r for r in f["rows"] if r["overrides"]), key=lambda r: r["ppl_final"])
    return ["The same choice in the real federation: " + f["about"], "", *provenance(run["provenance"]), "",
            *table([f"`{f['command']} ...`", f"held-out perplexity, round 0 -> {f['rounds']}", "seconds"], "llr",
                   rows), "",
            f"Lowest final perplexity: `{best['overrides']}` ({best['ppl_final']:.2f}).", ""]


# ---- sections 8, 10: memory.py, precision.py ---------------------------------------------------------------------

def memory(get: Get) -> list[str]:
    f = get("memory")["figures"]
    ceiling, rows = f["ceiling_gib"], f["federations"]
    plain, private = f["client"]["plain"], f["client"]["DP-SGD"]
    fits = [r for r in rows if r["total"] <= ceiling]
    largest = max(fits, key=lambda r: r["clients"]) if fits else None
    # Extrapolated (stated as such): the tree's RSS against clients registered through the two largest runs; a
    # difference within 5 % is sampling noise, not growth.
    growth = rows[-1]["total"] - rows[-2]["total"] if len(rows) > 1 else 0.0
    if growth > 0.05 * rows[-1]["total"]:
        slope = growth / (rows[-1]["clients"] - rows[-2]["clients"])
        extrapolated = (f"about {rows[-1]['clients'] + (ceiling - rows[-1]['total']) / slope:,.0f} clients registered "
                        f"(a straight line through the two largest runs: {1024 * slope:.2f} MiB per registered client)")
    else:
        extrapolated = (f"no limit from memory in sight: the peak grew by {1024 * growth:.0f} MiB (under 5 %) from "
                        f"{rows[-2]['clients'] if len(rows) > 1 else '-'} to {rows[-1]['clients']} clients registered")
    chunks = f["batch_size"] / f["physical_batch"]
    dp_note = (f"DP-SGD peaked lower than plain training ({private:.2f} against {plain:.2f} GiB): it runs a "
               f"{f['batch_size']}-sequence batch in physical chunks of `privacy.max_physical_batch_size` = "
               f"{f['physical_batch']}, 1/{chunks:g} of the activations at a time, and activations dominate (the "
               f"per-sample gradients of a {f['adapter_parameters'] / 1e3:.0f}k-parameter adapter are small)."
               if private < plain else
               f"DP-SGD peaked {private / plain:.2f}x plain training's: the per-sample gradients and Opacus' hooks "
               f"outweigh what its physical chunks of {f['physical_batch']} spare in activations.")
    nice = f.get("worker_nice")
    wall = ("Wall seconds follow the machine's load"
            + (f": Ray ran its workers at nice {listing([str(n) for n in sorted(set(nice))])}" if nice else "")
            + ", so other busy processes slow the simulated clients (see the load average above).")
    return [
        "One client process: a fresh interpreter that loads the embedded base, adds the adapter "
        f"(r={f['lora_r']}), trains one round at the default settings ({f['local_steps']} steps, batch "
        f"{f['batch_size']}; DP-SGD with its calibrated noise, physical chunks of {f['physical_batch']}) and "
        "evaluates; its peak resident set (VmHWM).", "",
        *table(["client process", "peak RSS GiB"], "lr", [[k, f"{v:.2f}"] for k, v in f["client"].items()]), "",
        dp_note, "",
        f"Federations: one round of the real simulation (SecAgg+ on, DP off: a tiny round, `{' '.join(f['tiny'])}`), "
        "every registered client evaluated, clients holding IID shares of source-code documents. Peak = the largest "
        f"sum, sampled every {f['sample_seconds']:g} s, of the RSS of the driver and all its descendants (Ray's GCS, "
        f"raylet, object store, {f['workers']} workers); shared pages count once per process, so it is an upper "
        "bound.", "",
        *table(["clients registered", "clients per round", "trained", "peak tree RSS GiB", "largest worker RSS GiB",
                "wall s"], "rrrrrr",
               [[f"{r['clients']:,}", r["per_round"], r["ok"], f"{r['total']:.2f}", f"{r['worker']:.2f}",
                 f"{r['seconds']:.0f}"] for r in rows]), "",
        f"Largest federation measured under the {ceiling:g} GiB ceiling: "
        + (f"**{largest['clients']:,} clients registered, {largest['per_round']} per round** "
           f"({largest['total']:.2f} GiB)." if largest else "none of those measured.")
        + f" Beyond the runs, extrapolated: {extrapolated}. Memory is set by the parallel workers (one per "
        "`federation.cpus_per_client` cores, each holding its own base model, adapter and activations), not by the "
        "number of virtual clients; what grows with clients registered and per round is the time (every client is "
        f"evaluated every round, SecAgg+ shares grow with the cohort). {wall}",
    ]


def precision(get: Get) -> list[str]:
    f = get("precision")["figures"]
    peak = f["peak"]
    rows = [[r["model"], r["batch"], "DP-SGD" if r["dp"] else "plain", r["threads"], f"{r['fp32']:,.0f}",
             f"{r['bf16']:,.0f}", f"{r['ratio']:.2f}"] for r in f["rows"]]
    ratios = [r["ratio"] for r in f["rows"]]
    faster = sum(x < 1 for x in ratios)
    verdict = (f"bf16 is faster in every row ({min(ratios):.2f}-{max(ratios):.2f}x the fp32 time)." if faster == len(ratios)
               else f"bf16 is faster in {faster} of {len(ratios)} rows.")
    return [
        f"Matmul peak on this CPU at {f['threads'][0]} thread(s) (best of {f['matmul_repeats']} alternating "
        f"{f['matmul_size']}x{f['matmul_size']} `torch.matmul`): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 "
        f"{peak['bf16']:.0f} GFLOP/s ({peak['bf16'] / peak['fp32']:.1f}x). A step is one AdamW update of the LoRA "
        "adapter; bf16 = `torch.autocast('cpu', dtype=torch.bfloat16)` around the forward pass (the backward follows "
        "it); the adapter, the optimizer, the loss and DP's per-sample clipping stay float32 "
        "(tests/fedlm/test_privacy.py: the clipping bound holds to float32 rounding under bf16).", "",
        *table(["model", "sequences per step", "training", "torch threads", "fp32 ms/step", "bf16 ms/step",
                "bf16 / fp32"], "lrlrrrr", rows), "",
        f"fp32 and bf16 calls alternate ({f['pairs']} pairs for the embedded base, {f['steps']} steps per call; "
        f"{f['big_pairs']} pairs of {f['big_steps']} step for the 135M-shaped model), after a warm-up call of each; "
        f"the ratio is the median of the pairs' ratios. Below 1.00, bf16 is faster: {verdict}",
    ]


# ---- the document ------------------------------------------------------------------------------------------------

Title = "str | Callable[[dict], str]"

# ---- sections 4.1 and 7.4: distributed_dp.py ----------------------------------------------------------------------

def distributed_round(get: Get) -> list[str]:
    f = get("distributed_round")["figures"]
    compute = f["default"] - f["empty"]
    return [f"A round of `privacy=distributed_dp_sgd` is one DP-SGD step: {f['clients_per_round']} clients each sum "
            f"their clipped gradients over a Poisson batch (rate {f['sample_rate']:g}), then the SecAgg+ stages run. "
            f"Median of rounds without evaluation, over {f['rounds']} rounds:", "",
            *table(["sampling rate", "seconds per round"], "lr",
                   [[f"{f['sample_rate']:g} (the default)", f"{f['default']:.1f}"],
                    ["1e-6 (every batch empty: no client compute)", f"{f['empty']:.1f}"]]), "",
            f"The round loop, Ray's message passing and SecAgg+'s four stages cost {f['empty']:.1f} s a round, "
            f"{pct(f['empty'] / f['default'])} of a default round; the clients' gradients cost the other "
            f"{compute:.1f} s."]


def distributed_sweep(get: Get) -> list[str]:
    f = get("distributed_sweep")["figures"]
    lines = ["Each row is a real federation of the default shape (Simulation Engine; SecAgg+ on for the distributed "
             "rows), epsilon 8 for every DP row, one run each (the noise is fresh every time, so small differences "
             "are not significant). Cells: mean / worst client (geometric mean) held-out perplexity at the last round; "
             "gain kept is (base - row) / (base - no DP) by the geometric mean.", ""]
    for d in f["datasets"]:
        runs = {r["label"]: r for r in d["runs"]}
        ref = runs.get("no DP")
        lines += [f"### {d['name']}", ""]
        rows = []
        for r in d["runs"]:
            first, last = r["by_round"][0], r["by_round"][-1]
            kept = ((first["geomean"] - last["geomean"]) / (ref["by_round"][0]["geomean"] - ref["by_round"][-1]["geomean"])
                    if ref else None)
            path = " ".join(r["overrides"])
            rows.append([r["label"], f"`{path}`", r["rounds"], f"{last['mean']:.1f} / {last['worst']:.1f} "
                         f"({last['geomean']:.1f})", pct(kept) if kept is not None else "-",
                         "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}", f"{r['seconds_per_round']:.1f}"])
        lines += table(["setting", "overrides", "rounds", "last round", "gain kept", "ε spent", "s / round"],
                       "llrrrrr", rows)
        distributed = [r for r in d["runs"] if "privacy=distributed_dp_sgd" in r["overrides"]]
        if distributed:
            best = min(distributed, key=lambda r: r["by_round"][-1]["geomean"])
            curve = ", ".join(f"{p['geomean']:.1f}" for p in best["by_round"])
            lines += ["", f"Best distributed setting by the geometric mean: {best['label']}; its geometric mean at "
                          f"every evaluated round: {curve}."]
        lines.append("")
    return lines[:-1]


SECTIONS: list[tuple[str, str, Title, Callable[[Get], list[str]]]] = [
    # (number, results/NAME.json, title (or a function of the figures), body): rendered when the file exists.
    ("1", "throughput", "Client training throughput (default model, LoRA and training settings)", throughput),
    ("2", "federation", lambda f: f"Federation overhead (default run{', --quick: federation.rounds=3' if f['quick'] else ''})",
     federation),
    ("3", "dp", "DP-SGD step cost (DP step time / plain step time)", dp_cost),
    ("4", "secagg", "SecAgg+ cost (SecAgg+ round / plain round)", secagg_cost),
    ("4.1", "distributed_round", "Federation-wide DP-SGD: where a round's time goes", distributed_round),
    ("5", "strategies", lambda f: f"Strategies on the default federation ({f['rounds']} rounds)", strategies),
    ("6", "deployment", "Deployment on loopback vs simulation", deployment),
    ("7", "quality", "Learning quality: does federating beat training alone, and what does privacy cost?", quality),
    ("7.1", "levers", "Learning quality: what else might keep the gain under DP-SGD?", levers),
    ("7.2", "dp_sweep", "The DP path's training defaults: optimiser x learning rate x expected batch", dp_sweep),
    ("7.3", "quality-set", lambda f: f"Learning quality (other training settings: {f['set']}): does federating beat "
     "training alone, and what does privacy cost?", lambda get: quality(get, "quality-set")),
    ("7.4", "distributed_sweep", "Federation-wide DP-SGD (`privacy=distributed_dp_sgd`): its defaults, measured",
     distributed_sweep),
    ("8", "memory", lambda f: f"Memory: one client process, and the largest federation under {f['ceiling_gib']:g} GiB",
     memory),
    ("9", "bytes", "Bytes down and up per client per round, by strategy", bytes_by_strategy),
    ("10", "precision", "bf16 compute (`train.precision=bf16`) vs float32", precision),
]


def header_of(text: str) -> str:
    """The hand-written intro of an existing BENCHMARKS.md: everything before its first section."""
    return text.split("\n## ", 1)[0].rstrip("\n") + "\n"


def render(results: Path = RESULTS, header: str = HEADER) -> str:
    """BENCHMARKS.md: `header`, then every section whose results/NAME.json exists, in order."""
    cache: dict[str, dict | None] = {}

    def get(name: str) -> dict | None:
        if name not in cache:
            cache[name] = read_result(name, results)
        return cache[name]

    parts = [header.rstrip("\n")]
    for number, name, heading, body in SECTIONS:
        if get(name) is None:
            continue
        heading = heading(get(name)["figures"]) if callable(heading) else heading
        parts.append("\n".join([f"## {number}. {heading}", "", *provenance(get(name)["provenance"]), "",
                                *body(get)]))
    return "\n\n".join(parts) + "\n"


def write(output: Path, results: Path = RESULTS) -> None:
    """Render `results` into `output`, keeping `output`'s header if it has one."""
    header = header_of(output.read_text()) if output.exists() else HEADER
    output.write_text(render(results, header))
    print(f"[bench] rendered {output}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of <section>.json files")
    args = parser.parse_args()
    write(args.output, args.results)


if __name__ == "__main__":
    main()
