"""Settings: unknown keys, wrong types and bad values are refused with a message that names the fix."""

import pytest

from fedlm.settings import (ConfigError, DatasetSettings, FederationSettings, LoraSettings, RunSettings,
                            TrainSettings, settings_from_dict, settings_from_run_config)


def test_json_round_trip_is_exact():
    settings = settings_from_dict(RunSettings, {"federation": {"rounds": 3}, "lora": {"target_modules": ["q_proj"]}})
    assert RunSettings.from_json(settings.to_json()) == settings
    assert settings.lora.target_modules == ("q_proj",)


def test_a_misspelt_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown setting federation\.num_clent; did you mean federation\.num_clients"):
        settings_from_dict(RunSettings, {"federation": {"num_clent": 3}})


@pytest.mark.parametrize("data, message", [
    ({"federation": {"rounds": "three"}}, r"federation\.rounds must be a whole number \(got 'three'\)"),
    ({"train": {"learning_rate": True}}, r"train\.learning_rate must be a number"),
    ({"model": {"trust_remote_code": "yes"}}, r"model\.trust_remote_code must be true or false"),
    ({"seed": 1.5}, r"seed must be a whole number"),
])
def test_wrong_types_name_the_key_and_the_value(data, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_dict(RunSettings, data)


@pytest.mark.parametrize("build, message", [
    (lambda: FederationSettings(num_clients=2, clients_per_round=3), r"clients_per_round \(3\) exceeds"),
    (lambda: FederationSettings(rounds=0), r"federation\.rounds must be > 0"),
    (lambda: LoraSettings(r=0), r"lora\.r must be > 0"),
    (lambda: LoraSettings(target_modules=("q_proj", "lm_head")), "must not contain lm_head"),
    (lambda: DatasetSettings(partitioner="random"), r"dataset\.partitioner='random' is unknown; choose one of"),
    (lambda: DatasetSettings(source="jsonl"), r"dataset\.source=jsonl needs dataset\.path"),
    (lambda: DatasetSettings(eval_fraction=1.0), r"dataset\.eval_fraction must be in \(0, 1\)"),
    (lambda: TrainSettings(precision="fp16"), r"train\.precision='fp16' is unknown; choose one of \['auto', 'fp32', 'bf16'\]"),
])
def test_bad_values_are_refused_when_built(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_auto_source_and_partitioner_follow_the_path(tmp_path):
    assert DatasetSettings().resolved_source() == "packages"
    assert DatasetSettings().resolved_partitioner() == "natural"
    assert DatasetSettings(path=str(tmp_path)).resolved_source() == "text_folder"
    assert DatasetSettings(path=str(tmp_path / "x.jsonl")).resolved_source() == "jsonl"
    assert DatasetSettings(path=str(tmp_path)).resolved_partitioner() == "iid"
    assert DatasetSettings(hf_name="owner/name").resolved_source() == "huggingface"


def test_run_config_carries_settings_as_one_json_value():
    settings = settings_from_dict(RunSettings, {"seed": 7})
    assert settings_from_run_config({"settings": settings.to_json()}) == settings
    assert settings_from_run_config({}) == RunSettings()
    with pytest.raises(ConfigError, match="not valid JSON"):
        settings_from_run_config({"settings": "{oops"})


def test_secagg_needs_a_cohort_its_threshold_can_be_met_in():
    with pytest.raises(ConfigError, match=r"reconstruction_threshold=3 exceeds the 2 shares .* lower it to at most 2"):
        settings_from_dict(RunSettings, {"federation": {"clients_per_round": 2}})
    with pytest.raises(ConfigError, match="num_shares must be an odd whole number"):
        settings_from_dict(RunSettings, {"secagg": {"num_shares": 4}})


def test_no_round_can_publish_one_clients_update():
    for overrides in ({"federation": {"clients_per_round": 1}, "secagg": {"name": "disabled"}},
                      {"server": {"min_replies": 3}, "federation": {"clients_per_round": 2}}):
        with pytest.raises(ConfigError, match=r"server.min_replies=\d exceeds federation.clients_per_round=\d"):
            settings_from_dict(RunSettings, overrides)
    with pytest.raises(ConfigError, match=r"server.min_replies must be >= 2 \(got 1\)"):
        settings_from_dict(RunSettings, {"server": {"min_replies": 1}})


def test_the_default_run_is_private_and_secure():
    settings = RunSettings()
    assert settings.privacy.enabled and settings.privacy.target_epsilon <= 8 and settings.secagg.enabled
    with pytest.raises(ConfigError, match="GDP accountant can under-report"):
        settings_from_dict(RunSettings, {"privacy": {"accountant": "gdp"}})


@pytest.mark.parametrize("data, message", [
    ({"federation": {"rounds": "abc"}}, r"federation\.rounds must be a whole number \(got 'abc'\)"),
    ({"federation": {"rounds": True}}, r"federation\.rounds must be a whole number \(got True\)"),
    ({"federation": {"num_clients": 2.0}}, r"federation\.num_clients must be a whole number \(got 2\.0\)"),
    ({"train": {"learning_rate": [1]}}, r"train\.learning_rate must be a number \(got \[1\]\)"),
    ({"train": {"learning_rate": float("inf")}}, r"train\.learning_rate must be a finite number \(got inf\)"),
    ({"privacy": {"target_epsilon": float("nan")}}, r"privacy\.target_epsilon must be a finite number \(got nan\)"),
    ({"privacy": {"target_epsilon": -1}}, r"privacy\.target_epsilon must be > 0 \(got -1\.0\); try 8"),
    ({"privacy": {"target_epsilon": "8"}}, r"privacy\.target_epsilon must be a number \(got '8'\)"),
    ({"dataset": {"path": ["a", "b"]}}, r"dataset\.path must be text \(got \['a', 'b'\]\)"),
    ({"dataset": {"seq_len": 4}}, r"dataset\.seq_len must be >= 8 tokens \(got 4\)"),
    ({"lora": {"client_ranks": ["x"]}}, r"lora\.client_ranks must be a whole number \(got 'x'\)"),
    ({"federation": 3}, r"federation must be a mapping \(got 3\)"),
])
def test_wrong_override_types_and_values_name_the_key_and_the_value(data, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_dict(RunSettings, data)
