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


def adapter_names(model: PeftModel) -> list[str]:
    """The adapter's tensor names, in wire order."""
    return list(get_peft_model_state_dict(model).keys())


def adapter_to_arrays(model: PeftModel) -> list[np.ndarray]:
    """The adapter's tensors as float32 arrays (ArrayRecord rejects bfloat16), in wire order."""
    return [t.detach().to(torch.float32).cpu().numpy().copy()
            for t in get_peft_model_state_dict(model).values()]


def arrays_to_adapter(model: PeftModel, arrays: list[np.ndarray]) -> None:
    """Load wire arrays into `model`'s adapter.

    Raises:
        AdapterMismatch: wrong count, a wrong shape, or a non-finite value; the model is left untouched.
    """
    state = get_peft_model_state_dict(model)
    if len(arrays) != len(state):
        raise AdapterMismatch(f"expected {len(state)} adapter arrays, got {len(arrays)}")
    loaded = {}
    for (name, current), array in zip(state.items(), arrays):
        if tuple(array.shape) != tuple(current.shape):
            raise AdapterMismatch(f"{name}: expected shape {tuple(current.shape)}, got {tuple(array.shape)}")
        if not np.all(np.isfinite(array)):
            raise AdapterMismatch(f"{name}: contains NaN or Inf")
        loaded[name] = torch.from_numpy(np.asarray(array)).to(current.dtype)
    result = set_peft_model_state_dict(model, loaded)
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
