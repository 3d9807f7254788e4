"""Run a federation on a real SuperLink (`deployment=superlink`): TLS, authenticated devices, a persistent state.

Starts `flower-superlink`, makes it accept exactly the authorized devices (server/provision.py), waits for
federation.num_clients of them to come online, submits the run with `flwr run` (the settings as one JSON
value, as in simulation) and streams its log. The ServerApp writes the same outputs as a simulation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlm.files import write_json_atomic
from fedlm.flower_process import answers_tls, flower_env, flower_executable, split_address
from fedlm.settings import ConfigError, RunSettings
from server.provision import authorized, supernode_statuses, sync_registrations, write_connection
from simulations.launch import RunOutcome

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app (pyproject.toml [tool.flwr.app]) that is submitted
PKI_FILES = ("ca.pem", "server.pem", "server.key")
START_TIMEOUT = 60.0


def log(message: str) -> None:
    print(f"[deploy] {message}", flush=True)


def absolute_paths(settings: RunSettings) -> RunSettings:
    """The ServerApp runs in another process and directory: every local path it reads must be absolute."""
    model = settings.model
    if Path(model.name_or_path).expanduser().is_dir():
        model = dataclasses.replace(model, name_or_path=str(Path(model.name_or_path).expanduser().resolve()))
    server = settings.server
    if server.central_eval_path:
        server = dataclasses.replace(server, central_eval_path=str(Path(server.central_eval_path).expanduser().resolve()))
    return dataclasses.replace(settings, model=model, server=server,
                               output_dir=str(Path(settings.output_dir).expanduser().resolve()),
                               cache_dir=str(Path(settings.cache_dir).expanduser().resolve()) if settings.cache_dir else "")


def check_inputs(settings: RunSettings) -> None:
    """Certificates, authorized devices and the model, before anything starts.

    Raises:
        ConfigError: naming the missing file or the count, and the provisioning command that fixes it.
    """
    pki = Path(settings.deployment.pki_dir)
    for name in PKI_FILES:
        if not (pki / name).is_file():
            raise ConfigError(f"deployment.pki_dir={str(pki)!r} lacks {name}; create the federation's keys first: "
                              f"python -m server.provision init --dir {pki} --devices alice,bob,carol")
    devices, need = authorized(pki), settings.federation.num_clients
    if len(devices) < need:
        raise ConfigError(f"federation.num_clients={need} but {pki / 'authorized.txt'} authorizes {len(devices)} "
                          f"device(s) ({', '.join(devices) or 'none'}); authorize more (python -m server.provision "
                          f"device NAME --dir {pki}, then register NAME) or lower federation.num_clients")


def _superlink_answers(address: str, ca: Path) -> bool:
    try:
        return answers_tls(*split_address(address), ca, timeout=2.0)
    except ssl.SSLCertVerificationError:
        return False  # as before: after START_TIMEOUT, reported as a SuperLink that did not start


@contextmanager
def superlink(settings: RunSettings) -> Iterator[Path]:
    """A running SuperLink (TLS, device authentication, database in deployment.state_dir); yields the CLI home."""
    d = settings.deployment
    pki, state = Path(d.pki_dir).resolve(), Path(d.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    home = state / "flwr-home"
    write_connection(home, d.superlink_address, pki / "ca.pem")
    command = [flower_executable("flower-superlink"),
               "--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile", str(pki / "server.pem"),
               "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth",
               "--database", str(state / "superlink.db"), "--host", d.host, "--port", str(d.port),
               "--disable-runtime-dependency-installation"]
    log_path = state / "superlink.log"
    with log_path.open("a") as log_file:
        # Its own process group: stopping it also stops what it started (SuperExec, the ServerApp).
        process = subprocess.Popen(command, env=flower_env(home), stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _superlink_answers(d.superlink_address, pki / "ca.pem"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:])
                raise RuntimeError(f"the SuperLink did not start on {d.host}:{d.port} (see {log_path}):\n{tail}")
            time.sleep(0.5)
        log(f"SuperLink up on {d.host}:{d.port} (TLS, device authentication; state {state})")
        yield home
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def online_devices(home: Path) -> int:
    try:
        return sum(status == "online" for status in supernode_statuses(home).values())
    except RuntimeError:
        return 0  # the SuperLink did not answer this time: ask again


def wait_for_devices(settings: RunSettings, home: Path) -> None:
    need, timeout = settings.federation.num_clients, settings.deployment.connect_timeout
    deadline, last = time.monotonic() + timeout, -1
    while (online := online_devices(home)) < need:
        if online != last:
            log(f"{online}/{need} devices online; waiting (devices run: python -m client.daemon ...)")
            last = online
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {online} of federation.num_clients={need} devices came online within "
                               f"deployment.connect_timeout={timeout:g} s; start more devices or lower num_clients")
        time.sleep(1.0)
    log(f"{online}/{need} devices online")


def submit(settings: RunSettings, home: Path) -> None:
    """`flwr run` of this app with the settings as its run config, streaming the run's log until it ends."""
    out_dir = Path(settings.output_dir)
    run_config = out_dir / "run_config.toml"
    run_config.write_text(f"settings = {json.dumps(settings.to_json())}\n")
    command = [flower_executable("flwr"), "run", str(APP_DIR), "pollinate",
               "--run-config", str(run_config), "--stream"]
    done = subprocess.run(command, env=flower_env(home))
    if done.returncode != 0:
        raise RuntimeError(f"flwr run exited with code {done.returncode}; see the log above and "
                           f"{Path(settings.deployment.state_dir) / 'superlink.log'}")


def deploy(settings: RunSettings) -> RunOutcome:
    """Check, start the SuperLink, register devices, wait for them, run, stop; returns the metrics rows."""
    settings = absolute_paths(settings)
    check_inputs(settings)
    if threading.current_thread() is threading.main_thread():  # systemd's stop: leave through the finally blocks
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from fedlm.model import check_model, load_tokenizer
    from server.record import read_metrics
    from simulations.launch import make_offline_safe
    from strategies import check_strategy

    make_offline_safe()
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_strategy(settings)
    load_tokenizer(settings.model, settings.cache_dir)  # builds `embedded` once, before any device asks for it
    check_model(settings.model, settings.lora, settings.dataset.seq_len, settings.cache_dir)  # no weights loaded
    write_json_atomic(out_dir / "settings.json", json.loads(settings.to_json()))
    start = time.perf_counter()
    with superlink(settings) as home:
        ids = sync_registrations(Path(settings.deployment.pki_dir), home)
        log(f"authorized devices: {', '.join(f'{n} (node {i})' for n, i in ids.items())}")
        wait_for_devices(settings, home)
        submit(settings, home)
    rows = read_metrics(out_dir) if (out_dir / "metrics.jsonl").exists() else []
    if len(rows) < settings.federation.rounds + 1:
        raise RuntimeError(f"the run ended after {max(len(rows) - 1, 0)} of {settings.federation.rounds} rounds; "
                           f"see the log above and {Path(settings.deployment.state_dir) / 'superlink.log'}")
    outcome = RunOutcome(out_dir, rows)
    first, last = (f"{p:.2f}" if p is not None else "n/a (no client evaluated)"
                   for p in (outcome.initial_perplexity, outcome.final_perplexity))
    log(f"{len(rows) - 1} rounds in {time.perf_counter() - start:.0f} s. Held-out perplexity {first} -> {last}. "
        f"Outputs: {out_dir}")
    if outcome.abandoned_rounds:
        log(outcome.summary().splitlines()[-1])
    return outcome

