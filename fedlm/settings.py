"""Plain, validated settings for a run: the one schema that Hydra, simulations and deployments share."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting or input is invalid; the message names the key or file, the value and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class EmbeddedBaseSettings:
    """The small Llama base model Pollinate pretrains itself on first use (offline, cached)."""

    vocab_size: int = 4096
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    context_length: int = 128
    pretrain_steps: int = 500
    """About 2 minutes on 2 quiet CPU cores (9,400 tokens/s): train loss falls from 8.3 to about 4.2."""
    batch_size: int = 16
    learning_rate: float = 3e-3
    corpus_max_chars: int = 10_000_000
    """Characters of Python standard-library source used for the tokenizer and pretraining."""
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "context_length", "pretrain_steps", "batch_size", "corpus_max_chars"):
            value = getattr(self, key)
            _check(value > 0, f"model.embedded.{key} must be > 0 (got {value})")
        _check(self.hidden_size % self.num_heads == 0,
               f"model.embedded.hidden_size ({self.hidden_size}) must be divisible by "
               f"model.embedded.num_heads ({self.num_heads})")
        _check(self.vocab_size >= 300, f"model.embedded.vocab_size must be >= 300 to hold the 256 "
               f"byte tokens and specials (got {self.vocab_size}); try 4096")


@dataclass(frozen=True)
class ModelSettings:
    """Which causal LM to fine-tune."""

    name_or_path: str = "embedded"
    """`embedded` (built offline on first use), a local directory, or a Hugging Face hub id."""
    dtype: str = "float32"
    trust_remote_code: bool = False
    embedded: EmbeddedBaseSettings = field(default_factory=EmbeddedBaseSettings)

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path.strip()),
               "model.name_or_path is empty; use `embedded`, a local model directory or a hub id")
        _check(self.dtype in ("float32", "bfloat16"),
               f"model.dtype={self.dtype!r} is not supported; choose float32 or bfloat16")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter that is trained and federated (PEFT)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    """Empty: chosen per architecture (all linear projections; GPT-2's c_attn/c_proj/c_fc)."""
    client_ranks: tuple[int, ...] = ()
    """Heterogeneous ranks (simulation): client i trains rank client_ranks[i % len], each <= r (the global
    adapter's rank). Empty: everyone uses r. A deployed device sets its own with node config `lora-rank`."""

    def __post_init__(self) -> None:
        _check(self.r > 0, f"lora.r must be > 0 (got {self.r}); try 8")
        for rank in self.client_ranks:
            check_client_rank(rank, self.r, "lora.client_ranks")
        _check(self.alpha > 0, f"lora.alpha must be > 0 (got {self.alpha}); try 2 * lora.r")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1) (got {self.dropout})")
        _check("lm_head" not in self.target_modules,
               "lora.target_modules must not contain lm_head: it is tied to the embeddings in small "
               "models and would make the adapter as large as the vocabulary")

    def client_rank(self, partition_id: int, node_rank: Any = None) -> int:
        """The LoRA rank one client trains: its node config `lora-rank`, else lora.client_ranks, else r.

        Raises:
            ConfigError: the rank is not a whole number in [1, lora.r].
        """
        if node_rank is not None:
            try:
                rank = int(node_rank)
            except (TypeError, ValueError):
                raise ConfigError(f"node config lora-rank={node_rank!r} must be a whole number") from None
            return check_client_rank(rank, self.r, "node config lora-rank")
        return self.client_ranks[partition_id % len(self.client_ranks)] if self.client_ranks else self.r


def check_client_rank(rank: int, r_max: int, key: str) -> int:
    # The global adapter has rank lora.r and every update is zero-padded to it: a larger rank has no room.
    _check(0 < rank <= r_max, f"{key}: a client rank of {rank} is outside [1, lora.r={r_max}]; the global "
           f"adapter's rank lora.r must be the largest, so raise lora.r to {rank} or lower the client's rank")
    return rank


DATA_SOURCES = ("auto", "packages", "text_folder", "jsonl", "huggingface")
PARTITIONERS = ("auto", "natural", "iid", "dirichlet")


@dataclass(frozen=True)
class DatasetSettings:
    """Where the clients' private text comes from and how it is split among them."""

    source: str = "auto"
    """`auto`: `huggingface` if hf_name is set, else from `path` (folder -> text_folder, file -> jsonl),
    else `packages` (each client holds the source code of one installed third-party package)."""
    path: str = ""
    hf_name: str = ""
    hf_split: str = "train"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n{response}"
    partitioner: str = "auto"
    """`auto`: natural (one client per source) for installed packages, iid otherwise."""
    partition_by: str = "source"
    """The record field that natural and Dirichlet partitioning split by (each record's origin)."""
    dirichlet_alpha: float = 0.5
    eval_fraction: float = 0.1
    seq_len: int = 128
    max_chars_per_source: int = 400_000
    """Cap on one package's / file's text, so one huge source cannot dominate tokenising time."""
    min_train_sequences: int = 8
    min_eval_sequences: int = 2

    def __post_init__(self) -> None:
        _check(self.source in DATA_SOURCES,
               f"dataset.source={self.source!r} is unknown; choose one of {list(DATA_SOURCES)}")
        _check(self.partitioner in PARTITIONERS,
               f"dataset.partitioner={self.partitioner!r} is unknown; choose one of {list(PARTITIONERS)}")
        _check(0 < self.eval_fraction < 1,
               f"dataset.eval_fraction must be in (0, 1) (got {self.eval_fraction}); try 0.1")
        _check(self.dirichlet_alpha > 0, f"dataset.dirichlet_alpha must be > 0 (got {self.dirichlet_alpha})")
        _check(self.seq_len >= 8, f"dataset.seq_len must be >= 8 tokens (got {self.seq_len}); try 128")
        for key in ("max_chars_per_source", "min_train_sequences", "min_eval_sequences"):
            _check(getattr(self, key) > 0, f"dataset.{key} must be > 0 (got {getattr(self, key)})")
        if self.source in ("text_folder", "jsonl"):
            _check(bool(self.path), f"dataset.source={self.source} needs dataset.path=<a "
                   f"{'folder of .txt files' if self.source == 'text_folder' else '.jsonl file'}>")
        if self.source == "huggingface":
            _check(bool(self.hf_name), "dataset.source=huggingface needs dataset.hf_name=<hub dataset id>")
        if self.source == "jsonl" or (self.source == "auto" and self.path):
            _check("{prompt}" in self.template and "{response}" in self.template,
                   f"dataset.template must contain {{prompt}} and {{response}} (got {self.template!r})")

    def resolved_source(self) -> str:
        """The concrete source `auto` stands for."""
        if self.source != "auto":
            return self.source
        if self.hf_name:
            return "huggingface"
        if self.path:
            # os.path.isdir, unlike Path.is_dir, answers False where a parent folder may not be entered:
            # loading the data then names the path and the reason.
            return "text_folder" if os.path.isdir(Path(self.path).expanduser()) else "jsonl"
        return "packages"

    def resolved_partitioner(self) -> str:
        """The concrete partitioner `auto` stands for."""
        if self.partitioner != "auto":
            return self.partitioner
        return "natural" if self.resolved_source() == "packages" else "iid"


PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd")
"""`train.optimizer` choices; fedlm/training.py `make_optimizer` builds them."""
AUTO = "auto"


@dataclass(frozen=True)
class TrainSettings:
    """One client's local training in a round. conf/privacy/*.yaml set the batch, optimiser and learning rate,
    since the DP path needs its own (BENCHMARKS.md section 7.2)."""

    local_steps: int = 10
    batch_size: int | str = AUTO
    """Sequences per step (under DP-SGD: the expected size of a Poisson batch), or `auto` under DP-SGD: each
    client's privacy plan picks it from its data size and budget (fedlm/plan.py)."""
    optimizer: str = "sgd"
    """`adamw` or `sgd` (with `train.momentum`)."""
    learning_rate: float = 0.1
    momentum: float = 0.9
    """`sgd` only: heavy-ball momentum."""
    weight_decay: float = 0.0
    max_eval_sequences: int = 64
    """Held-out sequences a client evaluates on (the same ones every round)."""
    precision: str = "auto"
    """Training compute: `fp32`, `bf16` (CPU autocast: matmuls in bfloat16; weights, adapter, optimizer,
    loss and DP clipping and noise stay float32), or `auto`: bf16 where the CPU computes it natively, else
    fp32 (each device decides for itself). Evaluation is always float32."""

    def __post_init__(self) -> None:
        for key in ("local_steps", "max_eval_sequences"):
            _check(getattr(self, key) > 0, f"train.{key} must be > 0 (got {getattr(self, key)})")
        _check(self.batch_size == AUTO or (isinstance(self.batch_size, int) and self.batch_size > 0),
               f"train.batch_size must be a whole number > 0 or auto (got {self.batch_size!r})")
        _check(self.precision in PRECISIONS,
               f"train.precision={self.precision!r} is unknown; choose one of {list(PRECISIONS)}")
        _check(self.optimizer in OPTIMIZERS,
               f"train.optimizer={self.optimizer!r} is unknown; choose one of {list(OPTIMIZERS)}")
        _check(self.learning_rate > 0, f"train.learning_rate must be > 0 (got {self.learning_rate}); try 1e-2")
        _check(0 <= self.momentum < 1, f"train.momentum must be in [0, 1) (got {self.momentum}); try 0.9")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {self.weight_decay})")


@dataclass(frozen=True)
class FederationSettings:
    """Who takes part, and for how long."""

    num_clients: int = 8
    clients_per_round: int = 4
    rounds: int = 10
    cpus_per_client: int = 1
    """CPU cores one client may use: its torch threads, and the simulation's parallelism hint."""
    max_client_weight: int = 1000
    """The most training sequences one client's update may count for in the weighted average."""

    def __post_init__(self) -> None:
        for key in ("num_clients", "clients_per_round", "rounds", "cpus_per_client", "max_client_weight"):
            _check(getattr(self, key) > 0, f"federation.{key} must be > 0 (got {getattr(self, key)})")
        _check(self.clients_per_round <= self.num_clients,
               f"federation.clients_per_round ({self.clients_per_round}) exceeds federation.num_clients "
               f"({self.num_clients}); lower it or add clients")


PRIVACY_MODES = ("disabled", "dp_sgd", "distributed_dp_sgd")
ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class PrivacySettings:
    """Sample-level differential privacy of each client's local training (Opacus DP-SGD on the adapter)."""

    name: str = "dp_sgd"
    """`dp_sgd` (each client runs DP-SGD locally), `distributed_dp_sgd` (one central DP-SGD step per round, its
    noise added in shares by the clients under SecAgg+: fedlm/distributed_dp.py) or `disabled`."""
    target_epsilon: float = 8.0
    """Lifetime budget of one client, over every round it ever joins."""
    delta: float = 0.0
    """0: min(1e-5, 1/n) for a client holding n training sequences (the privacy unit is one sequence)."""
    noise_multiplier: float = 0.0
    """0: each client's privacy plan calibrates it once, from target_epsilon, over the rounds it will join."""
    max_grad_norm: float = 1.0
    """Per-sequence gradient clipping bound C."""
    horizon_rounds: int = 0
    """Rounds a client plans its budget for; 0: the most the server's sampling asks of any client (fedlm/plan.py)."""
    max_physical_batch_size: int = 16
    """Poisson batches larger than this are processed in chunks (memory), as one logical step."""
    max_auto_batch: int = 32
    """The largest expected batch `train.batch_size=auto` may plan (each step's compute grows with it)."""
    accountant: str = "prv"
    """`prv` (tight; falls back to `rdp` where PRV fails) or `rdp` (a looser but valid bound)."""
    sample_rate: float = 0.05
    """`distributed_dp_sgd` only: the probability with which every client samples each of its sequences in every
    round it joins. The same for all clients, so all of them compute the same noise multiplier."""
    update_clipping_norm: float = 0.0
    """Client-level DP, a second layer: each client clips its whole adapter update to this L2 norm and the
    server adds Gaussian noise to the (uniform) average. 0: off."""
    update_noise_multiplier: float = 1.0
    """Client-level noise: std = this x update_clipping_norm on the sum of the clipped updates."""

    def __post_init__(self) -> None:
        _check(self.name in PRIVACY_MODES,
               f"privacy={self.name!r} is unknown; choose one of {list(PRIVACY_MODES)}")
        _check(self.accountant in ACCOUNTANTS,
               f"privacy.accountant={self.accountant!r} is unknown; choose one of {list(ACCOUNTANTS)} "
               "(the GDP accountant can under-report and is not offered)")
        _check(self.target_epsilon > 0, f"privacy.target_epsilon must be > 0 (got {self.target_epsilon}); try 8")
        _check(0 <= self.delta < 1, f"privacy.delta must be in [0, 1) (got {self.delta}); 0 picks min(1e-5, 1/n)")
        _check(self.noise_multiplier >= 0,
               f"privacy.noise_multiplier must be >= 0 (got {self.noise_multiplier}); 0 calibrates it")
        _check(self.max_grad_norm > 0, f"privacy.max_grad_norm must be > 0 (got {self.max_grad_norm}); try 1.0")
        _check(self.horizon_rounds >= 0, f"privacy.horizon_rounds must be >= 0 (got {self.horizon_rounds})")
        _check(self.update_clipping_norm >= 0,
               f"privacy.update_clipping_norm must be >= 0 (got {self.update_clipping_norm}); 0 turns it off")
        _check(self.update_noise_multiplier > 0 or self.update_clipping_norm == 0,
               f"privacy.update_noise_multiplier must be > 0 (got {self.update_noise_multiplier}); try 1.0")
        _check(self.max_physical_batch_size > 0,
               f"privacy.max_physical_batch_size must be > 0 (got {self.max_physical_batch_size})")
        _check(self.max_auto_batch > 0, f"privacy.max_auto_batch must be > 0 (got {self.max_auto_batch})")
        _check(0 < self.sample_rate <= 1, f"privacy.sample_rate must be in (0, 1] (got {self.sample_rate}); try 0.05")

    @property
    def enabled(self) -> bool:
        """Sample-level DP-SGD, on either path."""
        return self.name != "disabled"

    @property
    def distributed(self) -> bool:
        """One DP-SGD step per round over the union of the sampled clients' data, noised in shares."""
        return self.name == "distributed_dp_sgd"

    @property
    def client_level(self) -> bool:
        return self.update_clipping_norm > 0


SECAGG_MODULUS = 2**40
"""SecAgg+'s arithmetic modulus: room for 1,023 clients' sums at 2^30 levels, far from int64's limit."""


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation of the adapters with Flower's SecAgg+: the server learns only their weighted sum."""

    name: str = "secaggplus"
    """`secaggplus` or `disabled`."""
    num_shares: int = 5
    """Neighbours each client secret-shares with: a fixed odd number, so cost grows linearly with the cohort."""
    reconstruction_threshold: int = 3
    """Shares needed to unmask a client: how many neighbours may drop out (num_shares - threshold)."""
    clipping_range: float = 8.0
    """Adapter values must lie in [-c, c]; a client refuses (never clips silently) if one does not."""
    quantization_range: int = 2**30
    """Levels over [-c, c]: a step of 1.5e-8 at c = 8. Flower's default 2^22 (3.8e-6) is too coarse once a
    value is scaled by a small weight (n / max_client_weight) before quantization: seen 3e-5 off plain FedAvg."""
    timeout: float = 0.0
    """Seconds each protocol stage waits for replies; a slow client is dropped instead of blocking the round.
    0: server.round_timeout, since clients train inside the masked-vector stage and a shorter bound would drop
    every client whose training takes longer (seen: 120 s dropped all 5 DP clients of a round on a slow CPU)."""

    def __post_init__(self) -> None:
        _check(self.name in ("disabled", "secaggplus"),
               f"secagg={self.name!r} is unknown; choose secaggplus or disabled")
        _check(self.num_shares >= 3 and self.num_shares % 2 == 1,
               f"secagg.num_shares must be an odd whole number >= 3 (got {self.num_shares}); try 5")
        _check(2 <= self.reconstruction_threshold <= self.num_shares,
               f"secagg.reconstruction_threshold must be in [2, secagg.num_shares={self.num_shares}] "
               f"(got {self.reconstruction_threshold}); try {self.num_shares // 2 + 1}")
        _check(self.clipping_range > 0, f"secagg.clipping_range must be > 0 (got {self.clipping_range}); try 8.0")
        _check(self.quantization_range >= 2, f"secagg.quantization_range must be >= 2 (got {self.quantization_range})")
        _check(self.timeout >= 0, f"secagg.timeout must be >= 0 seconds (got {self.timeout}); 0 uses server.round_timeout")

    @property
    def enabled(self) -> bool:
        return self.name == "secaggplus"


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class StrategySettings:
    """How the server combines the clients' adapters: the parameters of every strategy (strategies/ holds each one's
    rules, which check these against the rest of the settings)."""

    name: str = "fedavg"
    mu: float = 0.0
    """FedProx: weight of the proximal term (mu/2)||w - w_global||^2 in local training; only fedprox reads it."""
    server_learning_rate: float = 0.01
    """Server optimisers' eta. A LoRA B entry moves by about 1e-2 per round under the default local training,
    and an adaptive step moves every entry by about eta, so eta ~ 1e-2 keeps the server step of that size."""
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 0.001
    """Adaptivity floor in eta * m / (sqrt(v) + tau): 1e-3 as in Reddi et al. 2021; Flower's 1e-9 turns an
    update of 1e-6 into a full step of eta."""
    lr_schedule: str = "constant"
    """`constant` or `cosine` (eta down to about 0 over federation.rounds); server optimisers only."""

    def __post_init__(self) -> None:
        _check(self.lr_schedule in LR_SCHEDULES,
               f"strategy.lr_schedule={self.lr_schedule!r} is unknown; choose one of {list(LR_SCHEDULES)}")
        _check(self.mu >= 0, f"strategy.mu must be >= 0 (got {self.mu}); try 0.01")
        _check(self.server_learning_rate > 0,
               f"strategy.server_learning_rate must be > 0 (got {self.server_learning_rate}); try 0.01")
        _check(0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1,
               f"strategy.beta_1 and strategy.beta_2 must be in [0, 1) (got {self.beta_1}, {self.beta_2}); try 0.9, 0.99")
        _check(self.tau > 0, f"strategy.tau must be > 0 (got {self.tau}); try 0.001")


@dataclass(frozen=True)
class ServerSettings:
    """Server-side evaluation and checkpoints."""

    save_every: int = 0
    """Save the global adapter every N rounds (0: only at the end)."""
    central_eval_path: str = ""
    """Optional server-side held-out text (a folder of .txt files or a .jsonl file)."""
    round_timeout: float = 600.0
    """Seconds the server waits for training and evaluation replies in one round; late replies are dropped."""
    min_replies: int = 2
    """Valid training replies below which a round is abandoned and the global adapter stays unchanged. At least
    2: a sum of one update is that update, and publishing it would expose that client. Under
    privacy=distributed_dp_sgd it is K_min, the fewest noise shares a published sum may hold."""
    eval_every: int = 1
    """Federated evaluation every N rounds (and at the last); rounds of one DP-SGD step each need fewer."""

    def __post_init__(self) -> None:
        _check(self.save_every >= 0, f"server.save_every must be >= 0 (got {self.save_every})")
        _check(self.round_timeout > 0, f"server.round_timeout must be > 0 seconds (got {self.round_timeout})")
        _check(self.eval_every > 0, f"server.eval_every must be > 0 (got {self.eval_every})")
        _check(self.min_replies >= 2, f"server.min_replies must be >= 2 (got {self.min_replies}): a round "
               "published from one reply is that client's update")


DEPLOYMENTS = ("simulation", "superlink")


@dataclass(frozen=True)
class DeploymentSettings:
    """Where a run executes: Flower's Simulation Engine, or a real SuperLink that devices connect to."""

    name: str = "simulation"
    """`simulation` (one machine, virtual clients) or `superlink` (TLS, authenticated devices; deploy/README.md)."""
    host: str = "127.0.0.1"
    """Address the SuperLink binds; 0.0.0.0 accepts devices on other machines."""
    port: int = 9092
    """The SuperLink's one HTTPS port (Fleet, Control and Runtime APIs); devices connect to it."""
    address: str = ""
    """How the launcher reaches the SuperLink (a name in the server certificate); empty: 127.0.0.1:port."""
    pki_dir: str = "pki"
    """From `python -m server.provision init`: ca.pem, server.pem/server.key, devices/, authorized.txt."""
    state_dir: str = "superlink"
    """The SuperLink's database (registrations and runs survive restarts), the Flower CLI's home, its log."""
    connect_timeout: float = 600.0
    """Seconds to wait for federation.num_clients devices to come online before giving up."""

    def __post_init__(self) -> None:
        _check(self.name in DEPLOYMENTS,
               f"deployment={self.name!r} is unknown; choose one of {list(DEPLOYMENTS)}")
        _check(0 < self.port < 65536, f"deployment.port must be in [1, 65535] (got {self.port}); try 9092")
        _check(bool(self.host.strip()), "deployment.host is empty; use 127.0.0.1 (this machine) or 0.0.0.0")
        _check(self.connect_timeout > 0, f"deployment.connect_timeout must be > 0 seconds (got {self.connect_timeout})")

    @property
    def superlink_address(self) -> str:
        return self.address or f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class RunSettings:
    """Everything one federated run needs, after Hydra has composed it."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    deployment: DeploymentSettings = field(default_factory=DeploymentSettings)
    seed: int = 0
    output_dir: str = "outputs/run"
    """Where metrics, the adapter, the report and the prepared client data go."""
    cache_dir: str = ""
    """Where built base models are kept between runs; empty: $POLLINATE_CACHE or ~/.cache/pollinate."""
    resume: str = ""
    """A run directory to continue from its last committed round (empty: start a new run)."""

    def __post_init__(self) -> None:
        fed, secagg = self.federation, self.secagg
        _check(self.privacy.enabled or self.train.batch_size != AUTO,
               "train.batch_size=auto is chosen by each client's privacy plan, and privacy=disabled has none; "
               "set a number, e.g. train.batch_size=32")
        _check(self.train.batch_size != AUTO or self.privacy.noise_multiplier == 0,
               f"privacy.noise_multiplier={self.privacy.noise_multiplier:g} fixes the noise, so the privacy plan "
               "cannot choose train.batch_size=auto for the budget; set a batch too, or privacy.noise_multiplier=0")
        _check(self.server.min_replies <= fed.clients_per_round,
               f"server.min_replies={self.server.min_replies} exceeds federation.clients_per_round="
               f"{fed.clients_per_round}: no round could ever complete; sample at least {self.server.min_replies} "
               "clients per round")
        if self.privacy.distributed:
            _check(secagg.enabled, "privacy=distributed_dp_sgd adds each client's share of the noise under secure "
                   "aggregation: without it the server would see every share, each far too little noise alone; "
                   "use secagg=secaggplus, or privacy=dp_sgd")
            _check(not self.privacy.client_level, "privacy=distributed_dp_sgd sends gradient sums, not updates, "
                   "so client-level DP's update clipping does not apply; set privacy.update_clipping_norm=0")
        if secagg.enabled:
            _check(secagg.timeout <= self.server.round_timeout,
                   f"secagg.timeout={secagg.timeout:g} exceeds server.round_timeout={self.server.round_timeout:g}: a "
                   "round would outlast its budget; lower it, or set secagg.timeout=0 to use the round's budget")
            shares = min(secagg.num_shares, fed.clients_per_round)
            _check(secagg.reconstruction_threshold <= shares,
                   f"secagg.reconstruction_threshold={secagg.reconstruction_threshold} exceeds the "
                   f"{shares} shares a client can have with federation.clients_per_round={fed.clients_per_round}; "
                   f"lower it to at most {shares}")
            # Masked sums live modulo SECAGG_MODULUS: the sum of every client's quantized values must fit.
            _check(fed.clients_per_round * secagg.quantization_range < SECAGG_MODULUS,
                   f"federation.clients_per_round={fed.clients_per_round} x secagg.quantization_range="
                   f"{secagg.quantization_range} overflows SecAgg+'s 2^40 modulus; lower the quantization range")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSettings:
        return settings_from_dict(cls, json.loads(text))


def settings_from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build settings dataclass `cls` from a plain mapping, rejecting unknown keys and wrong types.

    Raises:
        ConfigError: naming the full key, the bad value and (for a misspelt key) the closest valid one.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'settings'} must be a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown setting {prefix}{key}{hint}")
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return settings_from_dict(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (got {value!r})")
        return tuple(_convert(typing.get_args(hint)[0], v, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        for member in members[:-1]:  # the first member the value fits, e.g. int | str: 32 or "auto"
            with contextlib.suppress(ConfigError):
                return _convert(member, value, key)
        hint = members[-1]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        if not math.isfinite(value):  # inf passes every "> 0" check and fails deep inside training instead
            raise ConfigError(f"{key} must be a finite number (got {value!r})")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be text (got {value!r})")
        return str(value)
    return value


def settings_from_run_config(run_config: dict[str, Any]) -> RunSettings:
    """The settings a Flower app was started with: one JSON value under `settings` (empty: defaults).

    Raises:
        ConfigError: the JSON is malformed or holds an invalid setting.
    """
    text = str(run_config.get("settings", "") or "")
    if not text:
        return RunSettings()
    try:
        return RunSettings.from_json(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"run_config key `settings` is not valid JSON ({err}); produce it with "
                          "RunSettings.to_json() or `python -m simulations.run --cfg job`") from None


# What a resumed run must keep: the model, its data, its privacy promises and how updates are combined.
RESUME_FIXED = ("model.", "lora.", "dataset.", "privacy.", "strategy.", "seed", "federation.num_clients")


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(original: RunSettings, resumed: RunSettings, run_dir: str) -> None:
    """Refuse to resume with settings that would change what the run trains or promises.

    Raises:
        ConfigError: naming the first differing key, both values and the fix.
    """
    before, after = _flat(dataclasses.asdict(original)), _flat(dataclasses.asdict(resumed))
    for key in sorted(before):
        if key.startswith(RESUME_FIXED) and before[key] != after.get(key):
            raise ConfigError(f"resume={run_dir}: {key} was {before[key]!r} in that run and is {after.get(key)!r} "
                              "now; a resumed run keeps its model, data, privacy and strategy settings (drop the "
                              "override, or start a new run)")
