"""`python benchmarks/precision.py [--quick]`: training step time in float32 vs bf16 autocast (`train.precision`),
with and without DP-SGD, on the embedded base and a SmolLM2-135M-shaped model, measured side by side."""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

from common import ROOT, TIMED_BATCH, Provenance, log, publish
from fedlm.data.preparation import ClientData, client_data_path
from fedlm.model import apply_lora, load_base_model
from fedlm.plan import plan_privacy
from fedlm.privacy import train_local_dp
from fedlm.settings import RunSettings
from fedlm.training import train_local
from privacy_cost import smollm2_135m_shaped
from simulations.launch import make_offline_safe, prepare
from simulations.run import compose_settings

WORK = ROOT / "outputs" / "bench-precision"
MATMUL_SIZE, MATMUL_REPEATS = 2048, 5
STEPS, BIG_STEPS, BIG_PAIRS = 3, 1, 3  # steps per timed call and pairs: the 135M-shaped model's step takes seconds


def matmul_rates(size: int = MATMUL_SIZE, repeats: int = MATMUL_REPEATS) -> dict[str, float]:
    """Best square matmul rate in GFLOP/s in fp32 and bf16, calls alternating so both see the same load."""
    pairs = {name: [torch.randn(size, size, dtype=dtype) for _ in range(2)]
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = {name: math.inf for name in pairs}
    for _ in range(repeats + 1):  # the first round warms up
        for name, (a, b) in pairs.items():
            best[name] = min(best[name], _timed(lambda: torch.matmul(a, b)))
    return {name: 2 * size**3 / seconds / 1e9 for name, seconds in best.items()}


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def step_ms(model, ids, mask, settings: RunSettings, steps: int, noise: float | None, precision: str) -> float:
    """Milliseconds per step of `steps` training steps (DP-SGD at `noise` unless None), normalised to exactly the
    expected batch."""
    train = dataclasses.replace(settings.train, local_steps=steps, precision=precision)
    if noise is not None:
        r = train_local_dp(model, ids, mask, train, settings.privacy, noise_multiplier=noise,
                           sample_rate=train.batch_size / len(ids), seed=0)
    else:
        r = train_local(model, ids, mask, train, seed=0)
    return 1000 * r.seconds / max(r.sequences, 1) * train.batch_size


def compare(model, ids, mask, settings: RunSettings, steps: int, pairs: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows, n = [], len(ids)
    # The noise a client of the default federation calibrates (it does not change the step's cost).
    noise = plan_privacy(settings, n).noise_multiplier
    for private in (False, True):
        for precision in ("fp32", "bf16"):  # warm-up of each
            step_ms(model, ids, mask, settings, 1, noise if private else None, precision)
        fp32, bf16 = [], []
        for i in range(pairs):  # alternate which goes first, so drift in the machine's load hits both alike
            order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
            got = {p: step_ms(model, ids, mask, settings, steps, noise if private else None, p) for p in order}
            fp32.append(got["fp32"])
            bf16.append(got["bf16"])
        ratio = statistics.median(b / f for b, f in zip(bf16, fp32))
        rows.append({"dp": private, "threads": threads, "fp32": statistics.median(fp32),
                     "bf16": statistics.median(bf16), "ratio": ratio})
        log(f"  {'DP' if private else 'plain'}, {threads} thread(s): fp32 {rows[-1]['fp32']:.0f} ms/step, bf16 "
            f"{rows[-1]['bf16']:.0f} ms/step, bf16/fp32 {ratio:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer pairs, and no 135M-shaped model")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure (1: a simulated client's)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    make_offline_safe()
    stamp = Provenance()
    pairs = 2 if args.quick else 4
    settings = compose_settings([f"train.batch_size={TIMED_BATCH}"], str(WORK))
    prepare(settings)
    torch.set_num_threads(args.threads[0])
    peaks = matmul_rates()
    log(f"matmul peak at {args.threads[0]} thread(s): fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s")
    base, _ = load_base_model(settings.model, settings.cache_dir)
    data = ClientData.load(client_data_path(WORK / "data", 0))
    n_base = sum(p.numel() for p in base.parameters())  # before apply_lora adds the adapter to `base`
    model = apply_lora(base, settings.lora, settings.seed)
    log(f"embedded base, client 0's rows, batch {settings.train.batch_size}")
    table = [(f"embedded, {n_base / 1e6:.1f}M", settings.train.batch_size, r)
             for threads in args.threads for r in compare(model, data.train, data.train_mask, settings, STEPS, pairs,
                                                          threads)]
    if not args.quick:
        log("SmolLM2-135M-shaped, random weights and tokens, batch 8")
        big = apply_lora(smollm2_135m_shaped(), settings.lora, settings.seed)
        ids = torch.randint(0, big.config.vocab_size, (64, settings.dataset.seq_len),
                            generator=torch.Generator().manual_seed(0))
        small = dataclasses.replace(settings, train=dataclasses.replace(settings.train, batch_size=8))
        table += [("SmolLM2-135M-shaped", 8, r) for threads in args.threads
                  for r in compare(big, ids, torch.ones_like(ids), small, BIG_STEPS, BIG_PAIRS, threads)]
    publish("precision", stamp, {
        "threads": args.threads, "matmul_repeats": MATMUL_REPEATS, "matmul_size": MATMUL_SIZE, "peak": peaks,
        "pairs": pairs, "steps": STEPS, "big_pairs": BIG_PAIRS, "big_steps": BIG_STEPS,
        "rows": [{"model": name, "batch": batch, **r} for name, batch, r in table]}, args.output)


if __name__ == "__main__":
    main()
