"""Server optimisers (FedAdam, FedYogi, FedAdagrad) on the averaged adapter update, with a learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
from flwr.common import Parameters
from flwr.server.strategy import FedAdagrad, FedAdam, FedYogi

from fedlm.settings import ConfigError, RunSettings
from strategies.fedavg import fedavg_options
from strategies.spec import EvaluateFn, StrategySpec

_STATE = ("current_weights", "m_t", "v_t")


def server_learning_rate(eta: float, schedule: str, server_round: int, rounds: int) -> float:
    """eta for `server_round` (1-based): constant, or cosine from eta at round 1 to eta/2 (1 + cos(pi (T-1)/T)) at T.

    The cosine never reaches 0 within the run: a last round with eta 0 would be a round of wasted client work.

    Raises:
        ValueError: an unknown schedule.
    """
    if schedule == "constant":
        return eta
    if schedule == "cosine":
        return eta * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / rounds))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose constant or cosine")


class ServerOptimizer:
    """Mixin for Flower's FedOpt strategies: scheduled eta, and optimiser state that can be saved and restored.

    Mean-based: FedOpt's aggregate_fit first takes FedAvg's weighted mean, so it works unchanged under SecAgg+
    (which hands it results already replaced by their weighted mean).
    """

    def __init__(self, *, schedule: str, rounds: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.base_eta, self.schedule, self.rounds = self.eta, schedule, rounds

    def aggregate_fit(self, server_round, results, failures):
        self.eta = server_learning_rate(self.base_eta, self.schedule, server_round, self.rounds)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        return parameters, (dict(metrics, server_learning_rate=self.eta) if parameters is not None else metrics)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The optimiser's state as flat named arrays (`np.savez(path, **state)` stores it): the current global
        weights and the moments m_t, v_t (absent before the first aggregation)."""
        return {f"{key}.{i}": np.asarray(a) for key in _STATE for i, a in enumerate(getattr(self, key) or [])}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned (or an `np.load` of it).

        Raises:
            ValueError: the arrays do not match this strategy's adapter (count or shapes).
        """
        shapes = [a.shape for a in self.current_weights]
        restored = {}
        for key in _STATE:
            arrays = [np.array(state[f"{key}.{i}"]) for i in range(len(shapes)) if f"{key}.{i}" in state]
            if not arrays and key != "current_weights":
                restored[key] = None  # saved before the first aggregation
                continue
            if [a.shape for a in arrays] != shapes:
                raise ValueError(f"server optimiser state {key}: expected {len(shapes)} arrays of this adapter's "
                                 f"shapes, got {len(arrays)}; was it saved with another model, lora.r or strategy?")
            restored[key] = arrays
        for key, value in restored.items():
            setattr(self, key, value)


class ServerAdam(ServerOptimizer, FedAdam):
    """FedAdam (Reddi et al. 2021) on the averaged update."""


class ServerYogi(ServerOptimizer, FedYogi):
    """FedYogi: Adam with Yogi's additive second moment, steadier when updates are noisy (DP)."""


class ServerAdagrad(ServerOptimizer, FedAdagrad):
    """FedAdagrad: v_t sums every squared update, so steps shrink over rounds (beta_1, beta_2 do not apply)."""


_CLASSES = {"fedadam": ServerAdam, "fedyogi": ServerYogi, "fedadagrad": ServerAdagrad}


def build_server_optimizer(spec: StrategySpec, settings: RunSettings, initial: Parameters,
                           evaluate_fn: EvaluateFn | None = None) -> ServerOptimizer:
    s = settings.strategy
    cls = _CLASSES[spec.name]
    options = dict(eta=s.server_learning_rate, tau=s.tau)
    if cls is not ServerAdagrad:  # Adagrad has no moment decay: Flower's FedAdagrad fixes beta_1 = 0, no beta_2
        options |= dict(beta_1=s.beta_1, beta_2=s.beta_2)
    return cls(schedule=s.lr_schedule, rounds=settings.federation.rounds, **options,
               **fedavg_options(spec, settings, initial, evaluate_fn))


def _no_client_level_dp(settings: RunSettings) -> None:
    # The client-level noise must go on the mean of the clipped updates, whose sensitivity is C / k; a server
    # optimiser's step (m / (sqrt(v) + tau)) has no such bound, and ClientLevelDP noises its output.
    if settings.privacy.client_level:
        raise ConfigError(f"strategy={settings.strategy.name} cannot be combined with client-level DP "
                          f"(privacy.update_clipping_norm={settings.privacy.update_clipping_norm}): the noise is "
                          "calibrated to the plain mean of clipped updates; use strategy=fedavg, fedprox or frozen_a, "
                          "or set privacy.update_clipping_norm=0")


FEDADAM, FEDYOGI, FEDADAGRAD = (StrategySpec(name, build_server_optimizer, server_optimizer=True,
                                             check=_no_client_level_dp) for name in _CLASSES)
