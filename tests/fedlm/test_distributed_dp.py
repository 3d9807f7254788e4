"""privacy=distributed_dp_sgd's library half: clipped gradient sums against a one-sequence-at-a-time reference, the
discrete Gaussian, the shares' noise, the exact trip through Flower's SecAgg+ arithmetic, and the common plan."""

import math

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedlm.data.packing import pack_texts
from fedlm.distributed_dp import (WIRE_LEVELS, decode_sum, discrete_gaussian, encode_share, grid_step,
                                  rounded_sensitivity, sum_range)
from fedlm.ledger import LedgerState
from fedlm.model import apply_lora, load_base_model
from fedlm.plan import plan_privacy
from fedlm.privacy import clipped_gradient_sum
from fedlm.settings import ConfigError, LoraSettings, ModelSettings, RunSettings, settings_from_dict
from fedlm.training import sequence_losses
from tests.conftest import make_text, pld_epsilon, wire_of

CLIP = 0.05  # small enough that most of the tiny model's per-sequence gradients are clipped


def _settings(**sections) -> RunSettings:
    base = {"federation": {"num_clients": 8, "clients_per_round": 4, "rounds": 10},
            "privacy": {"name": "distributed_dp_sgd", "max_grad_norm": CLIP},
            "server": {"min_replies": 3}}
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value
    return settings_from_dict(RunSettings, base)


def _secagg_sum(shares: list[list[np.ndarray]], settings: RunSettings) -> list[np.ndarray]:
    """What Flower's SecAgg+ hands the strategy for equal-weight shares (ratio 1): each client's `quantize`, the
    integer sum modulo 2^40 (the masks cancel in it), then the workflow's `dequantize`, offset and division."""
    width, k = sum_range(settings), len(shares)
    totals = [sum(quantize([s[i]], width, WIRE_LEVELS)[0].astype(np.int64) for s in shares) % 2**40
              for i in range(len(shares[0]))]
    return [(a - (k - 1) * width) / k for a in dequantize(totals, width, WIRE_LEVELS)]


@pytest.fixture(scope="module")
def model_and_rows(tiny_llama_dir):
    base, tokenizer = load_base_model(ModelSettings(name_or_path=str(tiny_llama_dir)), "")
    model = apply_lora(base, LoraSettings(r=4, alpha=8.0), seed=0)
    with torch.no_grad():  # a non-zero B, so lora_A gets gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids, mask = pack_texts([make_text(7, 900)], tokenizer, 32)
    return model, ids, mask


def _reference_clipped_sum(model, ids, mask, rows, clip) -> dict[str, torch.Tensor]:
    """One sequence at a time, with plain autograd: each gradient scaled to norm <= clip, then summed."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in named}
    for row in rows.tolist():
        model.zero_grad()
        sequence_losses(model, ids[row:row + 1], mask[row:row + 1]).sum().backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for _, p in named))
        for n, p in named:
            total[n] += p.grad * min(1.0, clip / (norm + 1e-6))
    model.zero_grad()
    return total


def test_without_noise_the_secure_sum_decodes_to_the_sum_of_every_clients_clipped_gradients(model_and_rows):
    model, ids, mask = model_and_rows
    settings = _settings(train={"precision": "fp32"}, privacy={"max_physical_batch_size": 3})
    clients = [torch.tensor([0, 2, 5, 7, 8]), torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)]
    ours, reference = [], []
    for rows in clients:
        sums = clipped_gradient_sum(model, ids, mask, rows, settings.train, settings.privacy)
        expected = _reference_clipped_sum(model, ids, mask, rows, CLIP)
        for name, value in sums.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-7)
        assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())
        ours.append(wire_of(model).gradients_to_arrays(model, sums))
        reference.append(wire_of(model).gradients_to_arrays(model, expected))
    grid = grid_step(settings)
    shares = [encode_share(arrays, 0.0, grid, np.random.default_rng(i)) for i, arrays in enumerate(ours)]
    decoded = decode_sum(_secagg_sum(shares, settings), len(shares), grid)
    truth = [sum(r[i].astype(np.float64) for r in reference) for i in range(len(decoded))]
    assert max(float(np.abs(t).max()) for t in truth) > 100 * grid  # the sum is far from nothing
    for d, t in zip(decoded, truth):
        # three roundings of at most half a step each, plus the reference's float32 error
        np.testing.assert_allclose(d, t, atol=1.5 * grid + 1e-6, rtol=0)


def test_the_discrete_gaussian_has_its_probabilities():
    rng = np.random.default_rng(0)
    scale, draws = 2.0, 400_000
    x = discrete_gaussian(scale, draws, rng)
    support = np.arange(-12, 13)
    pmf = np.exp(-support**2 / (2 * scale**2))
    pmf /= pmf.sum()
    observed = np.array([(x == k).mean() for k in support])
    # each frequency within 5 standard errors of its probability
    assert np.all(np.abs(observed - pmf) <= 5 * np.sqrt(pmf * (1 - pmf) / draws) + 1e-6)
    assert discrete_gaussian(0.0, 5, rng).tolist() == [0] * 5


def test_each_share_carries_sigma_c_over_root_k_min_and_their_sum_sigma_c():
    settings = _settings()
    grid, k_min, sigma, d = grid_step(settings), 3, 1.3, 30_000
    c_prime = rounded_sensitivity(CLIP, d, grid)
    share_std = sigma * c_prime / math.sqrt(k_min)
    zeros = [np.zeros(d)]
    own, total = [], []
    for round_ in range(4):  # four rounds of three clients, each adding its share to a zero gradient
        shares = [encode_share(zeros, share_std, grid, np.random.default_rng(10 * round_ + i)) for i in range(k_min)]
        own.append(decode_sum(_secagg_sum(shares[:1], settings), 1, grid)[0])
        total.append(decode_sum(_secagg_sum(shares, settings), k_min, grid)[0])
    # 120,000 and 30,000-value samples: a standard deviation's relative standard error is 1/sqrt(2N) <= 0.5 %,
    # so 3 % is over six standard errors.
    assert np.std(np.concatenate(total)) == pytest.approx(sigma * c_prime, rel=0.03)
    assert np.std(np.concatenate(own)) == pytest.approx(sigma * c_prime / math.sqrt(k_min), rel=0.03)
    assert abs(np.mean(np.concatenate(total))) < 0.03 * sigma * c_prime


def test_a_coordinate_is_never_clipped_only_the_sum_must_fit():
    settings = _settings()
    grid, width = grid_step(settings), sum_range(settings)
    assert width == 2 ** math.ceil(math.log2(2 * CLIP * 4 * 1000)) and grid == 2 * width / 2**30
    big, small = np.array([0.9 * width, -0.9 * width]), np.array([-0.8 * width, 0.8 * width])
    shares = [encode_share([a], 0.0, grid, np.random.default_rng(0)) for a in (big, small)]
    np.testing.assert_allclose(decode_sum(_secagg_sum(shares, settings), 2, grid)[0], big + small, atol=grid)


def test_every_client_plans_the_same_noise_within_the_budget_by_an_independent_accountant():
    settings = _settings(privacy={"sample_rate": 0.05, "target_epsilon": 8.0})
    small, large = plan_privacy(settings, 120), plan_privacy(settings, 5_000)
    assert small.noise_multiplier == large.noise_multiplier and small.sample_rate == 0.05
    assert small.planned_steps == 5 and small.shares == 3 and small.delta == 1e-5  # 10 rounds x 4/8, one step each
    epsilon = pld_epsilon(small.noise_multiplier, 0.05, 5, 1e-5)
    assert 0.98 * 8.0 <= epsilon <= 8.01
    state = LedgerState(small, ({"key": "r1", "noise_multiplier": small.noise_multiplier, "sample_rate": 0.05,
                                 "steps": 1, "epsilon": 0.0},) * 5)
    alone = pld_epsilon(small.noise_multiplier / math.sqrt(3), 0.05, 5, 1e-5)
    assert state.own_share_epsilon() == pytest.approx(alone, abs=0.02) and alone > 8.0


def test_the_distributed_path_is_refused_where_its_guarantee_would_not_hold():
    with pytest.raises(ConfigError, match="use secagg=secaggplus"):
        _settings(secagg={"name": "disabled"})
    with pytest.raises(ConfigError, match="privacy.update_clipping_norm=0"):
        _settings(privacy={"update_clipping_norm": 1.0})
    with pytest.raises(ConfigError, match="privacy.sample_rate must be in"):
        _settings(privacy={"sample_rate": 0.0})
