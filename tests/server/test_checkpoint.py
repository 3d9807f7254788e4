"""The run-state writer under kill -9: every restart finds the last committed round whole, or the one before."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from server.checkpoint import load_strategy_state, read_state, write_state
from strategies import build_strategy, strategy_layers

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(64, 32), (32, 64), (4096,)]

# The child commits rounds as fast as it can (each state holds the round number in every value) and prints
# each round once write_state has returned.
CHILD = """
import sys
import numpy as np
from pathlib import Path
from flwr.common import ndarrays_to_parameters
from fedlm.settings import RunSettings, settings_from_dict
from server.checkpoint import read_state, write_state
from strategies import build_strategy
run_dir, shapes = Path(sys.argv[1]), {shapes!r}
settings = settings_from_dict(RunSettings, {{"strategy": {{"name": "fedadam"}}, "secagg": {{"name": "disabled"}}}})
start = read_state(run_dir).server_round + 1 if (run_dir / "state" / "manifest.json").exists() else 0
strategy = build_strategy(settings, ndarrays_to_parameters([np.zeros(s, np.float32) for s in shapes]))
print("ready", flush=True)
for server_round in range(start, 10**6):
    write_state(run_dir, server_round, [np.full(s, server_round, np.float32) for s in shapes], strategy, settings)
    print(server_round, flush=True)
""".format(shapes=SHAPES)


def _settings() -> RunSettings:
    return settings_from_dict(RunSettings, {"strategy": {"name": "fedadam"}, "secagg": {"name": "disabled"}})


@pytest.mark.integration  # starts processes
def test_every_restart_after_a_kill_finds_a_whole_committed_round(tmp_path):
    rng = random.Random(0)
    last_seen = -1
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.01, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        printed = [int(line) for line in child.communicate()[0].split()]
        state = read_state(tmp_path)  # raises on any inconsistency (hash mismatch, missing file)
        committed = max(printed, default=last_seen)
        # Every round the writer reported is on disk; one more may have committed just before the kill.
        assert committed <= state.server_round <= committed + 1
        assert all(np.all(a == state.server_round) and a.shape == s for a, s in zip(state.arrays, SHAPES))
        last_seen = state.server_round
    assert last_seen > 6  # the kills did land while rounds were being written
    assert len(list((tmp_path / "state").glob("round_*.npz"))) <= 2  # old rounds are cleaned up


def test_a_strategy_state_round_trips_and_tampering_is_caught(tmp_path):
    settings = _settings()
    initial = ndarrays_to_parameters([np.zeros(3, np.float32)])
    strategy = build_strategy(settings, initial)
    optimizer = strategy_layers(strategy)[-1]
    optimizer.m_t, optimizer.v_t = [np.full(3, 0.5, np.float32)], [np.full(3, 0.25, np.float32)]
    write_state(tmp_path, 3, [np.ones(3, np.float32)], strategy, settings)

    state = read_state(tmp_path)
    fresh = build_strategy(settings, ndarrays_to_parameters(state.arrays))
    load_strategy_state(fresh, state.strategy_state, tmp_path)
    assert state.server_round == 3 and state.settings == settings
    np.testing.assert_array_equal(strategy_layers(fresh)[-1].m_t[0], optimizer.m_t[0])

    data_file = next((tmp_path / "state").glob("round_*.npz"))
    tampered = bytearray(data_file.read_bytes())
    tampered[-1] ^= 0xFF
    data_file.write_bytes(bytes(tampered))
    with pytest.raises(ConfigError, match="does not match the SHA-256"):
        read_state(tmp_path)
    with pytest.raises(ConfigError, match="no committed round"):
        read_state(tmp_path / "elsewhere")


def test_resume_with_a_mismatched_optimizer_state_is_refused(tmp_path):
    """A committed FedAdam state cannot be resumed by a strategy that keeps other (or no) state."""
    adam = _settings()
    initial = ndarrays_to_parameters([np.zeros(3, np.float32)])
    write_state(tmp_path, 2, [np.ones(3, np.float32)], build_strategy(adam, initial), adam)
    state = read_state(tmp_path)
    plain = build_strategy(settings_from_dict(RunSettings, {"strategy": {"name": "fedavg"}}), initial)
    with pytest.raises(ConfigError, match=r"holds strategy state for \['ServerAdam'\] but the running strategy "
                                          r"keeps state in nothing; it cannot be restored exactly"):
        load_strategy_state(plain, state.strategy_state, tmp_path)
    wider = build_strategy(adam, ndarrays_to_parameters([np.zeros(5, np.float32)]))
    with pytest.raises(ConfigError, match=r"the saved state of ServerAdam does not fit this run"):
        load_strategy_state(wider, state.strategy_state, tmp_path)
