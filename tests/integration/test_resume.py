"""Kill a running simulation mid-round with SIGKILL, resume it, and get the uninterrupted run's adapter."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import read_state

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
# Identical runs agree to float32 rounding: client training is seeded by (seed, round, client), cohorts by
# (seed, round), and FedAdam's state is restored exactly; only summation order could differ.
TOLERANCE = 1e-6


def _overrides(model_dir: Path, data_dir: Path, run_dir: Path) -> list[str]:
    return [f"model.name_or_path={model_dir}", "dataset=text_folder", f"dataset.path={data_dir}",
            "dataset.seq_len=32", "dataset.min_train_sequences=4", "dataset.min_eval_sequences=1",
            "federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=4",
            "train.local_steps=3", "train.batch_size=4", "train.max_eval_sequences=4",
            "privacy=disabled", "secagg=disabled",  # DP noise is secret by design: no two runs could agree
            "strategy=fedadam", "strategy.server_learning_rate=0.01", f"hydra.run.dir={run_dir}"]


def _run(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulations.run", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: the kill takes Ray's workers too


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def _committed_round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state" / "manifest.json").read_text())["round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_llama_dir, text_folder) -> Path:
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("resume") / "whole"
    _finish(_run(_overrides(tiny_llama_dir, text_folder, run_dir)))
    return run_dir


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, whole, tiny_llama_dir, text_folder):
    crashed = tmp_path / "crashed"
    victim = _run(_overrides(tiny_llama_dir, text_folder, crashed))
    deadline = time.monotonic() + 240
    while _committed_round(crashed) < 1 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into round 2: its clients are training
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate()
    killed_at = _committed_round(crashed)
    assert 1 <= killed_at < 4, f"the kill should land mid-run (committed round {killed_at})"

    output = _finish(_run(["resume=" + str(crashed), f"hydra.run.dir={tmp_path / 'resume-hydra'}"]))
    assert f"Resuming {crashed} after its committed round {killed_at}" in output

    rows = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # rounds past the commit were dropped and rerun
    expected, resumed = read_state(whole), read_state(crashed)
    assert resumed.server_round == expected.server_round == 4
    for a, b in zip(resumed.arrays, expected.arrays, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE)
    assert any(".m_t." in k for k in resumed.strategy_state)  # the optimiser moments came back too


def test_a_resume_that_changes_privacy_or_strategy_is_refused(tmp_path, whole):
    from fedlm.settings import ConfigError
    from simulations.run import compose_settings, resumed_settings

    run_dir = whole
    for override, key in (("privacy=dp_sgd", "privacy.name"), ("strategy.beta_1=0.5", "strategy.beta_1")):
        composed = compose_settings([f"resume={run_dir}", override], str(tmp_path / "other"))
        with pytest.raises(ConfigError, match=rf"resume={run_dir}: {key} was .* in that run and is .* now"):
            resumed_settings(composed, [f"resume={run_dir}", override])
    more = resumed_settings(compose_settings([f"resume={run_dir}", "federation.rounds=6"], "x"),
                            [f"resume={run_dir}", "federation.rounds=6"])
    assert more.federation.rounds == 6 and more.strategy.name == "fedadam" and more.output_dir == str(run_dir)
