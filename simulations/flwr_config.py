"""`python -m simulations.flwr_config [overrides] > run.toml`: the composed settings for `flwr run --run-config`.

The same Hydra composition as `simulations.run`, emitted as the one JSON value the Flower apps read, so a
run started with `flwr run` (or on a real SuperLink) is configured exactly like a simulation.
Outputs go to `+output_dir=PATH` (default outputs/flwr-run).
"""

from __future__ import annotations

import json
import sys

from fedlm.settings import ConfigError
from simulations.run import compose_settings

if __name__ == "__main__":
    try:
        settings = compose_settings(sys.argv[1:], "outputs/flwr-run")
    except ConfigError as err:
        sys.exit(f"Configuration error: {err}")
    print(f"settings = {json.dumps(settings.to_json())}")
