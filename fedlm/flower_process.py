"""Plumbing for the Flower processes Pollinate starts: their environment, their executables, and the TLS probe."""

from __future__ import annotations

import os
import socket
import ssl
import sys
from pathlib import Path

# Offline and reproducible by default: no telemetry, no update checks, and never let Flower install
# packages at run time (it would pull a multi-GB CUDA torch).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' threads would fight the clients' torch threads
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # no GPUs here; silences Ray's warning about it
    # Ray starts workers at nice 15: on a busy machine the simulated clients, which do all the work, starve.
    "RAY_worker_niceness": "0",
}


def flower_executable(name: str) -> str:
    """A Flower command (`flwr`, `flower-superlink`, `flower-supernode`) from this Python's environment."""
    return str(Path(sys.executable).with_name(name))


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process started here (SuperLink, SuperNode, the `flwr` CLI).

    FLWR_HOME holds that process's Flower state (CLI connections, SuperNode caches); OFFLINE_ENV wins over the
    caller's environment. PATH comes first from this Python's environment: the SuperLink and SuperNode start
    flower-superexec, flwr-serverapp and flwr-clientapp by name.
    """
    return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port).

    Raises:
        ValueError: `address` is not HOST:PORT.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def answers_tls(host: str, port: int, ca: Path, timeout: float) -> bool:
    """Whether host:port completed a TLS handshake checked against `ca`; False if nothing answers there now.

    Raises:
        ssl.SSLCertVerificationError: it answered with a certificate `ca` does not vouch for (another CA
            signed it, or it does not name `host`).
    """
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError:
        raise
    except (OSError, ssl.SSLError):
        return False  # not up yet, or away
