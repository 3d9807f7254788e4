"""The server's half of privacy=distributed_dp_sgd: decode the round's noisy gradient sum, take one DP-SGD step."""

from __future__ import annotations

import numpy as np
import torch
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedlm.distributed_dp import decode_sum, grid_step
from fedlm.settings import ConfigError, RunSettings
from fedlm.training import make_optimizer
from strategies.fedavg import fedavg_options
from strategies.server_opt import server_learning_rate
from strategies.spec import EvaluateFn, StrategySpec


class CentralDPSGD(FedAvg):
    """FedAvg's sampling and evaluation; aggregation is one step of `train.optimizer` on the global adapter along
    the mean noisy gradient: the unmasked sum of the clients' shares over the expected batch of the round. Its
    learning rate follows `strategy.lr_schedule` (cosine: from train.learning_rate down over the rounds).

    The sum already carries the full noise (fedlm/distributed_dp.py), so the step, and any optimiser state built
    from it, is post-processing: the server's optimiser costs no privacy, whichever it is.
    """

    def __init__(self, settings: RunSettings, **options) -> None:
        super().__init__(**options)
        self.grid = grid_step(settings)
        self.train = settings.train
        self.schedule, self.rounds = settings.strategy.lr_schedule, settings.federation.rounds
        self.sample_rate = settings.privacy.sample_rate
        self.weights = [torch.nn.Parameter(torch.from_numpy(a.astype(np.float32)))
                        for a in parameters_to_ndarrays(options["initial_parameters"])]
        self.optimizer = make_optimizer(self.weights, settings.train)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        if not results:
            return None, {}
        # SecAgg+ replaced every result's arrays by the same mean of the len(results) unmasked shares.
        sums = decode_sum(parameters_to_ndarrays(results[0][1].parameters), len(results), self.grid)
        expected_batch = self.sample_rate * sum(int(res.metrics["sequences"]) for _, res in results)
        for weight, total in zip(self.weights, sums):
            weight.grad = torch.from_numpy(total / expected_batch).to(weight.dtype)
        norm = float(torch.sqrt(sum((w.grad.double() ** 2).sum() for w in self.weights)))
        lr = server_learning_rate(self.train.learning_rate, self.schedule, server_round, self.rounds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (ndarrays_to_parameters([w.detach().numpy().copy() for w in self.weights]),
                {"expected_batch": expected_batch, "noisy_gradient_norm": norm, "server_learning_rate": lr})

    def state_dict(self) -> dict[str, np.ndarray]:
        """The global adapter the optimiser steps and its state (momentum, or Adam's moments and step count)."""
        state = {f"weights.{i}": w.detach().numpy().copy() for i, w in enumerate(self.weights)}
        for i, w in enumerate(self.weights):
            for key, value in self.optimizer.state.get(w, {}).items():
                if value is not None:
                    state[f"{key}.{i}"] = np.array(value.detach().numpy() if torch.is_tensor(value) else value)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned.

        Raises:
            ValueError: the arrays do not fit this adapter, or the optimiser state is not this optimiser's.
        """
        weights = [state.get(f"weights.{i}") for i in range(len(self.weights))]
        if any(a is None or a.shape != tuple(w.shape) for a, w in zip(weights, self.weights)):
            raise ValueError("the saved global adapter does not fit this run's adapter: was it saved with another "
                             "model, lora.r or strategy?")
        saved = {key.rsplit(".", 1)[0] for key in state if not key.startswith("weights.")}
        kept = _state_keys(self.train)
        if saved and saved != kept:
            raise ValueError(f"the saved server optimiser state holds {sorted(saved)}, but train.optimizer="
                             f"{self.train.optimizer} keeps {sorted(kept)}")
        for i, (w, a) in enumerate(zip(self.weights, weights)):
            w.data.copy_(torch.from_numpy(np.asarray(a, np.float32)))
            if saved:
                self.optimizer.state[w] = {key: torch.tensor(state[f"{key}.{i}"]) for key in saved}


def _state_keys(train) -> set[str]:
    """The per-parameter state `train.optimizer` keeps once it has stepped (found by stepping a throwaway one)."""
    probe = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([probe], train)
    probe.grad = torch.zeros(1)
    optimizer.step()
    return {key for key, value in optimizer.state[probe].items() if value is not None}


def build_central_dp_sgd(spec: StrategySpec, settings: RunSettings, initial: Parameters,
                         evaluate_fn: EvaluateFn | None = None) -> CentralDPSGD:
    return CentralDPSGD(settings, **fedavg_options(spec, settings, initial, evaluate_fn))


def check_distributed(spec: StrategySpec, settings: RunSettings) -> None:
    """privacy=distributed_dp_sgd replaces the strategy's aggregation by a central DP-SGD step."""
    if spec.proximal or spec.server_optimizer:
        raise ConfigError(f"privacy=distributed_dp_sgd takes one central DP-SGD step per round with "
                          f"train.optimizer={settings.train.optimizer} on the server, which strategy={spec.name} "
                          "would replace; use strategy=fedavg (or frozen_a), and train.optimizer for the step")
