"""Federation-wide DP-SGD under SecAgg+: each client's noise share on SecAgg+'s integer grid, and the sum's decoding.

Every round, each sampled client sends the sum of its clipped per-sequence gradients over its own secret Poisson
batch plus its share of the noise; SecAgg+ reveals only the sum over the clients, which is one central DP-SGD
step's noisy gradient sum over the union of their batches (Kairouz, Liu, Steinke, "The distributed discrete
Gaussian mechanism", ICML'21). The guarantee, and whom it trusts:

- Each client rounds its gradient sum g to the grid (`grid`) and adds discrete Gaussian noise of scale
  sigma x C' / sqrt(K_min) grid steps, K_min = `server.min_replies`. Rounding makes one sequence's influence
  at most C' = C + sqrt(d) x grid in L2 (C, the clipping bound, plus at most one grid step per coordinate), and
  the noise is calibrated to C', so the rounding costs nothing in the guarantee.
- The integers travel through SecAgg+ exactly: Flower quantises the value we hand it to the very integer we
  chose (it sits on Flower's own grid, so its stochastic rounding has nothing to round), sums modulo 2^40 and
  returns the sum. The sum of K >= K_min discrete Gaussians of scale s is within
  tau = 10 sum_{k<K} exp(-2 pi^2 s^2 k / (k + 1)) of one discrete Gaussian of scale s sqrt(K) (KLS21, Thm. 1);
  at s ~ 1e5 grid steps tau underflows every float, and the discrete Gaussian's privacy loss is the continuous
  one's on the integer lattice (Canonne, Kamath, Steinke, NeurIPS'20), so each round is accounted as a Poisson
  subsampled Gaussian step of multiplier sigma at the client's sampling rate.
- Values wrap modulo 2^30 on the client and are unwrapped after the sum: only the sum must lie in [-W, W]
  (`sum_range`), never a single client's share, so no value is clipped. A sum outside the range would wrap and
  spoil that coordinate's step (utility, never privacy: the server still sees a function of the noisy sum).
- Trust: the per-round epsilon holds while at least K_min sampled clients add their share honestly and the
  server follows the protocol (it unmasks no sum of fewer than K_min shares: server/loop.py). If every other
  client colludes with the server, a client keeps the guarantee of its own share alone (noise multiplier
  sigma / sqrt(K_min)): its ledger reports both.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from fedlm.settings import RunSettings

WIRE_LEVELS = 2**30
"""SecAgg+'s quantisation range in this mode: Flower maps [-W, W] onto integers 0..2^30, one grid step apart."""


def sum_range(settings: RunSettings) -> float:
    """W: the largest |coordinate| a round's noisy gradient sum may have, a power of two (so the grid is one).

    Each coordinate of a clipped per-sequence gradient is at most C, so a round's sum stays below
    C x (sequences sampled); the sampled clients' weights cap their sequences at max_client_weight each, and the
    factor 2 leaves room for the noise (a few sigma x C) and for a Poisson batch above its mean.
    """
    fed = settings.federation
    bound = 2 * settings.privacy.max_grad_norm * fed.clients_per_round * fed.max_client_weight
    return 2.0 ** math.ceil(math.log2(bound))


def grid_step(settings: RunSettings) -> float:
    """The value of one integer on the wire: 2W / 2^30, a power of two."""
    return 2 * sum_range(settings) / WIRE_LEVELS


def rounded_sensitivity(clip: float, dimension: int, grid: float) -> float:
    """C': the L2 distance one sequence can move a grid-rounded gradient sum (C, plus one grid step per
    coordinate that rounding may tip the other way)."""
    return clip + math.sqrt(dimension) * grid


def discrete_gaussian(scale: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` independent draws of the discrete Gaussian N_Z(0, scale^2): P(x) proportional to exp(-x^2 / 2 scale^2)
    over the integers, by rejection from the discrete Laplace (Canonne, Kamath, Steinke 2020, Algorithm 3).

    Vectorised and in floating point, as TensorFlow Federated's sampler: acceptance is exact up to float
    rounding of exp, which at these scales moves no probability by more than 1e-16 of itself.
    """
    if scale <= 0:
        return np.zeros(size, np.int64)
    t = math.floor(scale) + 1
    keep_going = 1.0 - math.exp(-1.0 / t)  # a geometric's success probability: P(Y = y) ~ exp(-|y| / t)
    out = np.empty(size, np.int64)
    todo = np.arange(size)
    while todo.size:
        laplace = rng.geometric(keep_going, todo.size) - rng.geometric(keep_going, todo.size)
        accept = rng.random(todo.size) < np.exp(-(np.abs(laplace) - scale**2 / t) ** 2 / (2 * scale**2))
        out[todo[accept]] = laplace[accept]
        todo = todo[~accept]
    return out


def secret_rng() -> np.random.Generator:
    """Noise nobody else can regenerate: seeded from the operating system, never from the run's public seed."""
    return np.random.default_rng(secrets.randbits(128))


def encode_share(gradient_sum: list[np.ndarray], noise_std: float, grid: float,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """A client's contribution: its gradient sum rounded to the grid, plus discrete Gaussian noise of std
    `noise_std` (in value units), wrapped into SecAgg+'s range as float64 values that Flower quantises exactly.

    Returns arrays of the inputs' shapes whose values are W' + k x grid for whole k in [0, 2^30), W' = -W.
    """
    half_width = grid * WIRE_LEVELS / 2
    shares = []
    for g in gradient_sum:
        k = np.rint(np.asarray(g, np.float64) / grid).astype(np.int64)
        k += discrete_gaussian(noise_std / grid, k.size, rng).reshape(k.shape)
        shares.append(np.mod(k, WIRE_LEVELS) * grid - half_width)  # exact: integers times a power of two
    return shares


def decode_sum(mean: list[np.ndarray], replies: int, grid: float) -> list[np.ndarray]:
    """The noisy gradient sum, from the weighted mean SecAgg+ hands the server for `replies` equal-weight shares.

    Flower returns (sum of k x grid - replies x W) / replies; multiplying back and rounding to whole grid steps
    recovers the integer sum exactly, which is unwrapped from modulo 2^30 into [-2^29, 2^29).
    """
    half_width = grid * WIRE_LEVELS / 2
    sums = []
    for m in mean:
        total = np.rint((np.asarray(m, np.float64) + half_width) * replies / grid).astype(np.int64)
        signed = np.mod(total + WIRE_LEVELS // 2, WIRE_LEVELS) - WIRE_LEVELS // 2
        sums.append(signed * grid)
    return sums
