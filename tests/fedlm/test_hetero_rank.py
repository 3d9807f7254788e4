"""Heterogeneous LoRA ranks: truncation in, zero padding out, one effective scale, a plain weighted sum."""

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from fedlm.adapter import AdapterMismatch
from tests.conftest import wire_of
from fedlm.model import apply_lora, load_base_model
from fedlm.settings import ConfigError, LoraSettings, ModelSettings, RunSettings, settings_from_dict
from strategies import check_strategy

LORA = LoraSettings(r=4, alpha=8.0)


@pytest.fixture(params=["tiny_llama_dir", "tiny_gpt2_dir"])  # GPT-2: fan_in_fan_out keeps PEFT's A/B shapes
def models(request):
    settings = ModelSettings(name_or_path=str(request.getfixturevalue(request.param)))
    build = lambda rank: apply_lora(load_base_model(settings)[0], LORA, seed=0, rank=rank)  # noqa: E731
    return build(None), build(2), build(4)  # global (r=4), a rank-2 client, a rank-4 client


def _random_global(model, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(a.shape).astype(np.float32) for a in wire_of(model, LORA.r).to_arrays(model)]


def test_truncation_in_and_zero_padding_out_round_trip(models):
    server, small, _ = models
    arrays = _random_global(server)
    wire_of(small, LORA.r).load(small, arrays)
    own = get_peft_model_state_dict(small)
    for name, sent, back in zip(list(wire_of(small, LORA.r).names), arrays, wire_of(small, LORA.r).to_arrays(small)):
        assert back.shape == sent.shape  # travels at the global rank 4
        if ".lora_A." in name:  # [r, in]: the first 2 rows, exactly; zeros below
            assert own[name].shape[0] == 2
            np.testing.assert_array_equal(back[:2], sent[:2])
            assert not back[2:].any()
        else:  # [out, r]: the first 2 columns, exactly; zeros right
            assert own[name].shape[1] == 2
            np.testing.assert_array_equal(back[:, :2], sent[:, :2])
            assert not back[:, 2:].any()


def test_weighted_sum_of_padded_updates_is_the_hand_computed_one(models):
    server, small, big = models
    start = _random_global(server)
    for model, shift in ((small, 1.0), (big, 3.0)):
        wire_of(model, LORA.r).load(model, [a + np.float32(shift) for a in start])
    (a2, a4), (w2, w4) = (wire_of(small, LORA.r).to_arrays(small), wire_of(big, LORA.r).to_arrays(big)), (1, 3)
    for name, s, x, y in zip(list(wire_of(server, LORA.r).names), start, a2, a4):
        got = (w2 * x + w4 * y) / (w2 + w4)
        want = (s + 3.0) * 3 / 4  # the rank-2 client contributes nothing beyond its rank...
        head = (slice(0, 2),) if ".lora_A." in name else (slice(None), slice(0, 2))
        want[head] = (s[head] + 1.0) / 4 + (s[head] + 3.0) * 3 / 4  # ...and its share within it
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_every_client_has_the_global_effective_scale(models):
    server, small, big = models
    for model in (server, small, big):
        scales = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
        assert scales == {LORA.alpha / LORA.r}


def test_padded_update_means_the_same_delta_w_in_the_global_adapter(tiny_llama_dir):
    settings = ModelSettings(name_or_path=str(tiny_llama_dir))
    server = apply_lora(load_base_model(settings)[0], LORA, seed=0)
    small = apply_lora(load_base_model(settings)[0], LORA, seed=0, rank=2)
    wire_of(small, LORA.r).load(small, _random_global(server, seed=2))
    wire_of(server, LORA.r).load(server, wire_of(small, LORA.r).to_arrays(small))  # the rank-2 adapter, padded, inside the global one
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    server.eval(), small.eval()
    torch.testing.assert_close(server(input_ids=ids).logits, small(input_ids=ids).logits)


def test_a_rank_above_the_global_one_is_refused(tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"lora.client_ranks: a client rank of 8 is outside \[1, lora.r=4\]"):
        LoraSettings(r=4, client_ranks=(2, 8))
    with pytest.raises(ConfigError, match="node config lora-rank: a client rank of 5"):
        LORA.client_rank(0, node_rank="5")
    with pytest.raises(ConfigError, match="outside"):
        apply_lora(load_base_model(ModelSettings(name_or_path=str(tiny_llama_dir)))[0], LORA, seed=0, rank=6)
    settings = settings_from_dict(RunSettings, {"lora": {"r": 4, "client_ranks": [2, 4]}, "strategy": {"name": "frozen_a"}})
    with pytest.raises(ConfigError, match="frozen_a cannot be combined"):
        check_strategy(settings)


def test_client_rank_comes_from_node_config_then_client_ranks_then_r():
    assert [LoraSettings(r=4, client_ranks=(2, 4)).client_rank(i) for i in range(3)] == [2, 4, 2]
    assert LoraSettings(r=4).client_rank(7) == 4
    assert LoraSettings(r=4, client_ranks=(2,)).client_rank(0, node_rank=3) == 3


def test_shapes_stay_strict_at_other_ranks(models):
    _, small, _ = models
    arrays = wire_of(small, LORA.r).to_arrays(small)
    with pytest.raises(AdapterMismatch, match="expected shape"):  # its own rank 2 is not the wire's rank 4
        wire_of(small, LORA.r).load(small, [a[:2] if i == 0 else a for i, a in enumerate(arrays)])
