"""Client-level DP around any mean-based strategy: Gaussian noise on the average of clipped updates.

Clients clip their own update (so this also works under SecAgg+, where the server never sees one) and
claim equal weights; this wrapper adds N(0, (z * C / k)^2) to the average of the k updates that arrived.
Unlike Flower's DP wrappers, a round with failed clients is not thrown away: the noise is scaled to the
clients that did arrive, which is what the sensitivity C / k of their average calls for.
"""

from __future__ import annotations

import secrets

import numpy as np
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedlm.privacy import client_level_epsilon
from strategies.wrapper import StrategyWrapper


class ClientLevelDP(StrategyWrapper):
    """Delegates everything to `inner`; adds noise to what its aggregate_fit returns and accounts for it."""

    def __init__(self, inner: Strategy, *, clipping_norm: float, noise_multiplier: float, sample_rate: float,
                 delta: float) -> None:
        super().__init__(inner)
        self.clipping_norm = clipping_norm
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.rounds_noised = 0
        # The noise must be secret: a server-known seed would let anyone subtract it.
        self.rng = np.random.default_rng(secrets.randbits(128))

    def state_dict(self) -> dict[str, np.ndarray]:
        """What a resumed run needs to go on accounting: the rounds noised so far (the noise stays secret)."""
        return {"rounds_noised": np.array(self.rounds_noised)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.rounds_noised = int(state["rounds_noised"])

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        aggregated, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if aggregated is None or not results:
            return aggregated, metrics
        std = self.noise_multiplier * self.clipping_norm / len(results)
        noised = [a + self.rng.normal(0.0, std, a.shape).astype(a.dtype) for a in parameters_to_ndarrays(aggregated)]
        self.rounds_noised += 1
        metrics = dict(metrics, client_epsilon=client_level_epsilon(
            self.noise_multiplier, self.sample_rate, self.rounds_noised, self.delta))
        return ndarrays_to_parameters(noised), metrics
