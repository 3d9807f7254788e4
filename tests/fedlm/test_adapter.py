"""The adapter wire format: round trip, order, and the checks on what comes in."""

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedlm.adapter import AdapterMismatch, save_adapter
from tests.conftest import wire_of
from fedlm.model import apply_lora, load_base_model
from fedlm.settings import LoraSettings, ModelSettings


@pytest.fixture()
def llama_lora(tiny_llama_dir):
    base, tokenizer = load_base_model(ModelSettings(name_or_path=str(tiny_llama_dir)))
    return apply_lora(base, LoraSettings(r=4), seed=0), tokenizer


def test_round_trip_restores_every_tensor_exactly(llama_lora):
    model, _ = llama_lora
    arrays = wire_of(model).to_arrays(model)
    assert all(a.dtype == np.float32 for a in arrays)
    changed = [a + np.float32(0.5) for a in arrays]
    wire_of(model).load(model, changed)
    for got, want in zip(wire_of(model).to_arrays(model), changed):
        np.testing.assert_array_equal(got, want)


def test_only_lora_tensors_of_every_projection_travel(llama_lora):
    model, _ = llama_lora
    names = list(wire_of(model).names)
    assert all(("lora_A" in n) or ("lora_B" in n) for n in names)
    # 2 layers x 7 projections x (A, B); lm_head never adapted
    assert len(names) == 2 * 7 * 2
    assert not any("lm_head" in n for n in names)


def test_same_seed_builds_the_same_initial_adapter(tiny_llama_dir):
    settings = ModelSettings(name_or_path=str(tiny_llama_dir))
    a, b = (apply_lora(load_base_model(settings)[0], LoraSettings(), seed=3) for _ in range(2))
    a, b = wire_of(a).to_arrays(a), wire_of(b).to_arrays(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("corrupt, message", [
    (lambda arrays: arrays[:-1], "expected 28 adapter arrays"),
    (lambda arrays: [np.zeros((3, 3), np.float32)] + arrays[1:], "expected shape"),
    (lambda arrays: [np.full_like(arrays[0], np.nan)] + arrays[1:], "NaN or Inf"),
])
def test_bad_arrays_are_refused_and_the_model_is_untouched(llama_lora, corrupt, message):
    model, _ = llama_lora
    before = wire_of(model).to_arrays(model)
    with pytest.raises(AdapterMismatch, match=message):
        wire_of(model).load(model, corrupt(before))
    for got, want in zip(wire_of(model).to_arrays(model), before):
        np.testing.assert_array_equal(got, want)


def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(llama_lora, tiny_llama_dir, tmp_path):
    model, _ = llama_lora
    wire_of(model).load(model, [a + 0.01 for a in wire_of(model).to_arrays(model)])
    save_adapter(model, tmp_path / "adapter")
    save_adapter(model, tmp_path / "adapter")  # replacing an existing one works too
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_gpt2_gets_its_conv1d_projections_adapted(tiny_gpt2_dir):
    base, _ = load_base_model(ModelSettings(name_or_path=str(tiny_gpt2_dir)))
    model = apply_lora(base, LoraSettings(r=2), seed=0)
    names = list(wire_of(model).names)
    assert {n.split(".")[-3] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert model.peft_config["default"].fan_in_fan_out
