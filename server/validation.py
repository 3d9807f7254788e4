"""Reply checks in front of any strategy: a malformed reply is dropped and logged, never aggregated.

In stock Flower one reply with a NaN or a wrong shape crashes the aggregation or poisons the global model.
Here each training reply must decode to the wire arrays' exact count, shapes and a float dtype, be finite,
answer this round, claim a positive example count (capped at `max_weight`) and come once per node; a round
left with fewer than `min_replies` valid replies is abandoned and the global adapter stays as it was.
Under SecAgg+ the server only ever sees the masked sum, so these checks apply to that sum; clients check their
own update (clipping range) before masking it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.common import EvaluateRes, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedlm.adapter import WireFormat
from server.record import RoundRecord
from strategies.wrapper import StrategyWrapper


def reply_problem(res: FitRes, server_round: int, wire: WireFormat) -> str | None:
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
    return wire.problem(arrays)


class ValidatedReplies(StrategyWrapper):
    """Delegates to `inner` after dropping malformed replies; writes what it saw into the round's record."""

    def __init__(self, inner: Strategy, wire: WireFormat, *, min_replies: int, max_weight: int,
                 all_or_nothing: bool = False) -> None:
        super().__init__(inner)
        self.all_or_nothing = all_or_nothing
        """privacy=distributed_dp_sgd: the unmasked sum holds every reply's share, so a dropped reply (whose
        share cannot be taken out again) loses the round rather than skew the sum's decoding."""
        self.wire = wire
        self.min_replies = min_replies
        self.max_weight = max_weight
        self.record = RoundRecord(0)
        """The current round's record: the round loop hands each round's to `begin`."""

    def begin(self, record: RoundRecord) -> None:
        self.record = record

    def _drop(self, server_round: int, proxy: ClientProxy, res: FitRes | EvaluateRes, why: str) -> None:
        line = f"node {proxy.cid} (client {res.metrics.get('client', '?')}): {why}"
        log(logging.WARNING, "round %d: dropped the reply of %s", server_round, line)
        self.record.dropped.append(line)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        valid, seen = [], set()
        for proxy, res in results:
            problem = "a second reply from the same node" if proxy.cid in seen else \
                reply_problem(res, server_round, self.wire)
            if problem:
                self._drop(server_round, proxy, res, problem)
                continue
            seen.add(proxy.cid)
            res.num_examples = min(res.num_examples, self.max_weight)  # a claimed weight is only a claim
            valid.append((proxy, res))
        # Their privacy is spent whether or not the round publishes: keep what they reported either way.
        self.record.trained = [dict(res.metrics, num_examples=res.num_examples) for _, res in valid]
        if self.all_or_nothing and len(valid) < len(results):
            reason = f"{len(results) - len(valid)} of {len(results)} replies dropped; their shares are in the sum"
            log(logging.WARNING, "round %d abandoned: %s; the global adapter is unchanged", server_round, reason)
            self.record.abandon("aggregate", reason)
            return None, {}
        if len(valid) < self.min_replies:
            reason = f"{len(valid)} valid replies, server.min_replies={self.min_replies}"
            log(logging.WARNING, "round %d abandoned: %s; the global adapter is unchanged", server_round, reason)
            self.record.abandon("aggregate", reason)
            return None, {}
        aggregated, metrics = self.inner.aggregate_fit(server_round, valid, failures)
        if aggregated is None:
            self.record.abandon("aggregate", f"strategy {type(self.inner).__name__} produced no aggregate")
            return None, {}
        self.record.aggregated, self.record.aggregate = True, dict(metrics)
        # FedAdam's float64 step size and SecAgg+'s sum would double every download
        aggregated = ndarrays_to_parameters([a.astype(np.float32) for a in parameters_to_ndarrays(aggregated)])
        return aggregated, metrics

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list):
        valid = []
        for proxy, res in results:
            if isinstance(res.loss, (int, float)) and math.isfinite(res.loss) and res.num_examples > 0:
                valid.append((proxy, res))
            else:
                self._drop(server_round, proxy, res, f"evaluation loss {res.loss!r} over {res.num_examples!r} tokens")
        self.record.evaluated = [dict(res.metrics, loss=float(res.loss), tokens=res.num_examples) for _, res in valid]
        return self.inner.aggregate_evaluate(server_round, valid, failures) if valid else (None, {})

    def evaluate(self, server_round: int, parameters: Parameters):
        result = self.inner.evaluate(server_round, parameters)
        if result is not None:
            loss, metrics = result
            self.record.central = {"loss": float(loss), **metrics}
        return result
