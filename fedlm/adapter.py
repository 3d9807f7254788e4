"""The adapter wire format: a LoRA adapter <-> the ordered float32 arrays that travel, checked both ways."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict


class AdapterMismatch(ValueError):
    """Arrays that do not fit this model's adapter (count, shape or values)."""


def _rank_axis(name: str) -> int | None:
    """Which axis of a wire tensor is the LoRA rank (PEFT's shapes, GPT-2's fan_in_fan_out included)."""
    return 0 if ".lora_A." in name else 1 if ".lora_B." in name else None


def freeze_lora_a(model: PeftModel) -> None:
    """FFA-LoRA: fix every lora_A as the shared seed drew it (only lora_B trains; WireFormat leaves A off the wire).

    Every party builds the same A (`apply_lora` seeds it), so A never needs to travel, and averaging B alone
    is exact: mean_i(B_i A) = (mean_i B_i) A. The upload is about halved.
    """
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)


@dataclass(frozen=True)
class WireFormat:
    """What travels for a run's adapter, agreed by every party: the tensors in wire order and their global shapes,
    and the dtype replies come in. Every conversion between an adapter and its arrays, and the server's check of
    a reply, go through it.

    Heterogeneous ranks: the shapes carry the global rank. A party with a smaller adapter sends each lora_A
    [r_i, in] zero-padded to [r, in] and each lora_B [out, r_i] to [out, r], and loads the first r_i rows of A
    and columns of B (HetLoRA's truncation). Zero padding adds nothing to B @ A, so aggregation stays the plain
    weighted sum that SecAgg+ and every mean-based strategy compute.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    frozen_a: bool = False
    """FFA-LoRA: only the lora_B tensors travel."""
    secure: bool = False
    """SecAgg+: replies travel as float64, since SecAgg+ quantises on the client, in the arrays' dtype, and
    float32's 24-bit mantissa cannot resolve its 2^30 levels (only masked integers leave, so precision is free).
    Plain replies and every download are float32 (ArrayRecord rejects bfloat16)."""
    base_digest: str = ""
    """Room for a digest of the base model the adapter belongs to (empty: not checked)."""

    @classmethod
    def of(cls, model: PeftModel, rank: int, *, frozen_a: bool = False, secure: bool = False) -> WireFormat:
        """The wire format of `model`'s adapter at the global `rank` (at least the adapter's own)."""
        state = get_peft_model_state_dict(model)
        names = tuple(n for n in state if not (frozen_a and ".lora_A." in n))

        def global_shape(name: str) -> tuple[int, ...]:
            shape, axis = tuple(state[name].shape), _rank_axis(name)
            return shape if axis is None else shape[:axis] + (max(rank, shape[axis]),) + shape[axis + 1:]

        return cls(names, tuple(global_shape(n) for n in names), frozen_a, secure)

    @property
    def reply_dtype(self) -> type:
        return np.float64 if self.secure else np.float32

    def _padded(self, tensors: list[torch.Tensor], dtype: type) -> list[np.ndarray]:
        arrays = []
        for tensor, shape in zip(tensors, self.shapes):
            local = tensor.detach().cpu().to(torch.float64).numpy()
            array = np.zeros(shape, dtype)
            array[tuple(slice(0, n) for n in local.shape)] = local
            arrays.append(array)
        return arrays

    def to_arrays(self, model: PeftModel) -> list[np.ndarray]:
        """`model`'s adapter as float32 wire arrays (a download, a checkpoint, or a plain reply)."""
        state = get_peft_model_state_dict(model)
        return self._padded([state[n] for n in self.names], np.float32)

    def reply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Arrays as a training reply carries them (`reply_dtype`)."""
        return [np.asarray(a, self.reply_dtype) for a in arrays]

    def gradients_to_arrays(self, model: PeftModel, gradients: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """Gradients keyed by parameter name (`model.named_parameters()`) as float64 arrays in wire order and
        shapes: what privacy=distributed_dp_sgd sends in place of the adapter.

        Raises:
            AdapterMismatch: a wire tensor has no gradient.
        """
        adapter = f".{model.active_adapter}"  # PEFT's state dict drops the adapter's name from parameter names
        by_name = {name.replace(adapter, ""): g for name, g in gradients.items()}
        missing = [n for n in self.names if n not in by_name]
        if missing:
            raise AdapterMismatch(f"no gradient for adapter tensors {missing[:3]}")
        return self._padded([by_name[n] for n in self.names], np.float64)

    def problem(self, arrays: list[np.ndarray]) -> str | None:
        """Why `arrays` are not a reply in this format (count, shapes, dtype, finite values), or None."""
        if len(arrays) != len(self.shapes):
            return f"it has {len(arrays)} tensors, the adapter has {len(self.shapes)}"
        for i, (array, shape) in enumerate(zip(arrays, self.shapes)):
            if array.shape != shape:
                return f"tensor {i} has shape {array.shape}, expected {shape}"
            if not np.issubdtype(array.dtype, np.floating):
                return f"tensor {i} has dtype {array.dtype}, expected a float type"
            if not np.isfinite(array).all():
                return f"tensor {i} holds NaN or Inf"
        return None

    def load(self, model: PeftModel, arrays: list[np.ndarray]) -> None:
        """Load wire arrays into `model`'s adapter (a frozen A is left as it is), truncated to its own rank.

        Raises:
            AdapterMismatch: wrong count, a wrong shape, or a non-finite value; the model is left untouched.
        """
        if len(arrays) != len(self.names):
            raise AdapterMismatch(f"expected {len(self.names)} adapter arrays, got {len(arrays)}")
        state = get_peft_model_state_dict(model)
        loaded = {}
        for name, shape, array in zip(self.names, self.shapes, arrays):
            if tuple(array.shape) != shape:  # strict: exactly the global rank
                raise AdapterMismatch(f"{name}: expected shape {shape}, got {tuple(array.shape)}")
            if not np.all(np.isfinite(array)):
                raise AdapterMismatch(f"{name}: contains NaN or Inf")
            current = state[name]
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
