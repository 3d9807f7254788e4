"""A wrong choice (a config group option, a strategy, its rules, LoRA targets) stops the run in one line, before
any data is read or any weight loads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from simulations.launch import OFFLINE_ENV, prepare

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration  # starts the launcher as a user would
@pytest.mark.parametrize("overrides, message", [
    (["strategy=fedavgg"], "strategy='fedavgg' is unknown; choose one of ['fedadagrad', 'fedadam', 'fedavg', "
                           "'fedprox', 'fedyogi', 'frozen_a']"),
    (["strategy.name=fedavgg"], "strategy='fedavgg' is unknown; choose one of ['fedadagrad', 'fedadam', 'fedavg', "
                                "'fedprox', 'fedyogi', 'frozen_a']"),
    (["model=gpt3"], "model='gpt3' is unknown; choose one of ['embedded', 'gpt2', 'qwen2_5_0_5b', 'smollm2_135m']"),
    (["strategy=fedprox", "strategy.mu=0"], "strategy=fedprox needs strategy.mu > 0 (got 0: that is plain FedAvg); "
                                            "try strategy.mu=0.01, or use strategy=fedavg"),
])
def test_a_wrong_choice_is_one_line_and_nothing_is_prepared(overrides, message, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(tmp_path / "flwr"), "POLLINATE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "simulations.run", *overrides, f"hydra.run.dir={run}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert (done.returncode, done.stderr.strip()) == (2, f"Configuration error: {message}")
    assert not (run / "data").exists() and not (tmp_path / "cache").exists()  # no data, no base model built


def test_lora_targets_naming_no_module_stop_before_any_data_is_prepared(tmp_path, tiny_llama_dir, text_folder,
                                                                         monkeypatch):
    import fedlm.model
    monkeypatch.setattr(fedlm.model.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model's weights were loaded before the input was checked"))
    settings = settings_from_dict(RunSettings, {
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_llama_dir)},
        "lora": {"target_modules": ["qkv_proj"]}, "secagg": {"name": "disabled"},
        "dataset": {"path": str(text_folder), "seq_len": 32}, "federation": {"num_clients": 2, "clients_per_round": 2}})
    with pytest.raises(ConfigError, match=r"lora.target_modules=\('qkv_proj',\) does not fit this llama model"):
        prepare(settings)
    assert not (tmp_path / "run" / "data").exists()
