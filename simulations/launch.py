"""Run a simulated federation on Flower's Simulation Engine from validated settings (no Hydra here)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fedlm.flower_process import OFFLINE_ENV
from fedlm.settings import ConfigError, RunSettings


class _DropDeprecationNotice(logging.Filter):
    """`run_simulation` is the only in-process engine entry point in Flower 1.41; its notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def make_offline_safe() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@dataclass
class RunOutcome:
    output_dir: Path
    rows: list[dict]

    @property
    def initial_perplexity(self) -> float | None:
        """Held-out perplexity at the first evaluated round (round 0, the base model, unless it timed out)."""
        return next((r["eval_perplexity"] for r in self.rows if r["eval_perplexity"] is not None), None)

    @property
    def final_perplexity(self) -> float | None:
        return next((r["eval_perplexity"] for r in reversed(self.rows) if r["eval_perplexity"] is not None), None)

    @property
    def abandoned_rounds(self) -> list[int]:
        return [r["round"] for r in self.rows if r.get("abandoned")]

    def summary(self) -> str:
        """The headline, and a warning when rounds published nothing."""
        first, last = self.initial_perplexity, self.final_perplexity
        line = (f"Held-out perplexity {first or float('nan'):.2f} (round 0, base) -> {last or float('nan'):.2f} "
                f"(round {self.rows[-1]['round']}).")
        lost = self.abandoned_rounds
        if lost:
            trained = len(self.rows) - 1 - len(lost)
            line += (f"\nWARNING: {len(lost)} of {len(self.rows) - 1} rounds were abandoned (rounds "
                     f"{', '.join(map(str, lost))}) and changed nothing; {trained} trained. The progress lines and "
                     "metrics.jsonl (abandoned_stage, abandoned_reason) say why.")
        return line


def _writable(output_dir: str) -> Path:
    out_dir = Path(output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as err:
        raise ConfigError(f"output_dir={output_dir!r} cannot be written ({err.strerror or err}); point it at a "
                          "folder this user may write") from None
    return out_dir


def prepare(settings: RunSettings) -> None:
    """Everything that can fail on bad input, before any federation starts: data, tokenizer, model.

    Cheapest first: the data files (a wrong path fails in milliseconds), then what needs the tokenizer and
    the model's config (context length, LoRA targets; no weights are loaded) and then the data's rows per
    client. settings.json, written last and atomically, marks a run whose inputs all passed; the ServerApp
    then uses the prepared data as it is.
    """
    from fedlm.data.preparation import prepare_federation
    from fedlm.data.sources import load_corpus, load_texts
    from fedlm.files import write_json_atomic
    from fedlm.model import check_model, load_tokenizer
    from strategies import check_strategy

    check_strategy(settings)
    corpus = load_corpus(settings.dataset, num_sources=settings.federation.num_clients, seed=settings.seed)
    if settings.server.central_eval_path:
        load_texts(settings.server.central_eval_path, settings.dataset, key="server.central_eval_path")
    out_dir = _writable(settings.output_dir)
    tokenizer = load_tokenizer(settings.model, settings.cache_dir)
    check_model(settings.model, settings.lora, settings.dataset.seq_len, settings.cache_dir)
    prepare_federation(settings, tokenizer, out_dir / "data", corpus)
    write_json_atomic(out_dir / "settings.json", json.loads(settings.to_json()))


def simulate(settings: RunSettings, client_mods: tuple = ()) -> RunOutcome:
    """Prepare, then run the federation with one virtual SuperNode per client; returns the metrics rows.

    `client_mods` are extra Flower mods for every client (fault injection in tests).
    """
    make_offline_safe()
    prepare(settings)
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app
    from server.record import read_metrics

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(_DropDeprecationNotice())
    flwr_logger.propagate = False  # it prints itself; a root handler (Opacus installs one) would double it
    flwr_logger.disabled = False  # Hydra's logging set-up disables loggers that exist before it runs
    fed = settings.federation
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=build_server_app(settings),
            client_app=build_client_app(settings, client_mods),
            num_supernodes=fed.num_clients,
            backend_config={
                "client_resources": {"num_cpus": fed.cpus_per_client, "num_gpus": 0.0},
                "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                              "logging_level": logging.ERROR, "log_to_driver": True},
            },
        )
    outcome = RunOutcome(Path(settings.output_dir), read_metrics(Path(settings.output_dir)))
    print(f"\nPollinate: {len(outcome.rows) - 1} rounds in {time.perf_counter() - start:.0f} s. {outcome.summary()}\n"
          f"Outputs: {outcome.output_dir} (metrics.jsonl, adapter/, report.md)", flush=True)
    return outcome
