"""`python -m simulations.run [overrides]`: compose the Hydra config and run a simulated federation."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedlm.settings import ConfigError, RunSettings, settings_from_dict
from simulations.launch import simulate


def to_settings(cfg: DictConfig, output_dir: str) -> RunSettings:
    """The composed config as validated settings; every key and type error surfaces here."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    data["output_dir"] = output_dir
    return settings_from_dict(RunSettings, data)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        settings = to_settings(cfg, HydraConfig.get().runtime.output_dir)
        return simulate(settings).final_perplexity
    except ConfigError as err:
        # One clear line, no traceback: the message already names the key or file and the fix.
        print(f"Configuration error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
