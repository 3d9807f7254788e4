"""Bad input stops a run before any work starts, with one message that names the key or file and the fix."""

import pytest

from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from simulations.launch import prepare


def _settings(tmp_path, **sections) -> RunSettings:
    return settings_from_dict(RunSettings, {"output_dir": str(tmp_path / "run"), **sections})


def test_missing_data_path_is_named(tmp_path, tiny_llama_dir):
    settings = _settings(tmp_path, model={"name_or_path": str(tiny_llama_dir)},
                         dataset={"source": "text_folder", "path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match=r"dataset\.path=.*nowhere.* does not exist"):
        prepare(settings)
    assert not (tmp_path / "run" / "data").exists()


def test_empty_data_folder_is_named(tmp_path, tiny_llama_dir):
    (tmp_path / "empty").mkdir()
    settings = _settings(tmp_path, model={"name_or_path": str(tiny_llama_dir)}, dataset={"path": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="empty"):
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
