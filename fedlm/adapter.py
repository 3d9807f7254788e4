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
_WIRE_RANK = "_pollinate_wire_rank"  # set by set_wire_rank: the global rank the wire arrays carry


def set_wire_rank(model: PeftModel, rank: int) -> None:
    """Heterogeneous ranks: this party's adapter travels at the global `rank` (>= its own).

    Out, each lora_A [r_i, in] is zero-padded to [rank, in] and each lora_B [out, r_i] to [out, rank]; in,
    the first r_i rows of A and columns of B are kept (HetLoRA's truncation). Zero padding adds nothing to
    B @ A, so aggregation stays the plain weighted sum that SecAgg+ and every mean-based strategy compute.
    """
    setattr(model, _WIRE_RANK, rank)


def _rank_axis(name: str) -> int | None:
    """Which axis of a wire tensor is the LoRA rank (PEFT's shapes, GPT-2's fan_in_fan_out included)."""
    return 0 if ".lora_A." in name else 1 if ".lora_B." in name else None


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


def _wire_shape(model: PeftModel, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    rank, axis = model.__dict__.get(_WIRE_RANK), _rank_axis(name)
    if rank is None or axis is None or shape[axis] >= rank:
        return shape
    return shape[:axis] + (rank,) + shape[axis + 1:]


def _to_wire(model: PeftModel, tensors: dict[str, torch.Tensor], dtype: type) -> list[np.ndarray]:
    arrays = []
    for name, tensor in tensors.items():
        local = tensor.detach().to(torch.float64 if dtype == np.float64 else torch.float32).cpu().numpy()
        array = np.zeros(_wire_shape(model, name, local.shape), dtype)
        array[tuple(slice(0, n) for n in local.shape)] = local
        arrays.append(array)
    return arrays


def adapter_to_arrays(model: PeftModel) -> list[np.ndarray]:
    """The adapter's wire tensors as float32 arrays (ArrayRecord rejects bfloat16), in wire order, zero-padded
    to the global rank (set_wire_rank)."""
    return _to_wire(model, _wire_state(model), np.float32)


def gradients_to_arrays(model: PeftModel, gradients: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Gradients keyed by parameter name (`model.named_parameters()`), as float64 arrays in the adapter's wire
    order and shapes: what privacy=distributed_dp_sgd sends in place of the adapter.

    Raises:
        AdapterMismatch: a wire tensor has no gradient.
    """
    adapter = f".{model.active_adapter}"  # PEFT's state dict drops the adapter's name from parameter names
    by_wire_name = {name.replace(adapter, ""): g for name, g in gradients.items()}
    missing = [n for n in adapter_names(model) if n not in by_wire_name]
    if missing:
        raise AdapterMismatch(f"no gradient for adapter tensors {missing[:3]}")
    return _to_wire(model, {n: by_wire_name[n] for n in adapter_names(model)}, np.float64)


def arrays_to_adapter(model: PeftModel, arrays: list[np.ndarray]) -> None:
    """Load wire arrays into `model`'s adapter (a frozen A is left as it is), truncated to its own rank.

    Raises:
        AdapterMismatch: wrong count, a wrong shape, or a non-finite value; the model is left untouched.
    """
    state = _wire_state(model)
    if len(arrays) != len(state):
        raise AdapterMismatch(f"expected {len(state)} adapter arrays, got {len(arrays)}")
    loaded = {}
    for (name, current), array in zip(state.items(), arrays):
        expected = _wire_shape(model, name, tuple(current.shape))  # strict: exactly the global rank
        if tuple(array.shape) != expected:
            raise AdapterMismatch(f"{name}: expected shape {expected}, got {tuple(array.shape)}")
        if not np.all(np.isfinite(array)):
            raise AdapterMismatch(f"{name}: contains NaN or Inf")
        own = np.asarray(array)[tuple(slice(0, n) for n in current.shape)]  # first r_i rows of A / columns of B
        loaded[name] = torch.from_numpy(np.ascontiguousarray(own)).to(current.dtype)
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
