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


class ClientLevelDP(Strategy):
    """Delegates everything to `inner`; adds noise to what its aggregate_fit returns and accounts for it."""

    def __init__(self, inner: Strategy, *, clipping_norm: float, noise_multiplier: float, sample_rate: float,
                 delta: float) -> None:
        self.inner = inner
        self.clipping_norm = clipping_norm
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.rounds_noised = 0
        # The noise must be secret: a server-known seed would let anyone subtract it.
        self.rng = np.random.default_rng(secrets.randbits(128))

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)

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
