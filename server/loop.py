"""The federated round loop: evaluate the base model at round 0, then fit and evaluate every round.

The fit step is a pluggable Flower workflow (the plain one, or SecAgg+'s), so secure aggregation is a
switch on this same loop rather than a second loop. Each round gets one RoundRecord, which the grid, the
reply checks and the SecAgg+ stages fill and the recorder writes.
"""

from __future__ import annotations

import logging
import time
import timeit
from typing import Callable

from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_fit_workflow,
    default_init_params_workflow,
)

from fedlm.distributed_dp import WIRE_LEVELS, sum_range
from fedlm.settings import SECAGG_MODULUS, RunSettings
from server.metering import MeteredGrid
from server.record import RoundRecord
from server.sampling import StableClientManager
from server.validation import ValidatedReplies

Workflow = Callable[[MeteredGrid, LegacyContext], None]
RoundHook = Callable[[RoundRecord, LegacyContext], None]


class RoundLoop:
    """Round 0 (base model, evaluation only), then rounds 1..N of fit, central and federated evaluation.

    A resumed run starts at `first_round` (the one after its last committed round) and skips round 0.
    """

    def __init__(self, on_round_end: RoundHook, fit_workflow: Workflow = default_fit_workflow,
                 first_round: int = 0, eval_every: int = 1) -> None:
        self.on_round_end = on_round_end
        self.fit_workflow = fit_workflow
        self.first_round = first_round
        self.eval_every = eval_every

    def __call__(self, grid: MeteredGrid, context: LegacyContext) -> None:
        strategy: ValidatedReplies = context.strategy  # server/app.py builds both
        clients: StableClientManager = context.client_manager
        thread, stop, registered = start_update_client_manager_thread(grid, clients)
        registered.wait()
        try:
            first = RoundRecord(self.first_round)
            strategy.begin(first)
            default_init_params_workflow(grid, context)  # also evaluates round 0 centrally, if configured
            config = ConfigRecord({Key.START_TIME: timeit.default_timer(), Key.CURRENT_ROUND: 0})
            context.state.config_records[MAIN_CONFIGS_RECORD] = config
            rounds = ([0] if self.first_round == 0 else []) + list(range(max(self.first_round, 1),
                                                                         context.config.num_rounds + 1))
            for server_round in rounds:
                record = first if server_round == first.round else RoundRecord(server_round)
                start = time.perf_counter()
                grid.record, grid.stage = record, "fit"
                strategy.begin(record)
                config[Key.CURRENT_ROUND] = clients.server_round = server_round  # the round seeds its cohort
                evaluated = server_round % self.eval_every == 0 or server_round == context.config.num_rounds
                if server_round:
                    self.fit(grid, context, record)
                    if evaluated:
                        default_centralized_evaluation_workflow(grid, context)
                if evaluated:
                    default_evaluate_workflow(grid, context)
                record.seconds = time.perf_counter() - start
                self.on_round_end(record, context)
        finally:
            stop.set()
            thread.join()

    def fit(self, grid: MeteredGrid, context: LegacyContext, record: RoundRecord) -> None:
        try:
            self.fit_workflow(grid, context)
        except Exception as error:  # e.g. a reply Flower cannot even decode: lose the round, not the run
            log(logging.ERROR, "round %d failed, the global adapter is unchanged: %r", record.round, error)
            record.abandon(grid.stage, f"{type(error).__name__}: {error}")
        if not record.aggregated:
            failures = "; ".join(sorted({f["reason"] for f in record.failed}))
            record.abandon(grid.stage, f"no update was aggregated ({len(record.trained)} valid replies of "
                           f"{len(record.sampled)} sampled{': ' + failures if failures else ''})")
        if record.abandoned:
            log(logging.WARNING, "round %d abandoned at stage %s: %s", record.round, record.abandoned["stage"],
                record.abandoned["reason"])


class RecordedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, naming in the round record the protocol stage at which a round halted.

    Flower only logs "Secure aggregation halted." and returns; without this the round looked completed. It never
    unmasks a sum of fewer than `min_shares` clients' vectors.
    """

    def __init__(self, *, min_shares: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_shares = min_shares

    def _staged(self, name: str, stage, grid: MeteredGrid, context: LegacyContext, state) -> bool:
        grid.stage = f"secagg {name}"
        before = len(getattr(state, "active_node_ids", ()) or ())
        if stage(grid, context, state):
            return True
        after = len(getattr(state, "active_node_ids", ()) or ())
        grid.record.abandon(grid.stage, f"SecAgg+ halted: {after} of {before or len(grid.record.sampled)} clients "
                            f"still active after a {self.timeout:g} s stage, fewer than "
                            f"secagg.reconstruction_threshold={self.reconstruction_threshold} neighbours each need")
        return False

    def setup_stage(self, grid, context, state) -> bool:
        return self._staged("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state) -> bool:
        return self._staged("share-keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        return self._staged("collect-masked-vectors (local training)", super().collect_masked_vectors_stage,
                            grid, context, state)

    def unmask_stage(self, grid, context, state) -> bool:
        active = len(state.active_node_ids)
        if active < self.min_shares:  # privacy=distributed_dp_sgd: a sum of fewer shares holds too little noise
            grid.stage = "secagg unmask"
            grid.record.abandon(grid.stage, f"{active} noise shares left after the masked-vector stage, fewer than "
                                f"server.min_replies={self.min_shares}: the sum is never unmasked")
            return False
        return self._staged("unmask", super().unmask_stage, grid, context, state)


def build_fit_workflow(settings: RunSettings) -> Workflow:
    """The one place that chooses plain or secure (SecAgg+) aggregation for the fit step."""
    secagg = settings.secagg
    if not secagg.enabled:
        return default_fit_workflow
    # privacy=distributed_dp_sgd puts its own integers on the wire: the range and levels are its grid's.
    distributed = settings.privacy.distributed
    return RecordedSecAggPlus(
        min_shares=settings.server.min_replies if distributed else 0,
        num_shares=secagg.num_shares,
        reconstruction_threshold=secagg.reconstruction_threshold,
        max_weight=float(settings.federation.max_client_weight),
        clipping_range=sum_range(settings) if distributed else secagg.clipping_range,
        quantization_range=WIRE_LEVELS if distributed else secagg.quantization_range,
        modulus_range=SECAGG_MODULUS,
        # Clients train inside the masked-vector stage: it gets the round's whole budget (secagg.timeout=0).
        timeout=secagg.timeout or settings.server.round_timeout,
    )
