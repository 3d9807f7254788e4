"""The federated round loop: evaluate the base model at round 0, then fit and evaluate every round.

The fit step is a pluggable Flower workflow (the plain one, or SecAgg+'s), so secure aggregation is a
switch on this same loop rather than a second loop.
"""

from __future__ import annotations

import timeit
from typing import Callable

from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_fit_workflow,
    default_init_params_workflow,
)
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedlm.settings import SECAGG_MODULUS, RunSettings

ERROR = 40
Workflow = Callable[[Grid, LegacyContext], None]
RoundHook = Callable[[int, LegacyContext], None]


class RoundLoop:
    """Round 0 (base model, evaluation only), then rounds 1..N of fit, central and federated evaluation.

    A resumed run starts at `first_round` (the one after its last committed round) and skips round 0.
    """

    def __init__(self, on_round_end: RoundHook, fit_workflow: Workflow = default_fit_workflow,
                 first_round: int = 0) -> None:
        self.on_round_end = on_round_end
        self.fit_workflow = fit_workflow
        self.first_round = first_round

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        registered.wait()
        try:
            default_init_params_workflow(grid, context)  # also evaluates round 0 centrally, if configured
            config = ConfigRecord({Key.START_TIME: timeit.default_timer(), Key.CURRENT_ROUND: 0})
            context.state.config_records[MAIN_CONFIGS_RECORD] = config
            if self.first_round == 0:
                default_evaluate_workflow(grid, context)  # round 0: where the base model starts
                self.on_round_end(0, context)
            for server_round in range(max(self.first_round, 1), context.config.num_rounds + 1):
                config[Key.CURRENT_ROUND] = server_round
                context.client_manager.server_round = server_round  # seeds this round's cohort
                try:
                    self.fit_workflow(grid, context)
                except Exception as error:  # e.g. a reply Flower cannot even decode: lose the round, not the run
                    log(ERROR, "round %d failed, the global adapter is unchanged: %r", server_round, error)
                    context.strategy.audit.abandoned = True
                default_centralized_evaluation_workflow(grid, context)
                default_evaluate_workflow(grid, context)
                self.on_round_end(server_round, context)
        finally:
            stop.set()
            thread.join()


def build_fit_workflow(settings: RunSettings) -> Workflow:
    """The one place that chooses plain or secure (SecAgg+) aggregation for the fit step."""
    secagg = settings.secagg
    if not secagg.enabled:
        return default_fit_workflow
    return SecAggPlusWorkflow(
        num_shares=secagg.num_shares,
        reconstruction_threshold=secagg.reconstruction_threshold,
        max_weight=float(settings.federation.max_client_weight),
        clipping_range=secagg.clipping_range,
        quantization_range=secagg.quantization_range,
        modulus_range=SECAGG_MODULUS,
        timeout=secagg.timeout,
    )
