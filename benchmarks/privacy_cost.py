"""What the guarantees cost: DP-SGD step time vs. plain AdamW, SecAgg+ round time and bytes vs. plain FedAvg."""

from __future__ import annotations

import dataclasses
import gc
import resource
import statistics
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedlm.data.preparation import ClientData, client_data_path, prepare_federation
from fedlm.model import apply_lora, load_base_model
from fedlm.plan import plan_privacy
from fedlm.privacy import train_local_dp
from common import TIMED_BATCH, log
from fedlm.settings import RunSettings, TrainSettings
from fedlm.training import train_local
from simulations.launch import simulate
from simulations.run import compose_settings

PAIRS = 5  # timed (DP, plain) pairs per model and thread count; the median ratio is reported
SECAGG_COHORTS = (10, 20, 50)
SECAGG_ROUNDS = 3  # a round lasts seconds: the median of 3 damps one-off stalls (the target: render.py)
SECAGG_WORK = ["train.local_steps=1", "train.batch_size=4", "train.max_eval_sequences=4"]  # isolates the protocol
BIG_BATCH, BIG_PAIRS = 8, 3  # the 135M-shaped model: a step takes seconds on a CPU


def peak_rss_gb(call) -> float:
    """This process's peak resident memory (GiB) while `call()` runs: the high-water mark is reset first."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: resets VmHWM, which ru_maxrss reads
    except OSError:
        pass  # elsewhere: the high-water mark since the process started
    call()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def smollm2_135m_shaped() -> LlamaForCausalLM:
    """SmolLM2-135M's architecture with random weights: timing needs the shapes, not the pretraining."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, max_position_embeddings=2048, tie_word_embeddings=True))


def time_pairs(model, ids, mask, settings: RunSettings, steps: int, pairs: int) -> dict:
    """Alternating DP / plain `steps`-step calls at 1 and 2 threads: ms per nominal batch and the DP/plain ratio."""
    train, privacy = dataclasses.replace(settings.train, local_steps=steps), settings.privacy
    plan = plan_privacy(settings, len(ids))  # the rate and noise a client of this federation trains with
    rate, noise = plan.sample_rate, plan.noise_multiplier

    def ms_per_step(dp: bool, seed: int) -> float:
        r = (train_local_dp(model, ids, mask, train, privacy, noise_multiplier=noise, sample_rate=rate, seed=seed)
             if dp else train_local(model, ids, mask, train, seed=seed))
        # A Poisson batch varies around its expected size: normalise to exactly batch_size sequences per step.
        return 1000 * r.seconds / r.sequences * train.batch_size

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        # Warm-up calls (allocator growth, OpenMP pool resize), which also measure peak memory.
        rss_plain = peak_rss_gb(lambda: ms_per_step(False, 999))
        rss_dp = peak_rss_gb(lambda: ms_per_step(True, 999))
        dp_ms, plain_ms = [], []
        for i in range(pairs):
            first_dp = i % 2 == 0  # alternate which goes first, so drift (heat, other load) hits both alike
            a = ms_per_step(first_dp, i)
            b = ms_per_step(not first_dp, i)
            dp_ms.append(a if first_dp else b)
            plain_ms.append(b if first_dp else a)
        ratio = statistics.median(d / p for d, p in zip(dp_ms, plain_ms))
        rows.append({"threads": threads, "dp": statistics.median(dp_ms), "plain": statistics.median(plain_ms),
                     "ratio": ratio, "rss_plain": rss_plain, "rss_dp": rss_dp})
        log(f"  {threads} thread(s): DP {rows[-1]['dp']:.0f} ms/step, plain {rows[-1]['plain']:.0f} ms/step, "
            f"ratio {ratio:.2f}")
    return {"noise": noise, "steps": steps, "pairs": pairs, "batch": settings.train.batch_size, "rows": rows}


def dp_cost(work: Path) -> dict:
    """Section 3's figures: DP-SGD step time against plain, on the embedded base and a 135M-shaped model."""
    settings = RunSettings(output_dir=str(work), train=TrainSettings(batch_size=TIMED_BATCH))
    steps, seq, chunk = 5, settings.dataset.seq_len, settings.privacy.max_physical_batch_size
    log("DP-SGD cost: embedded base on client 0's rows of the default federation")
    base, tokenizer = load_base_model(settings.model)
    prepare_federation(settings, tokenizer, work / "data")  # reuses section 1's data when it ran
    data = ClientData.load(client_data_path(work / "data", 0))
    n_embedded = sum(p.numel() for p in base.parameters())  # before apply_lora adds the adapter to `base`
    model = apply_lora(base, settings.lora, settings.seed)
    embedded = time_pairs(model, data.train, data.train_mask, settings, steps, PAIRS)
    del model, base
    log("DP-SGD cost: SmolLM2-135M-shaped Llama, random weights, batch 8, random token ids")
    big_settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, batch_size=BIG_BATCH))
    base = smollm2_135m_shaped()
    n_big = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, settings.lora, settings.seed)
    ids = torch.randint(0, base.config.vocab_size, (64, seq), generator=torch.Generator().manual_seed(0))
    big = time_pairs(model, ids, torch.ones_like(ids), big_settings, 1, BIG_PAIRS)  # ~6-10 s a step: keep it short
    del model, base
    gc.collect()
    return {"lora_r": settings.lora.r, "seq_len": seq, "physical_batch": chunk,
            "models": [{"name": "embedded", "params": n_embedded, **embedded},
                       {"name": "SmolLM2-135M-shaped", "params": n_big, **big}]}


def secagg_cost(work: Path) -> dict:
    """Section 4's figures: SecAgg+ round time and bytes up per client against plain FedAvg, at each cohort."""
    common = [f"federation.rounds={SECAGG_ROUNDS}", "privacy=disabled", *SECAGG_WORK,
              # Data preparation only: a client's round work (1 step of 4 rows, 4 eval rows) does not grow with it.
              "dataset.max_chars_per_source=100000"]
    rows = []
    for k in SECAGG_COHORTS:
        out = {}
        for mode in ("disabled", "secaggplus"):
            log(f"SecAgg+ cost: {k} clients, all per round, {SECAGG_ROUNDS} rounds, secagg={mode}")
            overrides = [f"federation.num_clients={k}", f"federation.clients_per_round={k}", f"secagg={mode}"]
            # One output folder per cohort: the second run reuses the first's prepared data.
            settings = compose_settings(common + overrides, output_dir=str(work / f"secagg_{k}"))
            rounds = simulate(settings).rows[1:]
            out[mode] = (statistics.median(r["seconds"] for r in rounds),
                         statistics.median(r["bytes_up"] for r in rounds) / k)
        (plain_s, up_plain), (secure_s, up_secure) = out["disabled"], out["secaggplus"]
        rows.append({"clients": k, "plain_seconds": plain_s, "secagg_seconds": secure_s,
                     "time_ratio": secure_s / plain_s, "plain_bytes_up": up_plain, "secagg_bytes_up": up_secure})
        log(f"  {k} clients: {plain_s:.1f} s -> {secure_s:.1f} s ({secure_s / plain_s:.2f}x), bytes up per client "
            f"{up_plain:,.0f} -> {up_secure:,.0f} ({up_secure / up_plain:.2f}x)")
    return {"rounds": SECAGG_ROUNDS, "local_work": SECAGG_WORK, "num_shares": settings.secagg.num_shares,
            "reconstruction_threshold": settings.secagg.reconstruction_threshold, "rows": rows}
