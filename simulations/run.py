"""`python -m simulations.run [overrides]`: compose the Hydra config and run a simulated federation."""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedlm.settings import ConfigError, RunSettings, check_resumable, settings_from_dict
from server.checkpoint import read_state
from simulations.launch import simulate
from strategies import check_strategy

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def to_settings(cfg: DictConfig, output_dir: str) -> RunSettings:
    """The composed config as validated settings; every key and type error surfaces here."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    data["output_dir"] = str(data.pop("output_dir", output_dir))
    settings = settings_from_dict(RunSettings, data)
    check_strategy(settings)  # `strategy.name=...` and the strategy's rules, before any data is read
    return settings


def compose_settings(overrides: list[str], output_dir: str) -> RunSettings:
    """Compose conf/ with `overrides` outside a Hydra app (tests, `flwr run` export)."""
    check_override_keys(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_settings(compose(config_name="config", overrides=overrides), output_dir)


def resumed_settings(composed: RunSettings, overrides: list[str]) -> RunSettings:
    """The settings the run in `composed.resume` committed, changed only where `overrides` say so.

    Raises:
        ConfigError: no committed round there, or an override of what a resumed run must keep.
    """
    run_dir = composed.resume
    original = read_state(Path(run_dir)).settings
    data, new = json.loads(original.to_json()), json.loads(composed.to_json())
    for override in overrides:
        *parents, leaf = override.split("=", 1)[0].lstrip("+~").split(".")
        if parents + [leaf] == ["resume"]:
            continue
        if parents[:1] + [leaf] == ["experiment"] or (parents or [leaf])[0] not in new:
            raise ConfigError(f"resume={run_dir} takes key=value overrides, not {override}")
        target, source = data, new
        for part in parents:
            target, source = target[part], source[part]
        target[leaf] = source[leaf]
    settings = settings_from_dict(RunSettings, data | {"resume": run_dir, "output_dir": run_dir})
    check_resumable(original, settings, run_dir)
    return settings


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def check_override_keys(overrides: list[str]) -> None:
    """Refuse a misspelt `key=value` override with the nearest valid key, before Hydra's terser error.

    Raises:
        ConfigError: naming the unknown key and the closest existing one.
    """
    plain = [o.split("=", 1)[0] for o in overrides if "=" in o and not o.startswith(("+", "~", "hydra."))]
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    choices = [o for o in overrides if o.split("=", 1)[0].lstrip("+") in groups]
    for choice in choices:  # Hydra's own answer to a missing option is a 55-line traceback
        group, _, option = choice.lstrip("+").partition("=")
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        if option not in options:
            raise ConfigError(f"{group}={option!r} is unknown; choose one of {options}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=choices))
    known = set(_leaf_keys(cfg)) | groups
    for key in plain:
        if key not in known and not any(k.startswith(key + ".") for k in known):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see conf/config.yaml for the valid keys"
            raise ConfigError(f"unknown setting {key}{hint}")


def refuse(err: ConfigError) -> None:
    # One clear line, no traceback: the message already names the key or file and the fix.
    print(f"Configuration error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        settings = to_settings(cfg, HydraConfig.get().runtime.output_dir)
        if settings.resume:
            settings = resumed_settings(settings, list(HydraConfig.get().overrides.task))
        if settings.deployment.name == "superlink":
            from simulations.deploy import deploy
            return deploy(settings).final_perplexity
        return simulate(settings).final_perplexity
    except ConfigError as err:
        refuse(err)


if __name__ == "__main__":
    try:
        check_override_keys([a for a in sys.argv[1:] if not a.startswith("-")])
    except ConfigError as err:
        refuse(err)
    main()
