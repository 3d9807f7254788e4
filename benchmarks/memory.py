"""`python benchmarks/memory.py [--quick] [--output BENCHMARKS.md]`: peak memory of one client process (training with and without DP), and
the largest simulated federation (clients registered x clients per round) that stays under a memory ceiling."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import psutil

from common import ROOT, TIMED_BATCH, Provenance, log, publish

CEILING_GIB = 16.0  # the stated ceiling: what this 24 GiB machine can give a federation next to its OS and tools
WORK = ROOT / "outputs" / "bench-memory"
SAMPLE_SECONDS = 0.25  # how often the process tree's RSS is summed: short enough to catch a round's peak
# (clients registered, clients per round): one short simulation each, largest last.
FEDERATIONS = ((50, 10), (100, 20), (300, 50))
QUICK_FEDERATIONS = ((50, 10), (100, 20))
SCALE = ["federation.rounds=1", "train.local_steps=1", "train.batch_size=4", "train.max_eval_sequences=4",
         "privacy=disabled", "secagg=secaggplus", "dataset.partitioner=iid", "dataset.min_train_sequences=2",
         "dataset.min_eval_sequences=1", "server.save_every=0"]


def client_round(private: bool) -> tuple[float, int]:
    """In a fresh process: what one simulated client does in a round (load the base, add the adapter, train one
    round at the default settings, evaluate); returns the process's peak RSS in GiB and the adapter's size."""
    import torch

    from fedlm.data.preparation import ClientData, client_data_path
    from fedlm.model import apply_lora, load_base_model
    from fedlm.plan import plan_privacy
    from fedlm.privacy import train_local_dp
    from fedlm.settings import RunSettings, TrainSettings
    from fedlm.training import evaluate, train_local

    settings = RunSettings(output_dir=str(WORK / "client"), train=TrainSettings(batch_size=TIMED_BATCH))
    torch.set_num_threads(settings.federation.cpus_per_client)
    base, _ = load_base_model(settings.model, settings.cache_dir)
    model = apply_lora(base, settings.lora, settings.seed)
    data = ClientData.load(client_data_path(WORK / "client" / "data", 0))
    train, privacy, n = settings.train, settings.privacy, len(data.train)
    if private:
        plan = plan_privacy(settings, n)
        train_local_dp(model, data.train, data.train_mask, train, privacy, noise_multiplier=plan.noise_multiplier,
                       sample_rate=plan.sample_rate, seed=0)
    else:
        train_local(model, data.train, data.train_mask, train, seed=0)
    evaluate(model, data.eval[:train.max_eval_sequences], data.eval_mask[:train.max_eval_sequences])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, trainable  # Linux: KiB


def client_process_peaks() -> dict:
    from simulations.launch import prepare
    from simulations.run import compose_settings

    prepare(compose_settings([], str(WORK / "client")))
    spawn = multiprocessing.get_context("spawn")  # a clean interpreter per measurement, like a client process
    peaks = {}
    for label, private in (("plain", False), ("DP-SGD", True)):
        with spawn.Pool(1) as pool:
            peaks[label], trainable = pool.apply(client_round, (private,))
        log(f"one client process, {label}: peak RSS {peaks[label]:.2f} GiB")
    return {"peaks": peaks, "adapter_parameters": trainable}


class TreeSampler:
    """Samples the RSS of this process and all its descendants (Ray's GCS, raylet, workers) every SAMPLE_SECONDS,
    and the niceness Ray gives its workers (what decides how other load slows them)."""

    def __init__(self) -> None:
        self.peak_total, self.peak_worker, self._stop = 0.0, 0.0, threading.Event()
        self.worker_nice: set[int] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(SAMPLE_SECONDS):
            total, worker = me.memory_info().rss, 0
            for child in me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                    total += rss
                    if "ClientAppActor" in " ".join(child.cmdline()):
                        worker = max(worker, rss)
                        self.worker_nice.add(child.nice())
                except psutil.Error:
                    pass  # a process that just ended
            self.peak_total, self.peak_worker = max(self.peak_total, total / 2**30), max(self.peak_worker, worker / 2**30)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def many_small_documents(folder: Path, count: int) -> Path:
    """`count` text documents of about 4,000 characters, cut from installed packages' source: enough clients'
    worth of data for the largest federation (the content does not matter for memory)."""
    import sysconfig

    if folder.exists() and len(list(folder.glob("*.txt"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for file in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
        text = file.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text) - 4_000, 4_000):
            (folder / f"doc_{written:05d}.txt").write_text(text[start:start + 4_000])
            written += 1
            if written >= count:
                return folder
    return folder


def federation_peak(num_clients: int, per_round: int) -> dict:
    from simulations.launch import simulate
    from simulations.run import compose_settings

    docs = many_small_documents(WORK / "documents", 3 * max(n for n, _ in FEDERATIONS))  # about 3 per client
    out = WORK / f"federation_{num_clients}"
    shutil.rmtree(out / "privacy", ignore_errors=True)
    settings = compose_settings(SCALE + [f"dataset.path={docs}", f"federation.num_clients={num_clients}",
                                         f"federation.clients_per_round={per_round}"], str(out))
    start = time.perf_counter()
    with TreeSampler() as sampler:
        outcome = simulate(settings)
    row = {"clients": num_clients, "per_round": per_round, "total": sampler.peak_total,
           "worker": sampler.peak_worker, "seconds": time.perf_counter() - start,
           "ok": outcome.rows[-1]["clients_ok"], "worker_nice": sorted(sampler.worker_nice)}
    log(f"{num_clients} clients, {per_round} per round: peak tree RSS {row['total']:.2f} GiB, largest worker "
        f"{row['worker']:.2f} GiB, {row['ok']}/{per_round} trained, {row['seconds']:.0f} s")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="only the two smallest federations")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    from simulations.launch import make_offline_safe

    make_offline_safe()
    stamp = Provenance()
    # Measured rows are kept in outputs/bench-memory/results.json: an interrupted run resumes (delete it to redo).
    cache = WORK / "results.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    if "peaks" not in done.get("client", {}):  # (an older cache held the peaks alone)
        done["client"] = client_process_peaks()
        cache.write_text(json.dumps(done, indent=1))
    rows = []
    for n, k in QUICK_FEDERATIONS if args.quick else FEDERATIONS:
        if f"{n},{k}" not in done:
            done[f"{n},{k}"] = federation_peak(n, k)
            cache.write_text(json.dumps(done, indent=1))
        rows.append(done[f"{n},{k}"])
    from fedlm.settings import RunSettings

    defaults = RunSettings()
    nice = sorted({n for r in rows for n in r.get("worker_nice", [])})
    publish("memory", stamp, {
        "ceiling_gib": CEILING_GIB, "lora_r": defaults.lora.r, "local_steps": defaults.train.local_steps,
        "batch_size": TIMED_BATCH, "physical_batch": defaults.privacy.max_physical_batch_size,
        "adapter_parameters": done["client"]["adapter_parameters"], "client": done["client"]["peaks"],
        "sample_seconds": SAMPLE_SECONDS, "tiny": SCALE[1:4],
        "workers": max(1, (os.cpu_count() or 1) // defaults.federation.cpus_per_client),
        "worker_nice": nice or None, "federations": [{k: v for k, v in r.items() if k != "worker_nice"} for r in rows],
    }, args.output)


if __name__ == "__main__":
    main()
