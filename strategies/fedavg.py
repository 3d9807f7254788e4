"""FedAvg over adapter tensors, weighted by each client's number of training sequences."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.common import Metrics, Parameters
from flwr.server.strategy import FedAvg

from fedlm.settings import RunSettings

if TYPE_CHECKING:
    from strategies import EvaluateFn


def fit_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted train loss, the clients' summed training time and tokens, and their privacy spend."""
    total = sum(n for n, _ in results)
    metrics = {
        "train_loss": sum(n * float(m["train_loss"]) for n, m in results) / total,
        "client_train_seconds": sum(float(m["train_seconds"]) for _, m in results),
        "train_tokens": sum(int(m["train_tokens"]) for _, m in results),
        "clients_ok": len(results),
    }
    epsilons = [float(m["epsilon"]) for _, m in results if "epsilon" in m]
    if epsilons:  # each is that client's cumulative spend over every round it joined
        metrics |= {"epsilon_max": max(epsilons), "epsilon_mean": sum(epsilons) / len(epsilons),
                    "delta": max(float(m["delta"]) for _, m in results if "delta" in m)}
    return metrics


def eval_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
    """The worst and the mean client perplexity (the token-weighted one comes from the loss)."""
    ppl = [float(m["perplexity"]) for _, m in results]
    return {"eval_perplexity_worst": max(ppl), "eval_perplexity_client_mean": sum(ppl) / len(ppl),
            "eval_clients": len(results)}


def round_config(server_round: int) -> dict:
    """What every client is told with its instructions: which round this is (seeds its local sampling)."""
    return {"round": server_round}


def fedavg_options(settings: RunSettings, initial: Parameters, evaluate_fn: "EvaluateFn | None" = None) -> dict:
    """The FedAvg keyword arguments every strategy here shares (the server optimisers extend FedAvg)."""
    fed = settings.federation
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
        on_fit_config_fn=round_config,
        on_evaluate_config_fn=round_config,
        fit_metrics_aggregation_fn=fit_metrics,
        evaluate_metrics_aggregation_fn=eval_metrics,
        accept_failures=True,
    )


def build_fedavg(settings: RunSettings, initial: Parameters,
                 evaluate_fn: "EvaluateFn | None" = None) -> FedAvg:
    """FedAvg; also the server side of fedprox (the proximal term lives in local training) and frozen_a
    (averaging B alone is exact when every client shares A: the mean of B_i A is (mean B_i) A)."""
    return FedAvg(**fedavg_options(settings, initial, evaluate_fn))
