"""FedAvg over adapter tensors, weighted by each client's number of training sequences."""

from __future__ import annotations

from typing import Any

from flwr.common import Parameters
from flwr.server.strategy import FedAvg

from fedlm.protocol import ROUND
from fedlm.settings import ConfigError, RunSettings
from strategies.spec import EvaluateFn, StrategySpec


def no_metrics(results: list) -> dict:
    """Client metrics are kept whole, per client, in the round record (server/record.py), not averaged here."""
    return {}


def fedavg_options(spec: StrategySpec, settings: RunSettings, initial: Parameters,
                   evaluate_fn: EvaluateFn | None) -> dict:
    """The FedAvg keyword arguments every strategy here shares (the server optimisers extend FedAvg)."""
    fed = settings.federation
    client_config = spec.client_config(settings)

    def instructions(server_round: int) -> dict[str, Any]:
        # The round seeds the client's local sampling and lets the server drop a stale reply.
        return {ROUND: server_round, **client_config}

    return dict(
        # min_* fix the counts exactly: a fraction alone can round k/n * n down to k - 1.
        fraction_fit=fed.clients_per_round / fed.num_clients,
        min_fit_clients=fed.clients_per_round,
        # Every client evaluates every round, so rounds are compared on the same held-out data.
        fraction_evaluate=1.0,
        min_evaluate_clients=fed.num_clients,
        min_available_clients=fed.num_clients,
        initial_parameters=initial,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=instructions,
        on_evaluate_config_fn=instructions,
        fit_metrics_aggregation_fn=no_metrics,
        evaluate_metrics_aggregation_fn=no_metrics,
        accept_failures=True,
    )


def build_fedavg(spec: StrategySpec, settings: RunSettings, initial: Parameters,
                 evaluate_fn: EvaluateFn | None = None) -> FedAvg:
    """FedAvg; also the server side of fedprox (the proximal term lives in local training) and frozen_a."""
    return FedAvg(**fedavg_options(spec, settings, initial, evaluate_fn))


def _frozen_a_rules(settings: RunSettings) -> None:
    # frozen_a never sends A: each client redraws it from the seed, and a rank-r_i draw is not the first r_i
    # rows of the global rank-r draw, so the clients' B would pair with different A's.
    ranks = settings.lora.client_ranks
    if any(r < settings.lora.r for r in ranks):
        raise ConfigError(f"strategy=frozen_a cannot be combined with lora.client_ranks={list(ranks)} below "
                          "lora.r: a lower-rank client cannot rebuild the global frozen A; use another strategy or "
                          "clear lora.client_ranks")


FEDAVG = StrategySpec("fedavg", build_fedavg)
FEDPROX = StrategySpec("fedprox", build_fedavg, proximal=True)
# Averaging B alone is exact when every client shares A: the mean of B_i A is (mean B_i) A.
FROZEN_A = StrategySpec("frozen_a", build_fedavg, frozen_a=True, check=_frozen_a_rules)
