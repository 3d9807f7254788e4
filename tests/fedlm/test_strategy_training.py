"""Client-side strategy pieces: FedProx's proximal gradient (plain and DP paths) and FFA-LoRA's frozen A."""

import pytest
import torch
from safetensors.torch import load_file

from fedlm.adapter import save_adapter
from tests.conftest import wire_of
from fedlm.model import apply_lora, load_base_model
from fedlm.privacy import train_local_dp
from fedlm.settings import LoraSettings, ModelSettings, PrivacySettings, TrainSettings
from fedlm.training import proximal_gradient, sequence_losses, train_local


def _lora(model_dir, frozen_a=False):
    base, _ = load_base_model(ModelSettings(name_or_path=str(model_dir)))
    return apply_lora(base, LoraSettings(r=4), seed=0, frozen_a=frozen_a)


@pytest.fixture()
def data():
    ids = torch.randint(2, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_proximal_gradient_matches_finite_differences_of_the_proximal_objective(tiny_llama_dir, data):
    """What proximal_gradient adds to each adapter gradient, on top of the data loss's, equals the central
    finite difference of (mu/2)||w - w0||^2 computed here in float64 (a quadratic: exact up to rounding)."""
    model, mu, h = _lora(tiny_llama_dir), 0.3, 1e-4
    params = [p for p in model.parameters() if p.requires_grad]
    add_proximal = proximal_gradient(params, mu)  # anchors w0 = the weights now
    anchors = [p.detach().double().clone() for p in params]
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    model.zero_grad()
    sequence_losses(model, *data).mean().backward()
    loss_grads = [p.grad.clone() for p in params]
    add_proximal()
    added = [(p.grad - g).double() for p, g in zip(params, loss_grads)]

    def objective(ws):  # the proximal term over the whole adapter
        return mu / 2 * sum(float(((w - w0) ** 2).sum()) for w, w0 in zip(ws, anchors))

    weights = [p.detach().double().clone() for p in params]
    picks = torch.Generator().manual_seed(0)
    for i, w in enumerate(weights):
        for j in torch.randint(w.numel(), (3,), generator=picks).tolist():
            shifted = []
            for step in (h, -h):
                moved = w.clone()
                moved.view(-1)[j] += step
                shifted.append(objective(weights[:i] + [moved] + weights[i + 1:]))
            numeric = (shifted[0] - shifted[1]) / (2 * h)
            assert float(added[i].view(-1)[j]) == pytest.approx(numeric, rel=1e-3, abs=1e-7), (i, j)


def test_one_sgd_step_on_the_proximal_term_pulls_back_by_lr_mu_times_the_distance():
    """By hand: w0 = (1, -2), then w moves to (3, 0), so w - w0 = (2, 2). With mu = 0.5 the gradient of
    (mu/2)||w - w0||^2 is mu (w - w0) = (1, 1), and one SGD step at lr 0.1 lands at (3 - 0.1, 0 - 0.1) = (2.9, -0.1)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    add_proximal = proximal_gradient([w], mu=0.5)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 0.0]))
    w.grad = torch.zeros_like(w)  # no data loss: the proximal term alone
    add_proximal()
    assert w.grad.tolist() == pytest.approx([1.0, 1.0])
    torch.optim.SGD([w], lr=0.1).step()
    assert w.tolist() == pytest.approx([2.9, -0.1])


def test_a_large_mu_keeps_local_training_near_the_global_adapter(tiny_llama_dir, data):
    settings = TrainSettings(local_steps=6, batch_size=3, optimizer="adamw", learning_rate=0.02)
    drift = {}
    for mu in (0.0, 50.0):
        model = _lora(tiny_llama_dir)
        start = _trainable(model)
        train_local(model, *data, settings, seed=0, prox_mu=mu)
        drift[mu] = sum(float((p - start[n]).norm() ** 2) for n, p in _trainable(model).items())
    assert 0 < drift[50.0] < 0.8 * drift[0.0]


def test_dp_path_adds_the_proximal_gradient_after_clipping_and_noise(tiny_llama_dir, data):
    """Two noiseless DP-SGD steps (plain SGD): the proximal gradient at step 2 is mu * (w_1 - w_0), added
    unclipped, so the two-step updates with and without it differ by exactly -lr * mu * (w_1 - w_0)."""
    lr, mu = 0.5, 0.4
    privacy = PrivacySettings(name="dp_sgd", max_grad_norm=0.01)  # tight clipping: a clipped prox term would show

    def update(steps, prox_mu):
        model = _lora(tiny_llama_dir)
        start = _trainable(model)
        train_local_dp(model, *data, TrainSettings(local_steps=steps, batch_size=6), privacy, noise_multiplier=0.0,
                       sample_rate=1.0, seed=0, make_optimizer=lambda p: torch.optim.SGD(p, lr=lr), prox_mu=prox_mu)
        return {n: p - start[n] for n, p in _trainable(model).items()}

    one_step, plain, prox = update(1, 0.0), update(2, 0.0), update(2, mu)
    for n in plain:
        torch.testing.assert_close(prox[n] - plain[n], -lr * mu * one_step[n], rtol=1e-3, atol=1e-8)
    assert any(one_step[n].abs().max() > 0 for n in one_step)


def test_frozen_a_sends_only_b_and_never_changes_a(tiny_llama_dir, data, tmp_path):
    model, full = _lora(tiny_llama_dir, frozen_a=True), _lora(tiny_llama_dir)
    names = list(wire_of(model).names)
    assert names == [n for n in list(wire_of(full).names) if ".lora_B." in n] and len(names) == 2 * 7
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    assert a_before and not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    # Every party draws the same A from the shared seed.
    for n, p in full.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, a_before[n])
    train_local(model, *data, TrainSettings(local_steps=2, batch_size=3), seed=0)
    train_local_dp(model, *data, TrainSettings(local_steps=2, batch_size=3), PrivacySettings(), noise_multiplier=1.0,
                   sample_rate=0.5, seed=0)
    wire_of(model).load(model, [a + 1 for a in wire_of(model).to_arrays(model)])  # what a client receives each round
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, a_before[n])  # bitwise
    assert all(float(abs(a).max()) >= 1 for a in wire_of(model).to_arrays(model))  # the B tensors did change
    sizes = [sum(a.nbytes for a in wire_of(m).to_arrays(m)) for m in (model, full)]
    assert 0.45 < sizes[0] / sizes[1] < 0.6  # B is out x r, A is r x in: about half of the upload
    save_adapter(model, tmp_path / "adapter")  # the saved adapter is still a complete PEFT adapter
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(".lora_A." in k for k in saved) == sum(".lora_B." in k for k in saved) == 14
