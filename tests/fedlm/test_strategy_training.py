"""Client-side strategy pieces: FedProx's proximal gradient (plain and DP paths) and FFA-LoRA's frozen A."""

import pytest
import torch
from safetensors.torch import load_file

from fedlm.adapter import adapter_names, adapter_to_arrays, arrays_to_adapter, save_adapter
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


def test_proximal_gradient_is_mu_times_the_distance_from_the_start(tiny_llama_dir, data):
    model, mu = _lora(tiny_llama_dir), 0.3
    params = [p for p in model.parameters() if p.requires_grad]
    add_proximal = proximal_gradient(params, mu)  # anchors w0 = the weights now
    anchors = [p.detach().clone() for p in params]
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    # Reference: autograd of loss + (mu/2)||w - w0||^2.
    model.zero_grad()
    loss = sequence_losses(model, *data).mean()
    (loss + mu / 2 * sum(((p - w0) ** 2).sum() for p, w0 in zip(params, anchors))).backward()
    reference = [p.grad.clone() for p in params]
    model.zero_grad()
    sequence_losses(model, *data).mean().backward()
    add_proximal()
    for got, want in zip((p.grad for p in params), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # And numerically: a central difference of (mu/2)||w - w0||^2 along one coordinate is mu (w - w0) there.
    p, w0, h = params[0], anchors[0], 1e-3
    term = lambda w: mu / 2 * float(((w - w0) ** 2).sum())  # noqa: E731
    e = torch.zeros_like(p)
    e.view(-1)[0] = h
    numeric = (term(p.detach() + e) - term(p.detach() - e)) / (2 * h)
    assert numeric == pytest.approx(mu * float((p.detach() - w0).view(-1)[0]), rel=1e-3)


def test_a_large_mu_keeps_local_training_near_the_global_adapter(tiny_llama_dir, data):
    settings = TrainSettings(local_steps=6, batch_size=3, learning_rate=0.02)
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
    names = adapter_names(model)
    assert names == [n for n in adapter_names(full) if ".lora_B." in n] and len(names) == 2 * 7
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    assert a_before and not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    # Every party draws the same A from the shared seed.
    for n, p in full.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, a_before[n])
    train_local(model, *data, TrainSettings(local_steps=2, batch_size=3), seed=0)
    train_local_dp(model, *data, TrainSettings(local_steps=2, batch_size=3), PrivacySettings(), noise_multiplier=1.0,
                   sample_rate=0.5, seed=0)
    arrays_to_adapter(model, [a + 1 for a in adapter_to_arrays(model)])  # what a client receives each round
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, a_before[n])  # bitwise
    assert all(float(abs(a).max()) >= 1 for a in adapter_to_arrays(model))  # the B tensors did change
    sizes = [sum(a.nbytes for a in adapter_to_arrays(m)) for m in (model, full)]
    assert 0.45 < sizes[0] / sizes[1] < 0.6  # B is out x r, A is r x in: about half of the upload
    save_adapter(model, tmp_path / "adapter")  # the saved adapter is still a complete PEFT adapter
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(".lora_A." in k for k in saved) == sum(".lora_B." in k for k in saved) == 14
