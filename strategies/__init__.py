"""Federated strategies over LoRA adapters, chosen by name with `strategy=NAME`."""

from __future__ import annotations

from typing import Callable

from flwr.common import Parameters
from flwr.server.strategy import Strategy

from fedlm.privacy import resolve_delta
from fedlm.settings import ConfigError, RunSettings
from strategies.client_dp import ClientLevelDP
from strategies.fedavg import build_fedavg
from strategies.server_opt import build_server_optimizer
from strategies.validation import ValidatedReplies

EvaluateFn = Callable[[int, list, dict], "tuple[float, dict] | None"]

_STRATEGIES: dict[str, Callable[[RunSettings, Parameters, EvaluateFn | None], Strategy]] = {
    "fedavg": build_fedavg,
    "fedprox": build_fedavg,  # clients add the proximal term (strategy.mu); the server averages
    "frozen_a": build_fedavg,  # clients train and send only lora_B; averaging B is exact with a shared A
    "fedadam": build_server_optimizer,
    "fedyogi": build_server_optimizer,
    "fedadagrad": build_server_optimizer,
}


def build_strategy(settings: RunSettings, initial: Parameters, evaluate_fn: EvaluateFn | None = None) -> Strategy:
    """The strategy `settings.strategy.name` names, starting from the `initial` adapter.

    Raises:
        ConfigError: the name is unknown (the message lists the valid ones).
    """
    try:
        builder = _STRATEGIES[settings.strategy.name]
    except KeyError:
        raise ConfigError(f"strategy={settings.strategy.name!r} is unknown; choose one of "
                          f"{sorted(_STRATEGIES)}") from None
    strategy = builder(settings, initial, evaluate_fn)
    privacy, fed = settings.privacy, settings.federation
    if privacy.client_level:
        strategy = ClientLevelDP(strategy, clipping_norm=privacy.update_clipping_norm,
                                 noise_multiplier=privacy.update_noise_multiplier,
                                 sample_rate=fed.clients_per_round / fed.num_clients,
                                 delta=resolve_delta(privacy, fed.num_clients))
    return ValidatedReplies(strategy, initial, min_replies=settings.server.min_replies,
                            max_weight=fed.max_client_weight)


def strategy_layers(strategy: Strategy) -> list[Strategy]:
    """The wrappers from the outside in, then the strategy they wrap (each wrapper keeps it as `inner`)."""
    layers = [strategy]
    while hasattr(layers[-1], "inner"):
        layers.append(layers[-1].inner)
    return layers


def strategy_names() -> list[str]:
    return sorted(_STRATEGIES)
