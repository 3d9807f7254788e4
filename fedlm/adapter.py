"""The adapter wire format: a LoRA adapter <-> the ordered float32 arrays that travel, checked both ways."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict


class AdapterMismatch(ValueError):
    """Arrays that do not fit this model's adapter (count, shape or values)."""


_FROZEN_A = "_pollinate_frozen_a"  # set on the PeftModel by freeze_lora_a: this party's wire omits lora_A


def freeze_lora_a(model: PeftModel) -> None:
    """FFA-LoRA: fix every lora_A as the shared seed drew it and leave it off the wire (only lora_B travels).

    Every party builds the same A (`apply_lora` seeds it), so A never needs to travel, and averaging B alone
    is exact: mean_i(B_i A) = (mean_i B_i) A. The upload is about halved.
    """
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)
    setattr(model, _FROZEN_A, True)


def adapter_names(model: PeftModel) -> list[str]:
    """The names of the adapter tensors that travel, in wire order: every lora_A and lora_B, or only the
    lora_B with a frozen A (the one place that decides)."""
    frozen_a = model.__dict__.get(_FROZEN_A, False)  # __dict__: PeftModel forwards unknown attributes
    return [n for n in get_peft_model_state_dict(model) if not (frozen_a and ".lora_A." in n)]


def _wire_state(model: PeftModel) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(model)
    return {name: state[name] for name in adapter_names(model)}


def adapter_to_arrays(model: PeftModel) -> list[np.ndarray]:
    """The adapter's wire tensors as float32 arrays (ArrayRecord rejects bfloat16), in wire order."""
    return [t.detach().to(torch.float32).cpu().numpy().copy() for t in _wire_state(model).values()]


def arrays_to_adapter(model: PeftModel, arrays: list[np.ndarray]) -> None:
    """Load wire arrays into `model`'s adapter (a frozen A is left as it is).

    Raises:
        AdapterMismatch: wrong count, a wrong shape, or a non-finite value; the model is left untouched.
    """
    state = _wire_state(model)
    if len(arrays) != len(state):
        raise AdapterMismatch(f"expected {len(state)} adapter arrays, got {len(arrays)}")
    loaded = {}
    for (name, current), array in zip(state.items(), arrays):
        if tuple(array.shape) != tuple(current.shape):
            raise AdapterMismatch(f"{name}: expected shape {tuple(current.shape)}, got {tuple(array.shape)}")
        if not np.all(np.isfinite(array)):
            raise AdapterMismatch(f"{name}: contains NaN or Inf")
        loaded[name] = torch.from_numpy(np.asarray(array)).to(current.dtype)
    result = set_peft_model_state_dict(model, loaded)  # loads non-strictly: keys not on the wire stay
    if result.unexpected_keys:
        raise AdapterMismatch(f"unexpected adapter keys: {result.unexpected_keys[:3]}")


def save_adapter(model: PeftModel, directory: Path) -> None:
    """Save in PEFT's own format (loadable with PeftModel.from_pretrained), replacing `directory` atomically."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
