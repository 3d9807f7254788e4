"""The data pipeline, one job per module: sources.py reads text (the registry of `dataset.source` readers,
torch-free, so a device checks its data without loading torch), partitioning.py splits a corpus among clients,
packing.py turns text into token rows, preparation.py prepares a federation's or a device's data.

Importing the package loads none of them: `from fedlm.data import ClientData` loads preparation.py (and torch)
on first use, so that importing sources.py alone loads no torch. Code in this repository imports from the
modules themselves."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "READERS": "sources", "check_local_text": "sources", "load_corpus": "sources", "load_texts": "sources",
    "partition_corpus": "partitioning",
    "pack_texts": "packing",
    "ClientData": "preparation", "build_client_data": "preparation", "client_data_path": "preparation",
    "prepare_device_data": "preparation", "prepare_federation": "preparation",
}
"""Each public name and the module that holds it."""
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """A public name from its module, imported on first use (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
