"""The run's state after each committed round, so `resume=<run dir>` can continue a stopped or crashed run.

`state/round_NNNNN.npz` holds the global adapter (wire arrays) and every strategy layer's state (server
optimiser moments, client-level DP rounds). `state/manifest.json` names the committed file, its SHA-256 and
the settings of the run: it is replaced last, atomically, so a kill at any moment leaves either the previous
committed round or the new one, never a mix. Client sampling needs no saved random state: each round's cohort
is drawn from (seed, round) (server/sampling.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.server.strategy import Strategy

from fedlm.files import sha256_of, write_atomic
from fedlm.settings import ConfigError, RunSettings
from strategies import strategy_layers

STATE_DIR = "state"
MANIFEST = "manifest.json"


@dataclass
class RunState:
    server_round: int
    arrays: list[np.ndarray]
    strategy_state: dict[str, np.ndarray]
    settings: RunSettings


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Every layer's `state_dict()`, keyed `<layer class>.<key>`."""
    return {f"{type(layer).__name__}.{key}": value for layer in strategy_layers(strategy)
            if hasattr(layer, "state_dict") for key, value in layer.state_dict().items()}


def load_strategy_state(strategy: Strategy, state: dict[str, np.ndarray], run_dir: Path) -> None:
    """Give every stateful layer of `strategy` its saved state; refuse what cannot be restored exactly.

    Raises:
        ConfigError: a saved layer the running strategy lacks, a stateful layer with no saved state, or state
            that does not fit it (another adapter shape): resuming would silently restart its moments at zero.
    """
    stateful = {type(layer).__name__: layer for layer in strategy_layers(strategy) if hasattr(layer, "state_dict")}
    saved = {key.split(".", 1)[0] for key in state}
    if saved != set(stateful):
        raise ConfigError(f"resume={run_dir}: the committed state holds strategy state for {sorted(saved) or 'nothing'} "
                          f"but the running strategy keeps state in {sorted(stateful) or 'nothing'}; it cannot be "
                          "restored exactly (was it written by another strategy or Pollinate version?); start a new run")
    for name, layer in stateful.items():
        prefix = f"{name}."
        try:
            layer.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
        except (KeyError, ValueError) as err:
            raise ConfigError(f"resume={run_dir}: the saved state of {name} does not fit this run ({err}); start a "
                              "new run") from None


def write_state(run_dir: Path, server_round: int, arrays: list[np.ndarray], strategy: Strategy,
                settings: RunSettings) -> None:
    """Commit round `server_round`: the data file first, then the manifest that points at it."""
    folder = run_dir / STATE_DIR
    name = f"round_{server_round:05d}.npz"
    payload = {f"adapter.{i}": a for i, a in enumerate(arrays)} | {
        f"strategy.{key}": value for key, value in strategy_state(strategy).items()}
    write_atomic(folder / name, lambda f: np.savez(f, **payload))
    manifest = {"round": server_round, "file": name, "sha256": sha256_of(folder / name),
                "settings": json.loads(settings.to_json())}
    write_atomic(folder / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    for old in folder.glob("round_*.npz"):  # only after the manifest moved on
        if old.name != name:
            old.unlink(missing_ok=True)


def read_state(run_dir: Path) -> RunState:
    """The last committed round of the run in `run_dir`.

    Raises:
        ConfigError: no committed round, or a state file that does not match its manifest.
    """
    folder = run_dir / STATE_DIR
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ConfigError(f"resume={run_dir}: no committed round ({folder / MANIFEST} is missing); a run "
                          "commits its state after round 0, so start a new run instead") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"resume={run_dir}: {folder / MANIFEST} is not valid JSON ({error})") from None
    data_file = folder / manifest["file"]
    if not data_file.exists() or sha256_of(data_file) != manifest["sha256"]:
        raise ConfigError(f"resume={run_dir}: {data_file} is missing or does not match the SHA-256 in "
                          f"{folder / MANIFEST}; the state was altered after it was committed")
    with np.load(io.BytesIO(data_file.read_bytes())) as saved:
        arrays = [saved[f"adapter.{i}"] for i in range(sum(k.startswith("adapter.") for k in saved.files))]
        state = {k[len("strategy."):]: saved[k] for k in saved.files if k.startswith("strategy.")}
    return RunState(int(manifest["round"]), arrays, state, RunSettings.from_json(json.dumps(manifest["settings"])))
