"""One client's local LoRA training and held-out evaluation on its private data (the heavy half of the ClientApp).

Imported only by messages that train or evaluate: see client/app.py."""

from __future__ import annotations

import functools
import math
import secrets
from pathlib import Path

import numpy as np
import torch
from flwr.client import NumPyClient
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlm.adapter import WireFormat
from fedlm.data.preparation import ClientData, client_data_path, prepare_device_data
from fedlm.model import apply_lora, load_base_model
from fedlm.distributed_dp import encode_share, grid_step, rounded_sensitivity, secret_rng
from fedlm.ledger import LedgerParameters, PrivacyLedger, Spend
from fedlm.plan import plan_privacy
from fedlm.privacy import clip_update, clipped_gradient_sum, poisson_batches, train_local_dp
from fedlm.protocol import DECLINES, FROZEN_A, PROXIMAL_MU, ROUND, BudgetExceeded
from fedlm.settings import ConfigError, LoraSettings, ModelSettings, RunSettings
from fedlm.training import TrainResult, evaluate, perplexity, train_local


# A few entries, not one: the virtual clients a worker serves may train different ranks (lora.client_ranks),
# and one slot would reload the base model at every switch. Each entry holds its own copy of the base.
@functools.lru_cache(maxsize=4)
def worker_model(model: ModelSettings, lora: LoraSettings, seed: int, cache_dir: str, frozen_a: bool = False,
                 rank: int | None = None) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Base model + adapter of `rank` (None: lora.r), loaded once per worker process and reused by every round
    and client it serves."""
    base, tokenizer = load_base_model(model, cache_dir)
    return apply_lora(base, lora, seed, frozen_a=frozen_a, rank=rank), tokenizer


@functools.lru_cache(maxsize=8)
def simulation_data(output_dir: str, partition_id: int) -> ClientData:
    """A virtual client's prepared partition (written by the launcher before the run starts)."""
    return ClientData.load(client_data_path(Path(output_dir) / "data", partition_id))


class LoraClient(NumPyClient):
    """Trains the shared adapter on local data; only adapter tensors and counts ever leave."""

    def __init__(self, settings: RunSettings, partition_id: int, node_config: dict, run_id: int = 0) -> None:
        self.settings = settings
        self.partition_id = partition_id
        self.node_config = node_config
        self.run_id = run_id
        torch.set_num_threads(settings.federation.cpus_per_client)
        self.rank = settings.lora.client_rank(partition_id, node_config.get("lora-rank"))

    def load(self, config: dict) -> None:
        """The model and data for one instruction; the strategy's instructions say whether A stays frozen."""
        settings, frozen_a = self.settings, bool(config.get(FROZEN_A, False))
        if frozen_a and self.rank < settings.lora.r:  # strategies/fedavg.py refuses this for client_ranks
            raise ConfigError(f"client {self.partition_id}: lora-rank={self.rank} below lora.r={settings.lora.r} "
                              "cannot rebuild strategy=frozen_a's global A; use this device's full rank")
        # At full rank no rank argument: lru_cache keys on the call's exact arguments, so this shares the entry
        # of callers that never pass one.
        lower = (self.rank,) if self.rank < settings.lora.r else ()
        self.model, tokenizer = worker_model(settings.model, settings.lora, settings.seed, settings.cache_dir,
                                             frozen_a, *lower)
        self.wire = WireFormat.of(self.model, settings.lora.r, frozen_a=frozen_a, secure=settings.secagg.enabled)
        data_path = self.node_config.get("data-path")
        if data_path:  # a device: its own private text, tokenized once and cached in its state directory
            self.data = prepare_device_data(str(data_path), settings, tokenizer, self.state_dir / "data")
        else:
            self.data = simulation_data(settings.output_dir, self.partition_id)

    @property
    def state_dir(self) -> Path:
        """The device's own directory (node config `state-dir`), or the run's folder in simulation."""
        state_dir = self.node_config.get("state-dir")
        return Path(str(state_dir)) if state_dir else Path(self.settings.output_dir)

    @property
    def ledger(self) -> PrivacyLedger:
        """The file this client keeps its privacy spend in: the device's state directory, or the run's."""
        owner = f"client {self.partition_id}"
        if self.node_config.get("state-dir"):
            return PrivacyLedger(self.state_dir / "privacy_ledger.json", owner)
        return PrivacyLedger(Path(self.settings.output_dir) / "privacy" / f"client_{self.partition_id}.json", owner)

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        self.load(config)
        return self.wire.to_arrays(self.model)

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        self.load(config)
        self.wire.load(self.model, parameters)
        server_round, prox_mu = int(config.get(ROUND, 0)), float(config.get(PROXIMAL_MU, 0.0))
        if self.settings.privacy.distributed:
            return self.noisy_gradient_share(server_round)
        if self.settings.privacy.enabled:
            result, metrics = self.train_private(server_round, prox_mu)
        else:
            self.check_privacy_floor(None)
            # A distinct, reproducible stream per (run seed, round, client).
            seed = self.settings.seed * 1_000_003 + server_round * 1_009 + self.partition_id
            result = train_local(self.model, self.data.train, self.data.train_mask, self.settings.train, seed,
                                 prox_mu=prox_mu)
            metrics = {}
        # "round" lets the server drop a reply that answers an earlier round's instructions.
        metrics |= {"train_loss": result.loss, "train_seconds": result.seconds,
                    "train_tokens": result.tokens, "client": self.partition_id, ROUND: server_round}
        arrays = self.wire.to_arrays(self.model)
        # The weight a client may claim is capped (SecAgg+ also needs weight / cap <= 1 to avoid overflow).
        weight = min(len(self.data.train), self.settings.federation.max_client_weight)
        if self.settings.privacy.client_level:
            # Client-level DP bounds each client's influence: a clipped update, and an equal say for everyone.
            arrays, weight = clip_update(arrays, parameters, self.settings.privacy.update_clipping_norm), 1
        if self.settings.secagg.enabled:
            self.check_clipping_range(arrays)
        return self.wire.reply(arrays), weight, metrics

    def train_private(self, server_round: int, prox_mu: float = 0.0) -> tuple[TrainResult, dict]:
        """DP-SGD within the client's lifetime budget; the spend is on disk before the update leaves.

        Raises:
            BudgetExceeded: this round would take the client past its budget, it already trained it, or the
                run asks for less privacy than this device's floor.
        """
        privacy, train = self.settings.privacy, self.settings.train
        ledger = self.ledger
        spend = self.begin_spend(ledger, server_round, train.local_steps)
        params = spend.parameters
        # Poisson sampling must stay secret (amplification by subsampling assumes it), so it is not drawn
        # from the run's public seed.
        result = train_local_dp(self.model, self.data.train, self.data.train_mask, train, privacy,
                                noise_multiplier=params.noise_multiplier, sample_rate=params.sample_rate,
                                seed=secrets.randbits(63), prox_mu=prox_mu)
        epsilon = ledger.commit(spend)
        return result, {"epsilon": epsilon, "delta": params.delta, "noise_multiplier": params.noise_multiplier,
                        **params.plan_metrics()}

    def begin_spend(self, ledger: PrivacyLedger, server_round: int, steps: int) -> Spend:
        """Begin this round's spend: the client's privacy plan fixes its ledger on its first round, and the
        device's privacy floor is checked against the noise it would train with.

        Raises:
            BudgetExceeded: see train_private.
        """
        def lifetime_parameters() -> LedgerParameters:  # only for a new ledger: the plan, fixed once
            plan = plan_privacy(self.settings, len(self.data.train))
            self.check_privacy_floor(plan.noise_multiplier)  # before the ledger fixes a noise this device rejects
            return plan

        spend = ledger.begin(f"run {self.run_id} round {server_round}", steps, new_parameters=lifetime_parameters)
        if not spend.created:
            self.check_privacy_floor(spend.parameters.noise_multiplier)
        return spend

    def noisy_gradient_share(self, server_round: int) -> tuple[list[np.ndarray], int, dict]:
        """privacy=distributed_dp_sgd: this client's part of one central DP-SGD step. The sum of its clipped
        per-sequence gradients over a secret Poisson batch, plus its share of the noise, on SecAgg+'s grid
        (fedlm/distributed_dp.py); the spend is on disk before the share leaves.

        Only data-independent figures travel beside it (no training loss or batch size: SecAgg+ hides the
        share, and those would leak outside the accounted mechanism); its sequence count is public, as the data
        set size is in DP-SGD's normalisation.

        Raises:
            BudgetExceeded: see train_private.
        """
        settings = self.settings
        ledger = self.ledger
        spend = self.begin_spend(ledger, server_round, 1)
        params = spend.parameters
        n = len(self.data.train)
        rows = poisson_batches(n, params.sample_rate, 1, secrets.randbits(63))[0]
        gradients = clipped_gradient_sum(self.model, self.data.train, self.data.train_mask, rows, settings.train,
                                         settings.privacy)
        arrays = self.wire.gradients_to_arrays(self.model, gradients)
        grid = grid_step(settings)
        clip = rounded_sensitivity(settings.privacy.max_grad_norm, sum(a.size for a in arrays), grid)
        noise_std = params.noise_multiplier * clip / math.sqrt(params.shares)
        noisy = encode_share(arrays, noise_std, grid, secret_rng())
        epsilon = ledger.commit(spend)
        metrics = {"epsilon": epsilon, "epsilon_alone": ledger.read().own_share_epsilon(), "delta": params.delta,
                   "noise_multiplier": params.noise_multiplier, "noise_share_std": noise_std, "sequences": n,
                   "client": self.partition_id, ROUND: server_round, **params.plan_metrics()}
        # Equal weights of exactly SecAgg+'s max_weight: Flower then scales nothing and the integers go through
        # as they are; the server decodes the sum from the mean (strategies/distributed_dp.py).
        return noisy, self.settings.federation.max_client_weight, metrics

    def check_privacy_floor(self, noise_multiplier: float | None) -> None:
        """A device may demand at least some privacy (node config); a run asking for less is refused.

        Raises:
            BudgetExceeded: naming the run's setting and the device's floor.
        """
        max_epsilon, min_noise = self.node_config.get("max-epsilon"), self.node_config.get("min-noise-multiplier")
        target = self.settings.privacy.target_epsilon
        refusal = None
        if noise_multiplier is None and (max_epsilon is not None or min_noise is not None):
            refusal = "the run has privacy=disabled but this device requires differential privacy"
        elif max_epsilon is not None and target > float(max_epsilon):
            refusal = (f"the run's privacy.target_epsilon={target:g} exceeds this device's "
                       f"max-epsilon={float(max_epsilon):g}")
        elif min_noise is not None and noise_multiplier < float(min_noise):
            refusal = (f"the run's noise multiplier {noise_multiplier:.3g} (from privacy.target_epsilon={target:g}) "
                       f"is below this device's min-noise-multiplier={float(min_noise):g}")
        if refusal:
            raise BudgetExceeded(f"client {self.partition_id} {DECLINES}: {refusal}")

    def check_clipping_range(self, arrays: list[np.ndarray]) -> None:
        """Refuse to send values SecAgg+ would clip silently: the sum would be wrong without anyone knowing."""
        largest = max(float(np.abs(a).max()) for a in arrays)
        limit = self.settings.secagg.clipping_range
        if largest > limit:
            raise ValueError(f"client {self.partition_id}: an adapter value of {largest:.3g} lies outside "
                             f"secagg.clipping_range={limit}, which SecAgg+ would clip silently; raise "
                             f"secagg.clipping_range to at least {2 * largest:.3g} or lower train.learning_rate")

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        self.load(config)
        self.wire.load(self.model, parameters)
        limit = self.settings.train.max_eval_sequences
        loss, tokens = evaluate(self.model, self.data.eval[:limit], self.data.eval_mask[:limit])
        return loss, tokens, {"perplexity": perplexity(loss), "client": self.partition_id}
