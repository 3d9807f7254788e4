"""The Flower ServerApp: builds the global adapter and strategy from the run's settings and drives the rounds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.serverapp import Grid
from peft import PeftModel

from fedlm.adapter import WireFormat
from fedlm.data.packing import pack_texts
from fedlm.data.preparation import prepare_federation
from fedlm.data.sources import load_texts
from fedlm.model import apply_lora, load_base_model
from fedlm.settings import RunSettings, check_resumable, settings_from_run_config
from fedlm.training import evaluate
from server.checkpoint import load_strategy_state, read_state
from server.loop import RoundLoop, build_fit_workflow
from server.metering import MeteredGrid
from server.recorder import RunRecorder
from server.report import write_report
from server.sampling import StableClientManager
from server.validation import ValidatedReplies
from strategies import build_strategy, check_strategy
from strategies.spec import EvaluateFn


PREPARED = "settings.json"
"""Written by the launcher, last, once every input passed and the clients' data is prepared."""


def prepared_by_launcher(out_dir: Path, settings: RunSettings) -> bool:
    try:
        return json.loads((out_dir / PREPARED).read_text()) == json.loads(settings.to_json())
    except (OSError, ValueError):
        return False


def central_evaluator(settings: RunSettings, model: PeftModel, wire: WireFormat, tokenizer) -> EvaluateFn | None:
    """Evaluation of the global adapter on server-side held-out text, if `server.central_eval_path` is set."""
    if not settings.server.central_eval_path:
        return None
    texts = load_texts(settings.server.central_eval_path, settings.dataset, key="server.central_eval_path")
    ids, mask = pack_texts(texts, tokenizer, settings.dataset.seq_len)

    def evaluate_fn(server_round: int, arrays: list, config: dict) -> tuple[float, dict]:
        wire.load(model, arrays)
        loss, tokens = evaluate(model, ids, mask)
        return loss, {"tokens": tokens}

    return evaluate_fn


def run_federation(grid: Grid, context: Context, settings: RunSettings) -> None:
    """Prepare (or resume), run every round, and leave metrics, the adapter and a report in
    `settings.output_dir`."""
    spec = check_strategy(settings)  # `flwr run` reaches here without the launcher's checks
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resumed = read_state(Path(settings.resume)) if settings.resume else None
    if resumed:
        check_resumable(resumed.settings, settings, settings.resume)
    base, tokenizer = load_base_model(settings.model, settings.cache_dir)
    # The launcher prepares a simulation's data before the run (its settings.json says so); `flwr run` does not.
    # Deployed devices bring their own data (node config data-path).
    if settings.deployment.name == "simulation" and not prepared_by_launcher(out_dir, settings):
        prepare_federation(settings, tokenizer, out_dir / "data")
    model = apply_lora(base, settings.lora, settings.seed, frozen_a=spec.frozen_a)
    wire = WireFormat.of(model, settings.lora.r, frozen_a=spec.frozen_a, secure=settings.secagg.enabled)
    initial = ndarrays_to_parameters(resumed.arrays if resumed else wire.to_arrays(model))
    strategy = ValidatedReplies(build_strategy(settings, initial, central_evaluator(settings, model, wire, tokenizer)),
                                wire, min_replies=settings.server.min_replies,
                                max_weight=settings.federation.max_client_weight,
                                all_or_nothing=settings.privacy.distributed)
    first_round = 0
    if resumed:
        load_strategy_state(strategy, resumed.strategy_state, Path(settings.resume))
        first_round = resumed.server_round + 1
        log(logging.INFO, "Resuming %s after its committed round %d", out_dir, resumed.server_round)
    metered = MeteredGrid(grid, timeout=settings.server.round_timeout)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=settings.federation.rounds), strategy=strategy,
                           client_manager=StableClientManager(metered, settings.seed, settings.server.round_timeout,
                                                              balanced=not settings.privacy.client_level))
    recorder = RunRecorder(out_dir, model, wire, settings, first_round)
    RoundLoop(recorder, build_fit_workflow(settings), first_round, settings.server.eval_every)(metered, legacy)
    report = write_report(out_dir, settings)
    log(logging.INFO, "Adapter saved to %s; report at %s", out_dir / "adapter", report)


def build_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp for `settings`, or (for `flwr run`) for the settings in the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, settings or settings_from_run_config(context.run_config))

    return app


app = build_server_app()
