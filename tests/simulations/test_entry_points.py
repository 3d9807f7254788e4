"""The two other ways users start a run: a Hydra multirun sweep, and Flower's own `flwr run` (the ServerApp
prepares the data itself there). Both on a tiny model, end to end, with real processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.record import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _tiny(model_dir: Path, data_dir: Path) -> list[str]:
    return [f"model.name_or_path={model_dir}", "dataset=text_folder", f"dataset.path={data_dir}",
            "dataset.seq_len=32", "dataset.min_train_sequences=4", "dataset.min_eval_sequences=1",
            "federation.num_clients=2", "federation.clients_per_round=2", "federation.rounds=1",
            "train.local_steps=1", "train.batch_size=4", "train.max_eval_sequences=4",
            "privacy=disabled", "secagg=disabled"]


def test_a_multirun_sweep_runs_every_job_into_its_own_folder(tmp_path, tiny_llama_dir, text_folder):
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "simulations.run", "-m", "seed=0,1",
                           *_tiny(tiny_llama_dir, text_folder), f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for job, seed in ((0, 0), (1, 1)):
        rows = read_metrics(sweep / str(job))
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_ok"] == 2
        assert json.loads((sweep / str(job) / "settings.json").read_text())["seed"] == seed
    # Different seeds draw different adapters: the jobs are two runs, not one run written twice.
    first, second = (read_metrics(sweep / str(j))[1]["eval_loss"] for j in (0, 1))
    assert first != second


def test_flwr_run_prepares_its_data_in_the_server_app_and_trains(tmp_path, tiny_llama_dir, text_folder):
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # flwr starts flower-superlink
    out = tmp_path / "run"
    config = subprocess.run([sys.executable, "-m", "simulations.flwr_config", *_tiny(tiny_llama_dir, text_folder),
                             f"+output_dir={out}"], cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    (tmp_path / "run.toml").write_text(config.stdout)
    try:
        done = subprocess.run(["flwr", "run", ".", "local", "--stream", "--run-config", str(tmp_path / "run.toml"),
                               "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    finally:  # `flwr run` leaves its managed SuperLink running: stop the one this test started
        subprocess.run(["pkill", "-f", f"flower-superlink.*{tmp_path / 'flwr'}"], check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_ok"] == 2 and not rows[1]["abandoned"]
    assert (out / "data" / "summary.json").exists() and not (out / "settings.json").exists()  # no launcher ran
    assert (out / "adapter" / "adapter_model.safetensors").exists()
