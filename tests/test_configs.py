"""Every shipped config composes into valid settings, and every setting is reachable by an override."""

import dataclasses
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedlm.settings import RunSettings
from simulations.run import to_settings

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in ("model", "dataset", "strategy", "deployment")}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option in ("text_folder", "jsonl"):
        overrides.append("dataset.path=/tmp")
    if group == "dataset" and option == "huggingface":
        overrides.append("dataset.hf_name=owner/name")
    settings = to_settings(_compose(overrides), "outputs/test")
    assert isinstance(settings, RunSettings)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    assert isinstance(to_settings(_compose([f"+experiment={experiment}"]), "outputs/test"), RunSettings)


def test_the_default_config_is_exactly_the_settings_defaults():
    """The YAML lists every setting (so each can be overridden) with the dataclasses' defaults."""
    composed = to_settings(_compose([]), RunSettings().output_dir)
    assert composed == RunSettings()


def _field_paths(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _field_paths(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name


def _yaml_paths(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _yaml_paths(value, prefix + key + ".")
        else:
            yield prefix + key


def test_yaml_names_every_setting_so_every_override_key_exists():
    yaml_keys = set(_yaml_paths(OmegaConf.to_container(_compose([]))))
    assert set(_field_paths(RunSettings)) - {"output_dir"} == yaml_keys


def test_overrides_reach_the_settings():
    settings = to_settings(_compose(["federation.rounds=2", "federation.num_clients=6",
                                     "federation.clients_per_round=3", "seed=4", "lora.r=4"]), "out")
    assert (settings.federation.rounds, settings.federation.num_clients, settings.seed, settings.lora.r) == (2, 6, 4, 4)


def test_a_misspelt_override_names_the_nearest_key():
    from fedlm.settings import ConfigError
    from simulations.run import compose_settings
    with pytest.raises(ConfigError, match=r"unknown setting federation\.rondz; did you mean federation\.rounds\?"):
        compose_settings(["federation.rondz=2"], "out")
    with pytest.raises(ConfigError, match=r"unknown setting model\.embedded\.seed"):
        compose_settings(["model=gpt2", "model.embedded.seed=3"], "out")  # gpt2 has no embedded block
    assert compose_settings(["model=gpt2", "federation.rounds=1"], "out").model.name_or_path == "openai-community/gpt2"
