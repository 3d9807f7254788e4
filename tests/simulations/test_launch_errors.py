"""Bad input stops a run before any work starts, with one message that names the key or file and the fix."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from simulations.launch import OFFLINE_ENV, prepare

ROOT = Path(__file__).resolve().parents[2]


def _settings(tmp_path, **sections) -> RunSettings:
    return settings_from_dict(RunSettings, {"output_dir": str(tmp_path / "run"), **sections})


def test_missing_data_path_is_named(tmp_path, tiny_llama_dir):
    settings = _settings(tmp_path, model={"name_or_path": str(tiny_llama_dir)},
                         dataset={"source": "text_folder", "path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match=r"dataset\.path=.*nowhere.* does not exist"):
        prepare(settings)
    assert not (tmp_path / "run" / "data").exists()


def test_empty_data_folder_is_named(tmp_path, tiny_llama_dir):
    # The folder's name must not be able to satisfy the match: only the message's own words can.
    (tmp_path / "corpus").mkdir()
    settings = _settings(tmp_path, model={"name_or_path": str(tiny_llama_dir)}, dataset={"path": str(tmp_path / "corpus")})
    with pytest.raises(ConfigError, match=r"dataset\.path=.*corpus' has no \.txt files; add UTF-8 \.txt files"):
        prepare(settings)


def test_unknown_model_is_named_with_the_fix(tmp_path, monkeypatch):
    # Offline mode (read once at import, hence the attribute): a hub id fails at once instead of retrying.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    settings = _settings(tmp_path, model={"name_or_path": "no-such-owner/no-such-model"})
    with pytest.raises(ConfigError, match=r"model\.name_or_path='no-such-owner/no-such-model' could not be loaded.*use `embedded`"):
        prepare(settings)


def test_a_model_folder_without_config_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    settings = _settings(tmp_path, model={"name_or_path": str(tmp_path / "model")})
    with pytest.raises(ConfigError, match="has no config.json"):
        prepare(settings)


def test_a_partition_with_too_little_data_names_the_client(tmp_path, tiny_llama_dir, text_folder):
    settings = _settings(tmp_path, model={"name_or_path": str(tiny_llama_dir)},
                         dataset={"path": str(text_folder), "seq_len": 32, "min_train_sequences": 10_000},
                         federation={"num_clients": 2, "clients_per_round": 2}, secagg={"name": "disabled"})
    with pytest.raises(ConfigError, match=r"client 0 .*needs dataset\.min_train_sequences=10000"):
        prepare(settings)
    assert not list((tmp_path / "run").rglob("client_*.pt"))  # nothing half-written


def test_a_wrong_data_path_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    import fedlm.model
    monkeypatch.setattr(fedlm.model, "load_base_model", lambda *a, **k: pytest.fail("model loaded first"))
    settings = _settings(tmp_path, dataset={"path": str(tmp_path / "typo.jsonl")})
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(settings)


def test_a_missing_central_eval_path_is_named(tmp_path, tiny_llama_dir, text_folder):
    settings = _settings(tmp_path, model={"name_or_path": str(tiny_llama_dir)}, dataset={"path": str(text_folder)},
                         server={"central_eval_path": str(tmp_path / "gone")})
    with pytest.raises(ConfigError, match=r"server\.central_eval_path=.*gone.* does not exist"):
        prepare(settings)


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# Each case: (make the data under a folder -> dataset/other sections, the error it must raise). Token-level
# cases need the tokenizer; none may need the model's weights.
BAD_INPUTS = {
    "empty folder": (lambda d: {"dataset": {"path": str(_folder(d / "e"))}}, r"dataset\.path=.*e' has no \.txt files"),
    "empty files": (lambda d: {"dataset": {"path": str(_write(d / "f" / "a.txt", b"  \n").parent)}},
                    r"dataset\.path=.*f' holds no text: none of its 1 \.txt file"),
    "not UTF-8": (lambda d: {"dataset": {"path": str(_write(d / "f" / "a.txt", b"ok\n\xff").parent)}},
                  r"a\.txt is not UTF-8 text \(invalid start byte at byte 3, line 2\)"),
    "malformed .jsonl": (lambda d: {"dataset": {"path": str(_write(d / "d.jsonl", b'{"text": "a"}\n{"text": }\n'))}},
                         r"d\.jsonl, line 2: invalid JSON"),
    "a lone .txt": (lambda d: {"dataset": {"path": str(_write(d / "all.txt", b"text"))}},
                    r"dataset\.path=.*all\.txt' is a single \.txt file"),
    "too few rows": (lambda d: {"dataset": {"seq_len": 32, "min_train_sequences": 10_000}},
                     r"client 0 .*needs dataset\.min_train_sequences=10000"),
    "fewer rows than a batch": (lambda d: {"dataset": {"seq_len": 32, "min_train_sequences": 1}, "train": {"batch_size": 5000}},
                                r"client 0 .*fewer than one batch \(train\.batch_size=5000\)"),
    "seq_len past the context": (lambda d: {"dataset": {"seq_len": 128}},
                                 r"dataset\.seq_len=128 exceeds the context of model\.name_or_path=.* \(64 tokens\); "
                                 r"set dataset\.seq_len<=64"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_before_the_weights_load_and_writes_nothing(case, tmp_path, tiny_llama_dir, text_folder,
                                                                      monkeypatch):
    import fedlm.model
    monkeypatch.setattr(fedlm.model.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model's weights were loaded before the input was checked"))
    make, message = BAD_INPUTS[case]
    sections = make(tmp_path)
    dataset = {"path": str(text_folder), "seq_len": 32, "min_train_sequences": 2, "min_eval_sequences": 1,
               **sections.pop("dataset", {})}
    settings = _settings(tmp_path, model={"name_or_path": str(tiny_llama_dir)}, dataset=dataset,
                         federation={"num_clients": 2, "clients_per_round": 2}, secagg={"name": "disabled"},
                         train={"batch_size": 2, **sections.pop("train", {})})
    with pytest.raises(ConfigError, match=message):
        prepare(settings)
    run = tmp_path / "run"
    assert not (run / "settings.json").exists() and not list(run.rglob("client_*.pt"))


@pytest.mark.integration  # starts processes
@pytest.mark.parametrize("override, message", [
    ("federation.rounds=abc", "federation.rounds must be a whole number (got 'abc')"),
    ("federation.rounds=true", "federation.rounds must be a whole number (got True)"),
    ("train.learning_rate=[1]", "train.learning_rate must be a number (got [1])"),
    ("train.learning_rate=inf", "train.learning_rate must be a finite number (got inf)"),
    ("privacy.target_epsilon=-1", "privacy.target_epsilon must be > 0 (got -1.0); try 8"),
    ("federation.rondz=3", "unknown setting federation.rondz; did you mean federation.rounds?"),
])
def test_the_command_line_refuses_bad_overrides_in_one_line(override, message, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(tmp_path / "flwr")}
    done = subprocess.run([sys.executable, "-m", "simulations.run", override, f"hydra.run.dir={run}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"Configuration error: {message}"  # one line, no traceback
    assert not (run / "settings.json").exists() and not (run / "data").exists()
