"""The per-sequence loss, local training and held-out evaluation."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedlm.model import apply_lora, load_base_model
from fedlm.settings import LoraSettings, ModelSettings, TrainSettings
from fedlm.training import evaluate, sequence_losses, train_local


@pytest.fixture()
def model(tiny_llama_dir):
    base, _ = load_base_model(ModelSettings(name_or_path=str(tiny_llama_dir)))
    return apply_lora(base, LoraSettings(r=4), seed=0)


def test_each_sequence_is_the_mean_over_its_own_valid_tokens(model):
    torch.manual_seed(0)
    ids = torch.randint(2, 200, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 4:] = 0  # the second sequence has 4 real tokens -> 3 targets
    got = sequence_losses(model, ids, mask)
    model.eval()
    with torch.no_grad():
        for row, n_real in ((0, 10), (1, 4)):
            logits = model(input_ids=ids[row:row + 1, :n_real]).logits[0, :-1]
            want = F.cross_entropy(logits, ids[row, 1:n_real])
            torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)


def test_padding_never_changes_a_sequence_loss(model):
    ids = torch.randint(2, 200, (1, 6))
    padded = torch.cat([ids, torch.full((1, 4), 1)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    model.eval()
    a = sequence_losses(model, ids, torch.ones_like(ids))
    b = sequence_losses(model, padded, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sequences_weigh_the_same_whatever_their_length(model):
    """Unlike the built-in labels= loss, a long and a short sequence count equally."""
    ids = torch.randint(2, 200, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 3:] = 0
    model.eval()
    per_seq = sequence_losses(model, ids, mask)
    torch.testing.assert_close(per_seq.mean(), (per_seq[0] + per_seq[1]) / 2)


def test_local_training_moves_only_the_adapter_and_lowers_the_loss(model):
    torch.manual_seed(0)
    block = torch.randint(2, 40, (1, 32))
    ids = block.repeat(16, 1)  # one repeated sequence: easy to fit
    mask = torch.ones_like(ids)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before, _ = evaluate(model, ids, mask)
    result = train_local(model, ids, mask, TrainSettings(local_steps=15, batch_size=4, learning_rate=1e-2), seed=0)
    after, tokens = evaluate(model, ids, mask)
    assert after < before - 0.5
    assert tokens == 16 * 31
    assert result.steps == 15 and result.tokens == 15 * 4 * 32
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    unchanged = [n for n, p in model.named_parameters() if n in lora and torch.equal(p, lora[n])]
    assert lora and not unchanged  # every A and B moved (B starts at zero, A follows once B is non-zero)


def test_evaluation_is_token_weighted(model):
    ids = torch.randint(2, 200, (3, 8))
    mask = torch.ones_like(ids)
    mask[2, 2:] = 0
    loss, tokens = evaluate(model, ids, mask, batch_size=2)
    assert tokens == 7 + 7 + 1
    assert math.isfinite(loss) and loss > 0


def test_training_is_reproducible_for_a_seed(tiny_llama_dir):
    results = []
    for _ in range(2):
        base, _ = load_base_model(ModelSettings(name_or_path=str(tiny_llama_dir)))
        m = apply_lora(base, LoraSettings(r=4), seed=0)
        ids = torch.randint(2, 200, (12, 16), generator=torch.Generator().manual_seed(1))
        results.append(train_local(m, ids, torch.ones_like(ids), TrainSettings(local_steps=3, batch_size=4), seed=7).loss)
    assert results[0] == results[1]


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from fedlm import training

    monkeypatch.setattr(training, "native_bf16", lambda: True)
    assert training.resolve_precision("auto") == "bf16" and training.autocast("auto").fast_dtype == torch.bfloat16
    assert training.autocast("auto")._enabled
    monkeypatch.setattr(training, "native_bf16", lambda: False)
    assert training.resolve_precision("auto") == "fp32" and not training.autocast("auto")._enabled
    assert training.resolve_precision("bf16") == "bf16"  # an explicit choice is kept, native or not
    assert training.resolve_precision("fp32") == "fp32"
