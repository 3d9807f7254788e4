"""The training maths every path shares: per-sequence loss, local LoRA steps and held-out evaluation."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedlm.settings import TrainSettings


def token_nll(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihood of every position, and which positions are real targets.

    Returns:
        (nll [B, T-1], valid [B, T-1] float): position t predicts token t+1 of the sequence.
    """
    mask = mask.to(input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    targets = input_ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).to(logits.dtype)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                          reduction="none").view_as(targets)
    return nll, valid


def sequence_losses(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean loss over its own valid tokens, shape [B].

    Every sequence weighs the same whatever its length: DP-SGD's sensitivity argument needs one sample to
    be one sequence, which the built-in `labels=` loss (weighting by token share) breaks.
    """
    nll, valid = token_nll(model, input_ids, mask)
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1.0)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX-512 BF16 or AMX, Arm BF16). Without it, torch
    emulates bf16 matmuls and they run slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: assume nothing
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str) -> str:
    """`train.precision` as this machine runs it: `auto` is bf16 where native (faster than float32 there, with
    and without DP: BENCHMARKS.md section 10), else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def autocast(precision: str) -> torch.autocast:
    """The training forward pass's compute precision (`train.precision`): bf16 runs matmuls in bfloat16;
    parameters, gradients and the loss stay float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_precision(precision) == "bf16")


def make_optimizer(params: list[nn.Parameter], train: TrainSettings) -> torch.optim.Optimizer:
    """`train.optimizer` over `params` (fresh every round: a client keeps no optimiser state between rounds).

    Under heavy DP noise Adam normalises the noise: each step moves every coordinate by about the learning rate
    whatever the signal, while momentum SGD's step scales with the (noisy) gradient itself (BENCHMARKS.md 7.2).
    """
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.learning_rate, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)


@dataclass
class TrainResult:
    loss: float
    """Mean per-sequence loss over the local steps."""
    steps: int
    sequences: int
    tokens: int
    seconds: float


def proximal_gradient(params: list[nn.Parameter], mu: float) -> Callable[[], None]:
    """FedProx: a function that adds mu (w - w0) to each `p.grad`, the gradient of (mu/2)||w - w0||^2,
    where w0 is the parameters' value now (the global adapter the round started from).

    Added to the gradient rather than to the loss, so the DP path can add it after Opacus' per-sample
    clipping and noise (see train_local_dp).
    """
    anchors = [p.detach().clone() for p in params]

    @torch.no_grad()
    def add() -> None:
        if mu > 0:
            for p, w0 in zip(params, anchors):
                if p.grad is not None:
                    p.grad.add_(p.detach() - w0, alpha=mu)

    return add


def train_local(model: nn.Module, train_ids: torch.Tensor, train_mask: torch.Tensor,
                settings: TrainSettings, seed: int, prox_mu: float = 0.0) -> TrainResult:
    """Run `settings.local_steps` steps of `settings.optimizer` on the trainable (adapter) parameters.

    Batches are drawn from a seeded permutation of the rows, cycling, so a round is reproducible.
    `prox_mu` > 0 adds FedProx's proximal term (prox_mu/2)||w - w_start||^2 to the objective.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    add_proximal = proximal_gradient(params, prox_mu)
    optimizer = make_optimizer(params, settings)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_ids), generator=generator)
    model.train()
    start, losses, tokens, cursor = time.perf_counter(), [], 0, 0
    for _ in range(settings.local_steps):
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(train_ids), generator=generator), 0
        rows = order[cursor:cursor + settings.batch_size]
        cursor += settings.batch_size
        ids, mask = train_ids[rows], train_mask[rows]
        with autocast(settings.precision):
            loss = sequence_losses(model, ids, mask).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        add_proximal()
        optimizer.step()
        losses.append(loss.item())
        tokens += int(mask.sum())
    return TrainResult(loss=sum(losses) / len(losses), steps=settings.local_steps,
                       sequences=settings.local_steps * settings.batch_size, tokens=tokens,
                       seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss over all valid held-out tokens, and how many there were.

    Token-weighted, so exp(loss) is the usual held-out perplexity.
    """
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        nll, valid = token_nll(model, ids[start:start + batch_size], mask[start:start + batch_size])
        total += float((nll * valid).sum())
        count += int(valid.sum())
    return total / max(count, 1), count


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged model reports a large number instead of overflowing."""
    return math.exp(min(loss, 50.0))
