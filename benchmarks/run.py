"""`python benchmarks/run.py [--quick] [--only SECTION,...]` (`make bench`): every benchmark section into BENCHMARKS.md."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import privacy_cost  # benchmarks/ is sys.path[0] when run as a script
from common import ROOT, TIMED_BATCH, command_line, log, provenance, write_sections
from fedlm.data import ClientData, client_data_path, prepare_federation
from fedlm.model import apply_lora, load_base_model
from fedlm.settings import RunSettings, TrainSettings
from fedlm.training import evaluate, train_local
from simulations.launch import make_offline_safe, simulate
from simulations.run import compose_settings

REPEATS = 3  # timed train_local / evaluate calls per thread count; the median is reported


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """Best single fp32 matmul rate in GFLOP/s: the ceiling this CPU reaches with torch at `threads`."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):  # warm-up: thread pool start, page faults on the output buffer
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def train_rate(model, data: ClientData, settings: RunSettings, threads: int) -> tuple[float, float, int]:
    """Median tokens/s and seconds of one client's local training (train_local), and its tokens."""
    torch.set_num_threads(threads)
    # Warm-up at this thread count: the first steps pay for allocator growth and the OpenMP pool resize.
    train_local(model, data.train, data.train_mask, dataclasses.replace(settings.train, local_steps=5), seed=999)
    runs = [train_local(model, data.train, data.train_mask, settings.train, seed=i) for i in range(REPEATS)]
    return (statistics.median(r.tokens / r.seconds for r in runs), statistics.median(r.seconds for r in runs),
            runs[0].tokens)


def eval_rate(model, data: ClientData, settings: RunSettings, threads: int) -> float:
    """Median tokens/s of held-out evaluation (forward only) on the sequences a client evaluates."""
    torch.set_num_threads(threads)
    limit = settings.train.max_eval_sequences
    ids, mask = data.eval[:limit], data.eval_mask[:limit]
    evaluate(model, ids, mask)  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        evaluate(model, ids, mask)
        times.append(time.perf_counter() - start)
    return int(mask.sum()) / statistics.median(times)


def throughput(work: Path) -> tuple[list[str], dict]:
    settings = RunSettings(output_dir=str(work), train=TrainSettings(batch_size=TIMED_BATCH))
    log("loading the embedded base model and preparing the default federation's client data")
    base, tokenizer = load_base_model(settings.model)
    n_base = sum(p.numel() for p in base.parameters())  # parameters() counts the tied lm_head once
    start = time.perf_counter()
    prepare_federation(settings, tokenizer, work / "data")
    prep_seconds = time.perf_counter() - start
    model = apply_lora(base, settings.lora, settings.seed)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = ClientData.load(client_data_path(work / "data", 0))
    rows = []
    for threads in (1, 2):
        log(f"timing at {threads} torch thread(s): matmul peak, train_local x{REPEATS}, evaluate x{REPEATS}")
        peak = matmul_peak(threads)
        train_tps, train_s, tokens = train_rate(model, data, settings, threads)
        eval_tps = eval_rate(model, data, settings, threads)
        # LoRA: forward 2N + backward through activations 2N per token; frozen weights get no weight gradient.
        train_pct, eval_pct = 100 * 4 * n_base * train_tps / (peak * 1e9), 100 * 2 * n_base * eval_tps / (peak * 1e9)
        rows.append(f"| {threads} | {train_tps:,.0f} | {train_s:.2f} | {eval_tps:,.0f} | {peak:.1f} "
                    f"| {train_pct:.1f} % | {eval_pct:.1f} % |")
        log(f"{threads} thread(s): train {train_tps:,.0f} tokens/s ({train_s:.2f} s per call), eval "
            f"{eval_tps:,.0f} tokens/s, matmul peak {peak:.1f} GFLOP/s, train {train_pct:.1f} % of peak")
    t = settings.train
    lines = [
        "## 1. Client training throughput (default model, LoRA and training settings)", "",
        f"Embedded Llama base, N = {n_base:,} parameters; LoRA r={settings.lora.r} on every linear projection: "
        f"{n_lora:,} trainable ({100 * n_lora / n_base:.1f} % of N). One `train_local` call = {t.local_steps} "
        f"steps x {t.batch_size} sequences x {settings.dataset.seq_len} tokens ({tokens:,} real tokens) on "
        f"client 0's data; evaluation = its first {t.max_eval_sequences} held-out sequences (at most).", "",
        "| torch threads | train tokens/s | s per `train_local` | eval tokens/s | fp32 matmul peak GFLOP/s "
        "| train % of peak | eval % of peak |",
        "|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Median of {REPEATS} timed calls after a warm-up call at each thread count; the peak is the best of 10 "
        "2048x2048 fp32 `torch.matmul` calls at the same thread count. Training FLOPs are taken as 4·N per "
        "token, not the usual 6·N: with LoRA the frozen weights need the forward pass (2·N) and the backward "
        "pass through activations (2·N) but no weight gradients (the adapter's own cost is negligible). "
        "Evaluation is 2·N per token. Attention scores (up to ~8 % more at 128 tokens) are left out, so the "
        "percentages slightly understate the work done. The gap to peak: this model's matrices are narrow "
        "(d=192), and softmax, norms, the loss, the optimizer and Python dispatch are not matmuls. This is "
        "plain `train_local`; under DP-SGD clients run `train_local_dp`, whose extra cost is section 3.", "",
    ]
    return lines, {"prep_seconds": prep_seconds, "n_lora": n_lora}


def federation(work: Path, quick: bool, facts: dict) -> list[str]:
    overrides = ["federation.rounds=3"] if quick else []
    settings = compose_settings(overrides, output_dir=str(work))  # same directory: reuses the prepared data
    fed, t = settings.federation, settings.train
    log(f"running the default federation ({fed.num_clients} clients, {fed.clients_per_round} per round, "
        f"{fed.rounds} rounds, {t.local_steps} local steps){' [--quick]' if quick else ''}")
    torch.set_num_threads(fed.cpus_per_client)
    start = time.perf_counter()
    outcome = simulate(settings)
    wall = time.perf_counter() - start
    first, rounds = outcome.rows[0], outcome.rows[1:]
    rounds_s = sum(r["seconds"] for r in rounds)
    client_s = sum(r["client_train_seconds"] for r in rounds)
    # Clients that can train at once: Ray gives each cpus_per_client of the machine's cores.
    slots = max(1, min((os.cpu_count() or 1) // fed.cpus_per_client, fed.clients_per_round))
    fed_tokens = sum(r["train_tokens"] for r in rounds)  # what the clients reported training on
    down = statistics.mean(r["bytes_down"] for r in rounds)
    up = statistics.mean(r["bytes_up"] for r in rounds)
    per_adapter = statistics.mean(r["bytes_up"] / r["clients_ok"] for r in rounds)
    log(f"federation: wall {wall:.1f} s, rounds {rounds_s:.1f} s, client training {client_s:.1f} s, "
        f"wall/client {wall / client_s:.2f}, perplexity {outcome.initial_perplexity:.1f} -> "
        f"{outcome.final_perplexity:.1f}")
    return [
        f"## 2. Federation overhead (default run{', --quick: federation.rounds=3' if quick else ''})", "",
        f"{fed.num_clients} clients, {fed.clients_per_round} per round, {fed.rounds} rounds, {t.local_steps} local "
        f"steps, privacy={settings.privacy.name}, secagg={settings.secagg.name}, cpus_per_client="
        f"{fed.cpus_per_client} on {os.cpu_count()} cores: {slots} clients train at once.", "",
        "| measure | value |", "|---|---:|",
        f"| data preparation (once, before the run; reused by it) | {facts['prep_seconds']:.1f} s |",
        f"| end-to-end wall time of `simulate` (Ray start, model loads, all rounds, shutdown) | {wall:.1f} s |",
        f"| round 0 (base evaluation on all clients, worker start-up) | {first['seconds']:.1f} s |",
        f"| sum of round seconds, rounds 1-{fed.rounds} | {rounds_s:.1f} s |",
        f"| summed client training seconds (`client_train_seconds`) | {client_s:.1f} s |",
        f"| overhead end-to-end = wall / summed client training | {wall / client_s:.2f} |",
        f"| overhead rounds-only = round seconds / summed client training | {rounds_s / client_s:.2f} |",
        f"| per slot, end-to-end = wall x {slots} / summed client training | {wall * slots / client_s:.2f} |",
        f"| per slot, rounds-only = round seconds x {slots} / summed client training | "
        f"{rounds_s * slots / client_s:.2f} |",
        f"| client training tokens/s inside the federation (each client, ≈) | {fed_tokens / client_s:,.0f} |",
        f"| held-out perplexity, round 0 (base) -> round {rounds[-1]['round']} | "
        f"{outcome.initial_perplexity:.1f} -> {outcome.final_perplexity:.1f} |",
        f"| MB down / MB up per round (mean of rounds 1-{fed.rounds}) | {down / 1e6:.2f} / {up / 1e6:.2f} |",
        f"| bytes up per training client per round (the adapter alone: {facts['n_lora']:,} fp32 values = "
        f"{4 * facts['n_lora']:,} B) | {per_adapter:,.0f} |", "",
        "Summed client training time adds up every client's own local-training seconds. Because "
        f"{slots} clients train concurrently, the wall time can be *below* that sum (a ratio under 1 is "
        f"parallel speed-up, not negative overhead). The per-slot ratios multiply by the {slots} slots: 1.00 "
        "would mean the cores did nothing but client training; the excess is Ray and worker start-up, model "
        "loading, evaluating every client each round, aggregation, serialisation, and idle slots while a "
        "round's last client finishes. Clients running side by side also slow each other (shared caches and "
        "memory bandwidth): compare the in-federation tokens/s above with the 1-thread figure in section 1 "
        "(under DP-SGD, scaled by section 3's step cost). "
        f"Bytes are payload bytes: down, the adapter to the {fed.clients_per_round} training clients and to "
        "every evaluating client; up, the training clients' updates (evaluation replies carry only metrics). "
        "Secure aggregation adds its key, share and unmasking messages and uploads masked int64 values.",
        "",
    ]


SCRIPTS = {  # sections other scripts own: each runs as its own process and replaces only its section
    "strategies": (["compare_strategies.py"], ["--rounds", "2"]),
    "quality": (["quality.py"], ["--quick"]),
    "levers": (["quality.py", "--levers"], ["--quick"]),
    "memory": (["memory.py"], ["--quick"]),
    "bytes": (["compare_strategies.py", "--bytes"], []),
    "precision": (["precision.py"], ["--quick"]),
    "deployment": (["deployment.py"], ["--rounds", "2"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter versions of every section (say so in each)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="the Markdown file to write")
    parser.add_argument("--only", default="all", help="comma-separated sections to re-run, replacing only them: "
                        f"throughput, federation, dp, secagg, {', '.join(SCRIPTS)} (federation also runs "
                        "throughput, whose data and figures it uses)")
    args = parser.parse_args()
    make_offline_safe()  # before any tokenizer or Ray use: no downloads, no telemetry, no tokenizer threads
    chosen = set(args.only.split(",")) if args.only != "all" else {"throughput", "federation", "dp", "secagg",
                                                                   *SCRIPTS}
    unknown = chosen - {"throughput", "federation", "dp", "secagg", *SCRIPTS}
    if unknown:
        parser.error(f"--only {','.join(sorted(unknown))}: unknown; choose from throughput, federation, dp, secagg, "
                     f"{', '.join(SCRIPTS)}")
    load, command = os.getloadavg()[0], command_line()
    if load > 0.5:
        log(f"warning: 1-minute load average is {load:.2f}; other processes will skew the timings")
    if args.only == "all" or not args.output.exists():  # a fresh head; measured sections stay until replaced
        old = args.output.read_text() if args.output.exists() else ""
        kept = "\n## " + old.split("\n## ", 1)[1] if "\n## " in old else ""
        args.output.write_text("\n".join([
            "# Pollinate benchmarks", "",
            "Every section opens with the command that produced it, its date, the versions and the machine. "
            f"`make bench` (`{command}`) runs them all; `python benchmarks/run.py --only SECTION[,SECTION]` re-runs "
            "some and keeps the rest. Ratios are measured side by side in one run; nothing here is a timed test.",
            ""]) + kept)
    sections = []
    with tempfile.TemporaryDirectory(prefix="pollinate-bench-") as tmp:
        if chosen & {"throughput", "federation"}:
            section1, facts = throughput(Path(tmp))
            sections.append(section1)
        if "federation" in chosen:
            sections.append(federation(Path(tmp), args.quick, facts))
        if "dp" in chosen:
            sections.append(privacy_cost.dp_cost(Path(tmp)))
        if "secagg" in chosen:
            sections.append(privacy_cost.secagg_cost(Path(tmp)))
    stamp = provenance(command, load)
    if sections:  # each section's provenance goes right under its title
        write_sections(args.output, ["\n".join(s[:2] + [stamp, ""] + s[2:]) for s in sections])
    for name in (n for n in SCRIPTS if n in chosen):
        script, quick = SCRIPTS[name]
        cmd = [sys.executable, str(ROOT / "benchmarks" / script[0]), *script[1:], "--output", str(args.output),
               *(quick if args.quick else [])]
        log(f"running {' '.join(cmd[1:])}")
        subprocess.run(cmd, check=True, cwd=ROOT)
    print("\n" + args.output.read_text(), flush=True)


if __name__ == "__main__":
    main()
