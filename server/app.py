"""The Flower ServerApp: builds the global adapter and strategy from the run's settings and drives the rounds."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.serverapp import Grid
from peft import PeftModel

from fedlm.adapter import adapter_to_arrays, arrays_to_adapter
from fedlm.data import load_texts, pack_texts, prepare_federation
from fedlm.model import apply_lora, load_base_model
from fedlm.settings import RunSettings, check_resumable, settings_from_run_config
from fedlm.training import evaluate, perplexity
from server.checkpoint import load_strategy_state, read_state
from server.loop import RoundLoop, build_fit_workflow
from server.metering import MeteredGrid
from server.recorder import RunRecorder
from server.sampling import StableClientManager
from server.report import write_report
from strategies import EvaluateFn, build_strategy

INFO = 20


def central_evaluator(settings: RunSettings, model: PeftModel, tokenizer) -> EvaluateFn | None:
    """Evaluation of the global adapter on server-side held-out text, if `server.central_eval_path` is set."""
    if not settings.server.central_eval_path:
        return None
    texts = load_texts(settings.server.central_eval_path, settings.dataset, key="server.central_eval_path")
    ids, mask = pack_texts(texts, tokenizer, settings.dataset.seq_len)

    def evaluate_fn(server_round: int, arrays: list, config: dict) -> tuple[float, dict]:
        arrays_to_adapter(model, arrays)
        loss, tokens = evaluate(model, ids, mask)
        return loss, {"central_perplexity": perplexity(loss), "central_tokens": tokens}

    return evaluate_fn


def run_federation(grid: Grid, context: Context, settings: RunSettings) -> None:
    """Prepare (or resume), run every round, and leave metrics, the adapter and a report in
    `settings.output_dir`."""
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resumed = read_state(Path(settings.resume)) if settings.resume else None
    if resumed:
        check_resumable(resumed.settings, settings, settings.resume)
    base, tokenizer = load_base_model(settings.model, settings.cache_dir)
    if settings.deployment.name == "simulation":  # deployed devices bring their own data (node config data-path)
        prepare_federation(settings, tokenizer, out_dir / "data")  # a no-op when the launcher already did it
    model = apply_lora(base, settings.lora, settings.seed, frozen_a=settings.strategy.frozen_a)
    initial = ndarrays_to_parameters(resumed.arrays if resumed else adapter_to_arrays(model))
    strategy = build_strategy(settings, initial, central_evaluator(settings, model, tokenizer))
    first_round = 0
    if resumed:
        load_strategy_state(strategy, resumed.strategy_state)
        first_round = resumed.server_round + 1
        log(INFO, "Resuming %s after its committed round %d", out_dir, resumed.server_round)
    metered = MeteredGrid(grid, timeout=settings.server.round_timeout)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=settings.federation.rounds), strategy=strategy,
                           client_manager=StableClientManager(metered, settings.seed, settings.server.round_timeout))
    recorder = RunRecorder(out_dir, model, metered, settings, first_round)
    RoundLoop(recorder, build_fit_workflow(settings), first_round)(metered, legacy)
    report = write_report(out_dir, settings)
    log(INFO, "Adapter saved to %s; report at %s", out_dir / "adapter", report)


def build_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp for `settings`, or (for `flwr run`) for the settings in the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, settings or settings_from_run_config(context.run_config))

    return app


app = build_server_app()
