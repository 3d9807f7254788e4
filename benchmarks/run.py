"""`python benchmarks/run.py [--quick] [--only SECTION,...]` (`make bench`): every benchmark section, each into
benchmarks/results/<section>.json, then BENCHMARKS.md rendered from them (benchmarks/render.py; its header kept)."""

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
from common import ROOT, TIMED_BATCH, Provenance, log, publish
from fedlm.data.preparation import ClientData, client_data_path, prepare_federation
from fedlm.model import apply_lora, load_base_model
from fedlm.settings import RunSettings, TrainSettings
from fedlm.training import evaluate, train_local
from simulations.launch import make_offline_safe, simulate
from simulations.run import compose_settings

REPEATS = 3  # timed train_local / evaluate calls per thread count; the median is reported
MATMUL_SIZE, MATMUL_REPEATS = 2048, 10  # square fp32 matmuls; the best one is the peak


def matmul_peak(threads: int, size: int, repeats: int) -> float:
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


def throughput(work: Path) -> dict:
    """Section 1's figures: one client's training and evaluation rate at 1 and 2 threads, against the matmul peak."""
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
        peak = matmul_peak(threads, MATMUL_SIZE, MATMUL_REPEATS)
        train_tps, train_s, tokens = train_rate(model, data, settings, threads)
        eval_tps = eval_rate(model, data, settings, threads)
        rows.append({"threads": threads, "train_tokens_per_s": train_tps, "train_seconds": train_s,
                     "eval_tokens_per_s": eval_tps, "peak_gflops": peak})
        log(f"{threads} thread(s): train {train_tps:,.0f} tokens/s ({train_s:.2f} s per call), eval "
            f"{eval_tps:,.0f} tokens/s, matmul peak {peak:.1f} GFLOP/s")
    t = settings.train
    return {"n_base": n_base, "lora_r": settings.lora.r, "n_lora": n_lora, "local_steps": t.local_steps,
            "batch_size": t.batch_size, "seq_len": settings.dataset.seq_len, "tokens": tokens,
            "max_eval_sequences": t.max_eval_sequences, "repeats": REPEATS, "matmul_repeats": MATMUL_REPEATS,
            "matmul_size": MATMUL_SIZE, "hidden_size": base.config.hidden_size, "prep_seconds": prep_seconds,
            "rows": rows}


def federation(work: Path, quick: bool, facts: dict) -> dict:
    """Section 2's figures: the default federation's wall time against its clients' own training time."""
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
    log(f"federation: wall {wall:.1f} s, rounds {rounds_s:.1f} s, client training {client_s:.1f} s, "
        f"wall/client {wall / client_s:.2f}, perplexity {outcome.initial_perplexity:.1f} -> "
        f"{outcome.final_perplexity:.1f}")
    return {
        "quick": quick, "num_clients": fed.num_clients, "clients_per_round": fed.clients_per_round,
        "rounds": fed.rounds, "local_steps": t.local_steps, "privacy": settings.privacy.name,
        "secagg": settings.secagg.name, "cpus_per_client": fed.cpus_per_client, "cores": os.cpu_count(),
        "slots": slots, "prep_seconds": facts["prep_seconds"], "wall_seconds": wall,
        "round0_seconds": first["seconds"], "rounds_seconds": rounds_s, "client_train_seconds": client_s,
        "overhead": {"end_to_end": wall / client_s, "rounds_only": rounds_s / client_s,
                     "per_slot_end_to_end": wall * slots / client_s,
                     "per_slot_rounds_only": rounds_s * slots / client_s},
        "tokens_per_s": fed_tokens / client_s, "ppl_initial": outcome.initial_perplexity,
        "ppl_final": outcome.final_perplexity, "last_round": rounds[-1]["round"],
        "mb_down": statistics.mean(r["bytes_down"] for r in rounds) / 1e6,
        "mb_up": statistics.mean(r["bytes_up"] for r in rounds) / 1e6, "n_lora": facts["n_lora"],
        "bytes_up_per_client": statistics.mean(r["bytes_up"] / r["clients_ok"] for r in rounds),
    }


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
    stamp = Provenance()  # sections 1-4 share it: one command, one process
    measured = {}
    with tempfile.TemporaryDirectory(prefix="pollinate-bench-") as tmp:
        if chosen & {"throughput", "federation"}:
            measured["throughput"] = throughput(Path(tmp))
        if "federation" in chosen:
            measured["federation"] = federation(Path(tmp), args.quick, measured["throughput"])
        if "dp" in chosen:
            measured["dp"] = privacy_cost.dp_cost(Path(tmp))
        if "secagg" in chosen:
            measured["secagg"] = privacy_cost.secagg_cost(Path(tmp))
    record = stamp.record()
    for name, figures in measured.items():
        publish(name, record, figures, args.output)
    for name in (n for n in SCRIPTS if n in chosen):
        script, quick = SCRIPTS[name]
        cmd = [sys.executable, str(ROOT / "benchmarks" / script[0]), *script[1:], "--output", str(args.output),
               *(quick if args.quick else [])]
        log(f"running {' '.join(cmd[1:])}")
        subprocess.run(cmd, check=True, cwd=ROOT)
    print("\n" + args.output.read_text(), flush=True)  # BENCHMARKS.md, re-rendered by the last section


if __name__ == "__main__":
    main()
