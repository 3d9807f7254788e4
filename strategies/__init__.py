"""Federated strategies over LoRA adapters: the one registry of `strategy=NAME`, and their shared rules."""

from __future__ import annotations

from flwr.common import Parameters
from flwr.server.strategy import Strategy

from fedlm.privacy import resolve_delta
from fedlm.settings import ConfigError, RunSettings
from strategies.client_dp import ClientLevelDP
from strategies.distributed_dp import build_central_dp_sgd, check_distributed
from strategies.fedavg import FEDAVG, FEDPROX, FROZEN_A
from strategies.server_opt import FEDADAGRAD, FEDADAM, FEDYOGI
from strategies.spec import EvaluateFn, StrategySpec

# Adding a strategy: a module defining its StrategySpec, one entry here, and conf/strategy/NAME.yaml.
STRATEGIES: dict[str, StrategySpec] = {spec.name: spec for spec in (
    FEDAVG, FEDPROX, FROZEN_A, FEDADAM, FEDYOGI, FEDADAGRAD)}


def strategy_spec(name: str) -> StrategySpec:
    """The spec `strategy=name` stands for.

    Raises:
        ConfigError: the name is unknown (the message lists the valid ones).
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"strategy={name!r} is unknown; choose one of {sorted(STRATEGIES)}") from None


def check_strategy(settings: RunSettings) -> StrategySpec:
    """The run's strategy spec, after its rules and the rules every strategy shares have passed.

    Raises:
        ConfigError: an unknown strategy, or a setting it cannot be combined with, naming the fix.
    """
    s = settings.strategy
    spec = strategy_spec(s.name)
    if spec.proximal and s.mu <= 0:
        raise ConfigError(f"strategy={s.name} needs strategy.mu > 0 (got {s.mu:g}: that is plain FedAvg); try "
                          "strategy.mu=0.01, or use strategy=fedavg")
    if not spec.proximal and s.mu > 0:
        raise ConfigError(f"strategy.mu={s.mu} is FedProx's proximal weight, which strategy={s.name} ignores; "
                          "use strategy=fedprox, or leave strategy.mu at 0")
    if s.lr_schedule != "constant" and not (spec.server_optimizer or settings.privacy.distributed):
        optimizers = sorted(n for n, other in STRATEGIES.items() if other.server_optimizer)
        raise ConfigError(f"strategy.lr_schedule={s.lr_schedule} schedules a server optimiser's learning rate, "
                          f"and strategy={s.name} has none; use one of {optimizers} or strategy.lr_schedule=constant")
    spec.check(settings)
    if settings.privacy.distributed:
        check_distributed(spec, settings)
    return spec


def build_strategy(settings: RunSettings, initial: Parameters, evaluate_fn: EvaluateFn | None = None) -> Strategy:
    """The run's strategy, starting from the `initial` adapter, with client-level DP around it if configured.

    Raises:
        ConfigError: see check_strategy.
    """
    spec = check_strategy(settings)
    privacy, fed = settings.privacy, settings.federation
    if privacy.distributed:  # the mode's own aggregation: one central DP-SGD step
        return build_central_dp_sgd(spec, settings, initial, evaluate_fn)
    strategy = spec.build_strategy(settings, initial, evaluate_fn)
    if privacy.client_level:
        strategy = ClientLevelDP(strategy, clipping_norm=privacy.update_clipping_norm,
                                 noise_multiplier=privacy.update_noise_multiplier,
                                 sample_rate=fed.clients_per_round / fed.num_clients,
                                 delta=resolve_delta(privacy, fed.num_clients))  # the privacy unit: one client
    return strategy


def strategy_layers(strategy: Strategy) -> list[Strategy]:
    """The wrappers from the outside in, then the strategy they wrap (each wrapper keeps it as `inner`)."""
    layers = [strategy]
    while hasattr(layers[-1], "inner"):
        layers.append(layers[-1].inner)
    return layers
