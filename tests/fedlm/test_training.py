"""The per-sequence loss, local training and held-out evaluation."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlm.model import apply_lora, load_base_model
from fedlm.settings import LoraSettings, ModelSettings, TrainSettings
from fedlm.training import evaluate, make_optimizer, sequence_losses, train_local


@pytest.fixture()
def model(tiny_llama_dir):
    base, _ = load_base_model(ModelSettings(name_or_path=str(tiny_llama_dir)))
    return apply_lora(base, LoraSettings(r=4), seed=0)


LN2 = math.log(2.0)


class _Bigram(nn.Module):
    """A 4-token bigram model whose next-token probabilities are known exactly: the logits are a row of a fixed
    table picked by the current token.

    After token 0 or 1 the row is (0, 0, -1e4, -1e4): probability 1/2 each on tokens 0 and 1 (exp(-1e4) is 0 in
    float32), so a target 0 or 1 costs ln 2 and any other target about 1e4. After token 2 or 3 the row is
    (0, 0, 0, 0): uniform, so every target costs ln 4 = 2 ln 2.
    """

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(4, 4)
        with torch.no_grad():
            self.table.weight.copy_(torch.tensor([[0.0, 0.0, -1e4, -1e4]] * 2 + [[0.0] * 4] * 2))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table(input_ids))


def _short_and_long():
    """Row 0: 4 real tokens 0 1 0 1 (3 targets at ln 2 each), padded with 3s that would each cost ~1e4 if
    counted. Row 1: 8 real tokens 2 3 2 3 2 3 2 3 (7 targets at 2 ln 2 each)."""
    ids = torch.tensor([[0, 1, 0, 1, 3, 3, 3, 3], [2, 3, 2, 3, 2, 3, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8])
    return ids, mask


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


def test_training_loss_weighs_each_sequence_equally_whatever_its_length():
    """Unlike the built-in labels= loss, a short and a long sequence count equally in the training loss.

    Per sequence: (3 * ln 2) / 3 = ln 2 and (7 * 2 ln 2) / 7 = 2 ln 2, so the training loss (their mean) is
    1.5 ln 2 = 1.0397, where token weighting would give (3 + 14) ln 2 / 10 = 1.7 ln 2 = 1.1783.
    """
    model, (ids, mask) = _Bigram(), _short_and_long()
    assert sequence_losses(model, ids, mask).tolist() == pytest.approx([LN2, 2 * LN2], rel=1e-6)
    # One step over both rows: the loss train_local reports is the one it backpropagated, before the step.
    result = train_local(model, ids, mask, TrainSettings(local_steps=1, batch_size=2, precision="fp32"), seed=0)
    assert result.loss == pytest.approx(1.5 * LN2, rel=1e-6)
    assert result.tokens == 4 + 8  # real tokens of the batch


def test_local_training_moves_only_the_adapter_and_lowers_the_loss(model):
    torch.manual_seed(0)
    block = torch.randint(2, 40, (1, 32))
    ids = block.repeat(16, 1)  # one repeated sequence: easy to fit
    mask = torch.ones_like(ids)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before, _ = evaluate(model, ids, mask)
    result = train_local(model, ids, mask, TrainSettings(local_steps=15, batch_size=4, optimizer="adamw",
                                                         learning_rate=1e-2), seed=0)
    after, tokens = evaluate(model, ids, mask)
    assert after < before - 0.5
    assert tokens == 16 * 31
    assert result.steps == 15 and result.tokens == 15 * 4 * 32
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    unchanged = [n for n, p in model.named_parameters() if n in lora and torch.equal(p, lora[n])]
    assert lora and not unchanged  # every A and B moved (B starts at zero, A follows once B is non-zero)


def test_held_out_loss_weighs_every_token_equally():
    """Held-out loss is a mean over all 3 + 7 = 10 valid targets, so exp(loss) is the usual perplexity:
    (3 * ln 2 + 7 * 2 ln 2) / 10 = 1.7 ln 2 = 1.1783, not the per-sequence mean 1.5 ln 2 = 1.0397."""
    model, (ids, mask) = _Bigram(), _short_and_long()
    for batch_size in (1, 2):  # one row per batch, or both in one: the same token-weighted mean
        loss, tokens = evaluate(model, ids, mask, batch_size=batch_size)
        assert tokens == 10
        assert loss == pytest.approx(1.7 * LN2, rel=1e-6)


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


def test_train_optimizer_builds_momentum_sgd_or_adamw_with_the_configured_values():
    w = torch.nn.Parameter(torch.tensor([3.0, 0.0]))
    sgd = make_optimizer([w], TrainSettings(optimizer="sgd", learning_rate=0.1, momentum=0.5))
    for _ in range(2):  # gradient (1, 1) twice: velocity 1 then 1.5, so w moves by 0.1 + 0.15 per coordinate
        w.grad = torch.ones(2)
        sgd.step()
    assert torch.allclose(w.detach(), torch.tensor([2.75, -0.25]))
    adamw = make_optimizer([w], TrainSettings(optimizer="adamw", learning_rate=0.01, weight_decay=0.0))
    w.grad = torch.tensor([5.0, -0.001])
    before = w.detach().clone()
    adamw.step()  # Adam's first step is lr x sign(g) whatever the gradient's size
    assert torch.allclose(w.detach() - before, torch.tensor([-0.01, 0.01]), atol=1e-6)
