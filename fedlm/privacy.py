"""Sample-level DP-SGD on the adapter and the accountant: default delta, noise calibration, epsilon, Opacus steps.

The durable per-client ledger that spends epsilon lives in fedlm/ledger.py."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

_root_handlers = list(logging.root.handlers)
from opacus.accountants import create_accountant  # noqa: E402
from opacus.grad_sample import GradSampleHooks  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from torch import nn  # noqa: E402

# Opacus calls logging.basicConfig() when imported: the root handler it adds echoes every library's debug
# records (each SecAgg+ stage of every client, for one). Undo that side effect.
for _handler in logging.root.handlers[len(_root_handlers):]:
    logging.root.removeHandler(_handler)

from fedlm import training
from fedlm.settings import ACCOUNTANTS, ConfigError, PrivacySettings, TrainSettings
from fedlm.training import TrainResult, autocast, proximal_gradient, resolve_precision, sequence_losses

log = logging.getLogger(__name__)

History = list[tuple[float, float, int]]
"""(noise_multiplier, sample_rate, steps) entries of Poisson-subsampled Gaussian steps."""

_PRV_MAX_EPSILON = 100.0


def resolve_delta(settings: PrivacySettings, n: int) -> float:
    """The configured delta, or min(1e-5, 1/n) over `n` protected units when `privacy.delta` is 0.

    The one home of the default: n is a client's training sequences for sample-level DP-SGD, and the number
    of clients for client-level DP. delta must stay well below 1/n, since a mechanism that leaks one unit in
    full with probability delta is (0, delta)-DP; 1e-5 is the customary ceiling for small n.
    """
    return settings.delta if settings.delta > 0 else min(1e-5, 1.0 / max(n, 1))


def _accountant_epsilon(history: History, delta: float, mechanism: str) -> float:
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = history
    # Both accountants warn loudly (numpy overflow, RDP order range) exactly where we fall back or give up.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        # PRV: eps_error 0.005 keeps its upper bound within 0.01 of the exact value (0.01 gave +0.011).
        kwargs = {"eps_error": 0.005} if mechanism == "prv" else {}
        return float(accountant.get_epsilon(delta=delta, **kwargs))


def epsilon_of(history: History, delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of `history` at `delta`: PRV (RDP where PRV fails), never GDP.

    Raises:
        ValueError: an unknown accountant.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is unknown; choose one of {list(ACCOUNTANTS)}")
    # Composition does not depend on order: merging equal (noise, rate) entries makes 40 rounds of 30 steps
    # discretise exactly like one run of 1,200 steps, and is faster.
    merged: dict[tuple[float, float], int] = {}
    for noise, rate, steps in history:
        if steps > 0:
            merged[(float(noise), float(rate))] = merged.get((float(noise), float(rate)), 0) + int(steps)
    if not merged:
        return 0.0
    if any(noise <= 0 for noise, _ in merged):
        return math.inf  # no noise: no guarantee at all
    entries = [(noise, rate, steps) for (noise, rate), steps in merged.items()]
    rdp = _accountant_epsilon(entries, delta, "rdp")
    # Past this, PRV's grid takes seconds to minutes and then often overflows, for a budget that is void anyway.
    if accountant == "rdp" or not rdp <= _PRV_MAX_EPSILON:
        return rdp
    try:
        prv = _accountant_epsilon(entries, delta, "prv")
    except Exception as err:  # PRV is numerically fragile; RDP is looser but always a valid bound
        log.warning("PRV accountant failed (%s); using the RDP bound", err)
        return rdp
    return prv if math.isfinite(prv) else rdp


def calibrate_noise(settings: PrivacySettings, *, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier (within 0.5% of the target epsilon) for `steps` steps at `sample_rate`.

    Returns `settings.noise_multiplier` when one is set. Calibrate once over the client's whole horizon:
    recalibrating per round to the full target multiplies the real lifetime epsilon. Every evaluation goes
    through `epsilon_of`, so PRV falls back to RDP per point instead of failing, or spending minutes, at the
    low-noise end.

    Raises:
        ValueError: steps <= 0.
        ConfigError: the target epsilon cannot be met at any reasonable noise for this many steps.
    """
    if settings.noise_multiplier > 0:
        return settings.noise_multiplier
    target = settings.target_epsilon
    return _smallest_noise(lambda sigma: epsilon_of([(sigma, sample_rate, steps)], delta, settings.accountant),
                           target, min(0.01, 0.005 * target), steps, sample_rate, delta)


_INTEGER_ORDERS = list(range(2, 64))


def rough_noise(target_epsilon: float, *, sample_rate: float, steps: int, delta: float) -> float:
    """A noise multiplier a few % above what `calibrate_noise` finds, about ten times faster: RDP at integer
    orders only (each in closed form; the fractional ones take seconds to converge) and a 1 % tolerance. For
    comparing many sampling rates (fedlm/plan.py); the noise a client trains with comes from `calibrate_noise`."""
    def eps(sigma: float) -> float:
        accountant = create_accountant(mechanism="rdp")
        accountant.history = [(sigma, sample_rate, steps)]
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return float(accountant.get_epsilon(delta=delta, alphas=_INTEGER_ORDERS))
    return _smallest_noise(eps, target_epsilon, 0.01 * target_epsilon, steps, sample_rate, delta)


def _smallest_noise(eps: Callable[[float], float], target: float, tolerance: float, steps: int,
                    sample_rate: float, delta: float) -> float:
    # Opacus' get_noise_multiplier search (doubling, then bisection) over any epsilon function.
    if steps <= 0:
        raise ValueError(f"calibration needs steps > 0 (got {steps})")
    low, high = 0.0, 4.0
    eps_high = eps(high)
    while eps_high > target:
        low, high = high, 2 * high
        if high > 1e5:
            raise ConfigError(f"privacy.target_epsilon={target} cannot be met over {steps} steps at sample rate "
                              f"{sample_rate:.4g} (delta {delta:.3g}); raise it, or lower "
                              "privacy.horizon_rounds, train.local_steps or train.batch_size")
        eps_high = eps(high)
    for _ in range(60):  # a float bisection; the cap only guards against a non-monotone numeric accountant
        if target - eps_high <= tolerance:
            break
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid <= target:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


def poisson_batches(n_rows: int, sample_rate: float, steps: int, seed: int) -> list[torch.Tensor]:
    """The rows of each step: every row joins a step independently with probability `sample_rate`."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.nonzero(torch.rand(n_rows, generator=generator) < sample_rate).flatten() for _ in range(steps)]


def _remove_opacus_state(model: nn.Module, params: list[nn.Parameter]) -> None:
    # GradSampleHooks.cleanup() leaves the DPOptimizer's summed_grad and, after a failed pass, captured
    # activations on modules: stale ones would be popped by the next round's hooks.
    for p in params:
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in module.__dict__:
                delattr(module, attr)


def train_local_dp(model: nn.Module, train_ids: torch.Tensor, train_mask: torch.Tensor, train: TrainSettings,
                   privacy: PrivacySettings, *, noise_multiplier: float, sample_rate: float, seed: int,
                   make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                   prox_mu: float = 0.0) -> TrainResult:
    """Run `train.local_steps` DP-SGD steps (Opacus, per-sequence clipping) on the trainable parameters.

    Batches are Poisson samples (rate `sample_rate`, rows drawn from `seed`); each step adds Gaussian noise of
    std `noise_multiplier * privacy.max_grad_norm` to the sum of clipped per-sequence gradients and divides by
    the expected batch size. The caller accounts the steps (fedlm.ledger.PrivacyLedger). `make_optimizer` defaults
    to AdamW as in `train_local`; the model is left as it was found (no hooks, no per-sample state).
    `prox_mu` > 0 adds FedProx's proximal gradient after clipping and noise (free of privacy cost).

    Raises:
        ValueError: an invalid sample rate or noise multiplier, or nothing to train.
        RuntimeError: the adapter did not move after the first step (opacus issue 820).
    """
    n = len(train_ids)
    if not (0 < sample_rate <= 1 and noise_multiplier >= 0 and n > 0):
        raise ValueError(f"DP-SGD needs 0 < sample_rate <= 1, noise_multiplier >= 0 and rows "
                         f"(got {sample_rate}, {noise_multiplier}, {n} rows)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: apply a LoRA adapter first")
    base = make_optimizer(params) if make_optimizer else training.make_optimizer(params, train)
    # Noise must not be reproducible from `seed`, which other parties may know: they could subtract it.
    noise_rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    optimizer = DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                            expected_batch_size=max(1, round(sample_rate * n)), loss_reduction="mean",
                            generator=noise_rng)
    # FedProx's gradient mu (w - w0) depends only on the current weights (already a DP output of earlier
    # steps) and the global adapter w0 (public to the client), never on the data: adding it after clipping
    # and noise is post-processing and costs no privacy. Inside the per-sample clipping it would instead be
    # clipped with each sample's gradient and stop being the proximal term. Opacus calls step_hook after
    # noise and scaling, only on real (not accumulation-only) steps, just before the inner AdamW step.
    add_proximal = proximal_gradient(params, prox_mu)
    optimizer.step_hook = lambda _: add_proximal()
    hooks = None
    start, losses, sequences, tokens, checked = time.perf_counter(), [], 0, 0, False
    try:
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
        model.train()
        for rows in poisson_batches(n, sample_rate, train.local_steps, seed):
            before = None if checked else [p.detach().clone() for p in params]
            optimizer.zero_grad(set_to_none=True)
            if len(rows) == 0:
                # An HF forward pass fails on an empty batch; zero per-sample gradients make the step noise only,
                # which is exactly the mechanism the accountant charges for.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                optimizer.step()
            else:
                chunks = rows.split(privacy.max_physical_batch_size)
                step_loss = 0.0
                for i, chunk in enumerate(chunks):
                    with autocast(train.precision):
                        per_seq = sequence_losses(model, train_ids[chunk], train_mask[chunk])
                    with warnings.catch_warnings():
                        # The first LoRA layer's input (frozen embeddings) needs no gradient, so torch notes
                        # its full backward hook sees only output gradients: all Opacus needs for a Linear.
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        per_seq.mean().backward()  # "mean" as the hooks assume: per-sample grads come unscaled
                    if resolve_precision(train.precision) != "fp32":
                        # Opacus derives per-sample gradients in the compute dtype; clip them in float32,
                        # since a bf16 norm (~3 digits) could let a clipped gradient exceed the bound C.
                        for p in params:
                            p.grad_sample = p.grad_sample.float()
                    step_loss += float(per_seq.detach().sum())
                    tokens += int(train_mask[chunk].sum())
                    if i < len(chunks) - 1:
                        optimizer.signal_skip_step(do_skip=True)  # clip and accumulate only: one logical step
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss / len(rows))
                sequences += len(rows)
            if before is not None and (noise_multiplier > 0 or len(rows) > 0):
                checked = True
                if all(torch.equal(p.detach(), b) for p, b in zip(params, before)):
                    raise RuntimeError(
                        "DP-SGD step left every adapter weight unchanged (opacus issue 820): the optimizer does "
                        "not hold the model's parameters; move the model to its device and dtype before "
                        "get_peft_model and before training")
    finally:
        if hooks is not None:
            hooks.cleanup()
        _remove_opacus_state(model, params)
    return TrainResult(loss=sum(losses) / len(losses) if losses else math.nan, steps=train.local_steps,
                       sequences=sequences, tokens=tokens, seconds=time.perf_counter() - start)


def clipped_gradient_sum(model: nn.Module, train_ids: torch.Tensor, train_mask: torch.Tensor, rows: torch.Tensor,
                         train: TrainSettings, privacy: PrivacySettings) -> dict[str, torch.Tensor]:
    """The sum over `rows` of every sequence's gradient, each clipped to L2 norm `privacy.max_grad_norm` by
    Opacus, keyed by trainable parameter name (zeros for an empty batch). No noise and no step: under
    privacy=distributed_dp_sgd the client adds its share of the noise (fedlm/distributed_dp.py) and the server
    steps. The model is left as it was found (no hooks, no per-sample state, no .grad)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters: apply a LoRA adapter first")
    params = [p for _, p in named]
    # The DPOptimizer is used only for its per-sample clipping and accumulation into p.summed_grad.
    clipper = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0,
                          max_grad_norm=privacy.max_grad_norm, expected_batch_size=1, loss_reduction="sum")
    hooks = None
    try:
        if len(rows):
            hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum")
            model.train()
            for chunk in rows.split(privacy.max_physical_batch_size):
                with autocast(train.precision):
                    per_seq = sequence_losses(model, train_ids[chunk], train_mask[chunk])
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # as in train_local_dp
                    per_seq.sum().backward()  # "sum": each grad_sample is that sequence's own gradient
                for p in params:  # clip in float32 whatever the compute dtype (see train_local_dp)
                    p.grad_sample = p.grad_sample.float()
                clipper.clip_and_accumulate()
                for p in params:
                    p.grad_sample, p.grad = None, None
        return {name: (p.summed_grad.detach().clone() if getattr(p, "summed_grad", None) is not None
                       else torch.zeros_like(p, dtype=torch.float32)) for name, p in named}
    finally:
        if hooks is not None:
            hooks.cleanup()
        _remove_opacus_state(model, params)


# ---------------------------------------------------------------- client-level DP (the second layer)

def clip_update(new: list[np.ndarray], old: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    """`old` plus the update `new - old` scaled down (never up) to an L2 norm of at most `max_norm`."""
    delta = [n.astype(np.float64) - o for n, o in zip(new, old)]
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return [(o + scale * d).astype(n.dtype) for n, o, d in zip(new, old, delta)]


def client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                         accountant: str = "prv") -> float:
    """Epsilon of the client-level layer after `rounds` rounds: one Gaussian step per round on the clipped
    sum, clients sampled at `sample_rate` (Poisson approximation of Flower's fixed-size sampling)."""
    return epsilon_of([(noise_multiplier, sample_rate, rounds)], delta, accountant) if rounds else 0.0
