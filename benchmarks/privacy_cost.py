"""What the guarantees cost: DP-SGD step time vs. plain AdamW, SecAgg+ round time and bytes vs. plain FedAvg."""

from __future__ import annotations

import dataclasses
import gc
import resource
import statistics
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedlm.data import ClientData, client_data_path, prepare_federation
from fedlm.model import apply_lora, load_base_model
from fedlm.plan import plan_privacy
from fedlm.privacy import train_local_dp
from common import TIMED_BATCH
from fedlm.settings import RunSettings, TrainSettings
from fedlm.training import train_local
from simulations.launch import simulate
from simulations.run import compose_settings

PAIRS = 5  # timed (DP, plain) pairs per model and thread count; the median ratio is reported
SECAGG_COHORTS = (10, 20, 50)
SECAGG_ROUNDS = 3  # a round lasts seconds: the median of 3 damps one-off stalls
SECAGG_TARGET = 1.3  # the bound on SecAgg+ round time / plain round time at 20 clients


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


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


def time_pairs(model, ids, mask, settings: RunSettings, steps: int, pairs: int) -> list[dict]:
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
                     "ratio": ratio, "rss_plain": rss_plain, "rss_dp": rss_dp, "noise": noise})
        log(f"  {threads} thread(s): DP {rows[-1]['dp']:.0f} ms/step, plain {rows[-1]['plain']:.0f} ms/step, "
            f"ratio {ratio:.2f}")
    return rows


def dp_cost(work: Path) -> list[str]:
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
    big_settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, batch_size=8))
    base = smollm2_135m_shaped()
    n_big = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, settings.lora, settings.seed)
    ids = torch.randint(0, base.config.vocab_size, (64, seq), generator=torch.Generator().manual_seed(0))
    big = time_pairs(model, ids, torch.ones_like(ids), big_settings, 1, 3)  # ~6-10 s a step: keep it short
    del model, base
    gc.collect()
    table = []
    for name, batch, rows in ((f"embedded, {n_embedded / 1e6:.1f}M", settings.train.batch_size, embedded),
                              (f"SmolLM2-135M-shaped, {n_big / 1e6:.0f}M", 8, big)):
        for r in rows:
            table.append(f"| {name} | {batch} | {r['threads']} | {r['plain']:,.0f} | {r['dp']:,.0f} "
                         f"| {r['ratio']:.2f} | {r['rss_plain']:.2f} / {r['rss_dp']:.2f} |")
    return [
        "## 3. DP-SGD step cost (DP step time / plain step time)", "",
        f"One step = one AdamW update of the LoRA adapter (r={settings.lora.r}) on sequences of {seq} tokens. "
        f"Plain: `train_local`, the whole batch at once. DP: `train_local_dp` (Opacus per-sequence clipping, "
        f"noise multiplier {embedded[0]['noise']:.2f} / {big[0]['noise']:.2f} as each client calibrates it for "
        f"the default horizon), a Poisson batch of that expected size processed in physical chunks of {chunk}. "
        f"Embedded base: client 0's real rows of the default federation, {steps} steps per call. 135M-shaped: "
        "random weights and token ids, batch 8 (not 32: a step takes seconds on this CPU), 1 step per call.", "",
        "| model | sequences per step | torch threads | plain ms/step | DP ms/step | DP / plain "
        "| peak RSS GiB, plain / DP |",
        "|---|---:|---:|---:|---:|---:|---:|", *table, "",
        f"DP and plain calls alternate ({PAIRS} pairs for the embedded base, 3 for the 135M-shaped model, after "
        "a warm-up call of each at every thread count); the ratio is the median of the pairs' ratios, the "
        "ms/step the medians of each. Both are normalised to exactly the expected batch (seconds per "
        "sequence x batch), since a DP (Poisson) batch varies around it. What DP adds: per-sample gradient hooks "
        "on every LoRA layer, per-sequence norms and clipping, the noise draw, and smaller physical batches. "
        "Peak RSS: the whole benchmark process's high-water mark during one warm-up call (reset just before "
        "it), so it includes what was already loaded (the model, data, earlier sections' leftovers).", "",
    ]


def secagg_cost(work: Path) -> list[str]:
    common = [f"federation.rounds={SECAGG_ROUNDS}", "privacy=disabled", "train.local_steps=1", "train.batch_size=4",
              "train.max_eval_sequences=4",
              # Data preparation only: a client's round work (1 step of 4 rows, 4 eval rows) does not grow with it.
              "dataset.max_chars_per_source=100000"]
    rows, met = [], None
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
        if k == 20:
            met = secure_s / plain_s <= SECAGG_TARGET
        rows.append(f"| {k} | {plain_s:.1f} | {secure_s:.1f} | {secure_s / plain_s:.2f} | {up_plain:,.0f} "
                    f"| {up_secure:,.0f} | {up_secure / up_plain:.2f} |")
        log(f"  {k} clients: {plain_s:.1f} s -> {secure_s:.1f} s ({secure_s / plain_s:.2f}x), bytes up per client "
            f"{up_plain:,.0f} -> {up_secure:,.0f} ({up_secure / up_plain:.2f}x)")
    verdict = "met" if met else "not met" if met is not None else "not measured"
    return [
        "## 4. SecAgg+ cost (SecAgg+ round / plain round)", "",
        "Embedded base, default data source (one installed package per client), `federation.num_clients` = "
        f"`clients_per_round` = K, {SECAGG_ROUNDS} rounds, `privacy=disabled` in both runs so only aggregation "
        "differs; small local work to isolate the protocol: `train.local_steps=1 train.batch_size=4 "
        "train.max_eval_sequences=4`; `secagg.num_shares=5`, `reconstruction_threshold=3`. One simulation per "
        "cell, plain first.", "",
        "| K clients | plain round s | SecAgg+ round s | time ratio | bytes up per client, plain "
        "| bytes up per client, SecAgg+ | bytes ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Issue target, at most {SECAGG_TARGET}x round time at 20 clients: **{verdict}**. Round seconds are the "
        f"median `seconds` of rounds 1-{SECAGG_ROUNDS} (fit and federated evaluation of all K clients; Ray workers "
        "are warm from round 0); bytes up are `bytes_up` / K (payload bytes, masked vectors included; the same "
        "every round). A round lasts seconds, so any other load on the machine moves the ratio. "
        "SecAgg+ uploads int64 masked integers where plain FedAvg uploads float32 values (about 2x the bytes), "
        "plus public keys, encrypted shares for `num_shares` = 5 neighbours and unmasking shares, a nearly fixed "
        "per-client amount because the neighbourhood does not grow with K. Its extra time is four protocol "
        "stages of messages per round (setup, key sharing, masked upload, unmasking) and the server's "
        "reconstruction of masks.", "",
    ]
