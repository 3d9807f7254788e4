"""What one strategy is: its server builder, what it asks of the clients, and its compatibility rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flwr.common import Parameters
from flwr.server.strategy import Strategy

from fedlm.protocol import FROZEN_A, PROXIMAL_MU
from fedlm.settings import RunSettings

EvaluateFn = Callable[[int, list, dict], "tuple[float, dict] | None"]
Builder = Callable[["StrategySpec", RunSettings, Parameters, "EvaluateFn | None"], Strategy]


def no_rules(settings: RunSettings) -> None:
    """A strategy that combines with every other setting."""


@dataclass(frozen=True)
class StrategySpec:
    """One `strategy=NAME`: a module in strategies/ defines it and strategies/__init__.py registers it."""

    name: str
    build: Builder
    proximal: bool = False
    """Clients add FedProx's proximal term (strategy.mu) to their local objective."""
    frozen_a: bool = False
    """FFA-LoRA: every party keeps lora_A as the shared seed drew it; only lora_B is trained and travels."""
    server_optimizer: bool = False
    """The server steps an optimiser (with state, and a learning-rate schedule) along the averaged update."""
    check: Callable[[RunSettings], None] = no_rules
    """Rules of this strategy against the rest of the settings; raises ConfigError naming the fix."""

    def build_strategy(self, settings: RunSettings, initial: Parameters,
                       evaluate_fn: EvaluateFn | None = None) -> Strategy:
        return self.build(self, settings, initial, evaluate_fn)

    def client_config(self, settings: RunSettings) -> dict[str, Any]:
        """What every training and evaluation instruction tells the clients about how to train."""
        return {PROXIMAL_MU: settings.strategy.mu if self.proximal else 0.0, FROZEN_A: self.frozen_a}
