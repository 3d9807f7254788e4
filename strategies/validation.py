"""Reply checks in front of any strategy: a malformed reply is dropped and logged, never aggregated.

In stock Flower one reply with a NaN or a wrong shape crashes the aggregation or poisons the global model.
Here each training reply must decode to the wire arrays' exact count, shapes and a float dtype, be finite,
answer this round, claim a positive example count (capped at `max_weight`) and come once per node; a round
left with fewer than `min_replies` valid replies is abandoned and the global adapter stays as it was.
Under SecAgg+ the server only ever sees the masked sum, so these checks apply to that sum; clients check their
own update (clipping range) before masking it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.common import EvaluateRes, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.fedavg import fit_metrics
from strategies.wrapper import StrategyWrapper

WARNING = 30


@dataclass
class RoundAudit:
    """What the checks did to one round's training replies (the recorder puts it in the metrics row)."""

    dropped: list[str] = field(default_factory=list)
    """One line per dropped reply: the node, the client it claimed to be, and why."""
    abandoned: bool = False
    metrics: dict = field(default_factory=dict)
    """The valid replies' aggregated metrics when the round was abandoned: their privacy was still spent."""


def reply_problem(res: FitRes, server_round: int, shapes: list[tuple[int, ...]]) -> str | None:
    """Why a training reply cannot be aggregated, or None when it can."""
    answered = res.metrics.get("round")
    if answered != server_round:
        return f"it answers round {answered}, not {server_round}"
    if isinstance(res.num_examples, bool) or not isinstance(res.num_examples, int) or res.num_examples <= 0:
        return f"its example count {res.num_examples!r} is not a positive whole number"
    try:
        arrays = parameters_to_ndarrays(res.parameters)
    except Exception as error:  # any decoding failure means the same thing: garbage on the wire
        return f"its tensors do not decode ({type(error).__name__})"
    if len(arrays) != len(shapes):
        return f"it has {len(arrays)} tensors, the adapter has {len(shapes)}"
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        if array.shape != shape:
            return f"tensor {i} has shape {array.shape}, expected {shape}"
        if not np.issubdtype(array.dtype, np.floating):
            return f"tensor {i} has dtype {array.dtype}, expected a float type"
        if not np.isfinite(array).all():
            return f"tensor {i} holds NaN or Inf"
    return None


class ValidatedReplies(StrategyWrapper):
    """Delegates to `inner` after dropping malformed replies; `audit` describes the last training round."""

    def __init__(self, inner: Strategy, initial: Parameters, *, min_replies: int, max_weight: int) -> None:
        super().__init__(inner)
        self.shapes = [a.shape for a in parameters_to_ndarrays(initial)]
        self.min_replies = min_replies
        self.max_weight = max_weight
        self.audit = RoundAudit()

    def configure_fit(self, server_round, parameters, client_manager):
        self.audit = RoundAudit()  # a new round: nothing dropped yet
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def _drop(self, server_round: int, proxy: ClientProxy, res: FitRes | EvaluateRes, why: str) -> None:
        line = f"node {proxy.cid} (client {res.metrics.get('client', '?')}): {why}"
        log(WARNING, "round %d: dropped the reply of %s", server_round, line)
        self.audit.dropped.append(line)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        valid, seen = [], set()
        for proxy, res in results:
            problem = "a second reply from the same node" if proxy.cid in seen else \
                reply_problem(res, server_round, self.shapes)
            if problem:
                self._drop(server_round, proxy, res, problem)
                continue
            seen.add(proxy.cid)
            res.num_examples = min(res.num_examples, self.max_weight)  # a claimed weight is only a claim
            valid.append((proxy, res))
        if len(valid) < self.min_replies:
            log(WARNING, "round %d abandoned: %d valid replies, server.min_replies=%d; the global adapter is "
                "unchanged", server_round, len(valid), self.min_replies)
            self.audit.abandoned = True
            if valid:
                self.audit.metrics = fit_metrics([(res.num_examples, res.metrics) for _, res in valid])
            return None, {}
        aggregated, metrics = self.inner.aggregate_fit(server_round, valid, failures)
        if aggregated is not None:  # FedAdam's float64 step size and SecAgg+'s sum would double every download
            aggregated = ndarrays_to_parameters([a.astype(np.float32) for a in parameters_to_ndarrays(aggregated)])
        return aggregated, metrics

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list):
        valid = []
        for proxy, res in results:
            if isinstance(res.loss, (int, float)) and math.isfinite(res.loss) and res.num_examples > 0:
                valid.append((proxy, res))
            else:
                self._drop(server_round, proxy, res, f"evaluation loss {res.loss!r} over {res.num_examples!r} tokens")
        return self.inner.aggregate_evaluate(server_round, valid, failures) if valid else (None, {})
