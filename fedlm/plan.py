"""A client's privacy plan: the sampling rate, noise and lifetime steps it trains with, fixed before its first round.

The plan turns the client's number of training sequences n, its budget (epsilon, delta) and the rounds it will be
asked to join into the parameters its ledger is created with (fedlm/ledger.py), so the whole budget goes to the
rounds the client actually trains in. `python -m simulations.plan` prints every client's plan without training.
"""

from __future__ import annotations

import math

import numpy as np

from fedlm.ledger import LedgerParameters
from fedlm.privacy import calibrate_noise, epsilon_of, resolve_delta, rough_noise
from fedlm.settings import AUTO, RunSettings

_SMALLEST_AUTO_BATCH = 4
_CANDIDATES = 13
"""Expected batches compared by `train.batch_size=auto`, spaced evenly in log between the smallest and largest."""


def planned_rounds(settings: RunSettings) -> int:
    """The rounds a client plans its budget for: `privacy.horizon_rounds`, else the most that the server's
    sampling asks of any client. Balanced sampling (server/sampling.py) asks each client at most
    ceil(rounds x clients_per_round / num_clients) times; with client-level DP the server draws cohorts at
    random instead (its accounting assumes it), and a client may be drawn every round."""
    fed, privacy = settings.federation, settings.privacy
    if privacy.horizon_rounds:
        return privacy.horizon_rounds
    if privacy.client_level:
        return fed.rounds
    return math.ceil(fed.rounds * fed.clients_per_round / fed.num_clients)


def auto_batch(settings: RunSettings, n: int, steps: int, delta: float) -> int:
    """The expected Poisson batch `train.batch_size=auto` trains with: the one that minimises sigma / sqrt(B).

    Over a fixed number of steps at a fixed epsilon, the noise on each step's mean gradient is sigma(B) x C / B.
    While sigma < ~1, a larger batch barely raises sigma (subsampling amplifies privacy less), so the noise on
    the mean falls almost as 1/B; past sigma ~1-2 sigma grows in proportion to B and the noise stops falling
    (Sander et al., "TAN without a burn", ICML'23). The minimum of sigma / sqrt(B) is the knee between the two:
    beyond it, doubling a step's compute lowers its noise by less than the factor sqrt(2) that spending the
    same compute on twice the steps would give. Capped by `privacy.max_auto_batch` and by n.
    """
    privacy = settings.privacy
    largest = min(privacy.max_auto_batch, n)
    smallest = min(_SMALLEST_AUTO_BATCH, largest)
    candidates = sorted({int(round(b)) for b in np.geomspace(smallest, largest, _CANDIDATES)})

    def noise_per_root_batch(batch: int) -> float:
        sigma = rough_noise(privacy.target_epsilon, sample_rate=batch / n, steps=steps, delta=delta)
        return sigma / math.sqrt(batch)

    return min(candidates, key=noise_per_root_batch)


def plan_privacy(settings: RunSettings, n: int) -> LedgerParameters:
    """The lifetime privacy parameters of a client holding `n` training sequences under `settings`.

    Raises:
        ValueError: n <= 0.
        ConfigError: the budget cannot be met at any reasonable noise.
    """
    if n <= 0:
        raise ValueError(f"a client needs training sequences for DP-SGD (got n={n})")
    privacy, train = settings.privacy, settings.train
    if privacy.distributed:
        return _plan_distributed(settings, n)
    steps = planned_rounds(settings) * train.local_steps
    delta = resolve_delta(privacy, n)
    batch = auto_batch(settings, n, steps, delta) if train.batch_size == AUTO else train.batch_size
    rate = min(1.0, batch / n)
    noise = calibrate_noise(privacy, sample_rate=rate, steps=steps, delta=delta)
    return LedgerParameters(noise_multiplier=noise, sample_rate=rate, delta=delta,
                            target_epsilon=privacy.target_epsilon, accountant=privacy.accountant, sequences=n,
                            planned_steps=steps,
                            planned_epsilon=epsilon_of([(noise, rate, steps)], delta, privacy.accountant))


def _plan_distributed(settings: RunSettings, n: int) -> LedgerParameters:
    """privacy=distributed_dp_sgd: one step per round at the common `privacy.sample_rate`, with the noise multiplier
    every client computes alike from public settings (the server's sum carries it once K_min shares are in).

    delta is `privacy.delta`, or 1e-5: one value for the whole federation, since every client's noise is the same.
    """
    privacy = settings.privacy
    steps = planned_rounds(settings)
    delta = privacy.delta or 1e-5
    noise = calibrate_noise(privacy, sample_rate=privacy.sample_rate, steps=steps, delta=delta)
    return LedgerParameters(noise_multiplier=noise, sample_rate=privacy.sample_rate, delta=delta,
                            target_epsilon=privacy.target_epsilon, accountant=privacy.accountant, sequences=n,
                            planned_steps=steps, shares=settings.server.min_replies,
                            planned_epsilon=epsilon_of([(noise, privacy.sample_rate, steps)], delta,
                                                       privacy.accountant))
