"""Real deployment on loopback: a SuperLink with TLS and device authentication, three device daemons (real
processes), a run with DP-SGD and SecAgg+; refused devices; a SuperLink restart; a device killed mid-round."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import make_text
from fedlm.settings import RunSettings, settings_from_dict
from server.provision import create_ca, create_device, create_server_cert, set_authorized, sync_registrations
from simulations.deploy import deploy, superlink, wait_for_devices

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("alice", "bob", "carol")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    """One device: `python -m client.daemon` in its own process group (so killing it kills its SuperNode)."""

    args: list[str]
    log: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("a") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "client.daemon", *self.args], cwd=ROOT,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, needle: str) -> int:
        return self.text().count(needle)


@dataclass
class Federation:
    root: Path
    pki: Path
    port: int
    model: Path
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def daemon_args(self, name: str, key: str | None = None, ca: Path | None = None) -> list[str]:
        data = self.root / "data" / name
        return ["--superlink", f"127.0.0.1:{self.port}", "--data", str(data), "--state-dir",
                str(self.root / "state" / name), "--ca", str(ca or self.pki / "ca.pem"),
                "--key", str(self.pki / "devices" / (key or name)), "--runtime-port", str(free_port())]

    def settings(self, name: str, rounds: int, secagg_timeout: float) -> RunSettings:
        return settings_from_dict(RunSettings, {
            "model": {"name_or_path": str(self.model)},
            "dataset": {"seq_len": 32, "min_train_sequences": 4, "min_eval_sequences": 1},
            "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": rounds},
            "train": {"local_steps": 2, "batch_size": 4, "max_eval_sequences": 4},
            "privacy": {"name": "dp_sgd", "target_epsilon": 8.0},
            # Three clients: two shares unmask a dropped one.
            "secagg": {"name": "secaggplus", "num_shares": 3, "reconstruction_threshold": 2,
                       "timeout": secagg_timeout},
            "deployment": {"name": "superlink", "port": self.port, "pki_dir": str(self.pki),
                           "state_dir": str(self.root / "superlink"), "connect_timeout": 180.0},
            "output_dir": str(self.root / name),
        })


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("deployment")
    pki = root / "pki"
    create_ca(pki)
    create_server_cert(pki, ["localhost", "127.0.0.1"])
    for name in (*DEVICES, "stranger"):
        create_device(pki, name)
    for name in DEVICES:
        set_authorized(pki, name, allowed=True)
    fed = Federation(root, pki, free_port(), tiny_llama_dir)
    for i, name in enumerate(DEVICES):
        data = root / "data" / name
        data.mkdir(parents=True)
        for j in range(4):
            (data / f"doc{j}.txt").write_text(make_text(700 + 10 * i + j, 400))
        # Started before any SuperLink exists: a device waits for the server rather than failing.
        fed.daemons[name] = Daemon(fed.daemon_args(name), root / f"{name}.log")
        fed.daemons[name].start()
    # A first SuperLink, stopped once every device is online: the run's SuperLink is a restart for them.
    settings = fed.settings("warm-up", rounds=1, secagg_timeout=60.0)
    with superlink(settings) as home:
        sync_registrations(pki, home)
        wait_for_devices(settings, home)
    yield fed
    for daemon in fed.daemons.values():
        daemon.kill()


def test_refused_devices_exit_with_a_clear_message(federation, tmp_path):
    """An unregistered key is refused by the SuperLink; a CA that did not sign it stops the device in seconds."""
    wrong_ca = create_ca(tmp_path / "other-pki")
    with superlink(federation.settings("refusals", rounds=1, secagg_timeout=30.0)) as home:
        sync_registrations(federation.pki, home)
        # No grace: a refused key is retried for 90 s by default (a SuperLink registers devices after it starts).
        stranger = Daemon([*federation.daemon_args("alice", key="stranger"), "--refused-grace", "0"],
                          tmp_path / "stranger.log")
        misled = Daemon(federation.daemon_args("bob", ca=wrong_ca), tmp_path / "misled.log")
        stranger.start()
        start = time.monotonic()
        misled.start()
        try:
            assert misled.process.wait(timeout=30) == 2
            misled_seconds = time.monotonic() - start
            assert stranger.process.wait(timeout=60) != 0
        finally:
            stranger.kill()
            misled.kill()
    assert "refused this device's key" in stranger.text() and "provision register" in stranger.text()
    assert f"--ca {wrong_ca} did not sign" in misled.text() and "pki/ca.pem" in misled.text()
    assert misled_seconds < 30  # before starting any SuperNode: no retries


def test_two_rounds_over_tls_with_dp_secagg_a_superlink_restart_and_a_device_killed(federation):
    """The devices reconnect to a restarted SuperLink by themselves; two rounds with DP-SGD and SecAgg+ leave a
    simulation's outputs. One device is killed while it trains in round 2: SecAgg+ completes the round from the
    other two, and the device, restarted, rejoins for evaluation."""
    settings = federation.settings("run", rounds=2, secagg_timeout=60.0)
    victim = federation.daemons["carol"]
    reconnects = {n: d.count("Connection successful") for n, d in federation.daemons.items()}
    trained_before = victim.count("Receiving: train message")
    errors: list[BaseException] = []
    runner = threading.Thread(target=_capture, args=(errors, deploy, settings))
    runner.start()
    # Round 1 is SecAgg+'s four training messages; round 2's third carries the global adapter: carol trains.
    while runner.is_alive() and victim.count("Receiving: train message") < trained_before + 7:
        time.sleep(0.5)
    victim.kill()
    while runner.is_alive():  # a restarted device is refused until its old session expires (about a minute)
        if victim.process.poll() is not None:
            victim.start()
        runner.join(timeout=10)
    assert not errors, errors

    out = Path(settings.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert json.loads((out / "settings.json").read_text())["federation"]["rounds"] == 2  # what the run was given
    assert [r["clients_ok"] for r in rows[1:]] == [3, 2]  # round 2 completed from the two survivors
    assert [r["eval_clients"] for r in rows] == [3, 3, 3]  # carol rejoined for round 2's evaluation
    assert 0 < rows[1]["epsilon_max"] < rows[2]["epsilon_max"] <= 8.0  # spends accumulate, within budget
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
    assert not (out / "data").exists()  # devices brought their own data
    for name in ("alice", "bob"):
        daemon = federation.daemons[name]
        assert daemon.starts == 1 and daemon.count("Connection successful") > reconnects[name]  # by themselves
        ledger = json.loads((federation.root / "state" / name / "privacy_ledger.json").read_text())
        assert [h["key"].split()[-1] for h in ledger["history"]] == ["1", "2"]  # each device's own spend
        assert any((federation.root / "state" / name / "data").glob("*.pt"))  # its tokenized text, cached


def _capture(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as err:  # re-raised in the test's thread by the assertion on `errors`
        errors.append(err)


def test_a_device_with_trusted_entities_refuses_an_unsigned_bundle(tmp_path, tiny_llama_dir):
    """`--trusted-entities`: a bundle submitted from a local folder carries no signature, so the device runs
    nothing of it (Flower answers each message with an error) and never touches its data."""
    pki = tmp_path / "pki"
    create_ca(pki)
    create_server_cert(pki, ["127.0.0.1"])
    devices = ("dave", "erin")  # two: a round needs server.min_replies=2 clients
    for name in devices:
        create_device(pki, name)
        set_authorized(pki, name, allowed=True)
    signer = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    (tmp_path / "trusted.yaml").write_text(f'fpk_pollinate_release: "{signer.decode()} release@example.org"\n')
    fed = Federation(tmp_path, pki, free_port(), tiny_llama_dir)
    daemons = []
    for i, name in enumerate(devices):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "notes.txt").write_text(make_text(900 + i, 400))
        daemons.append(Daemon([*fed.daemon_args(name), "--trusted-entities", str(tmp_path / "trusted.yaml")],
                              tmp_path / f"{name}.log"))
        daemons[-1].start()
    settings = settings_from_dict(RunSettings, {
        **json.loads(fed.settings("signed", rounds=1, secagg_timeout=30.0).to_json()),
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 1},
        "privacy": {"name": "disabled"}, "secagg": {"name": "disabled"}})
    try:
        outcome = deploy(settings)
    except RuntimeError:
        outcome = None  # a run whose every reply is an error may end early: the devices' logs are what count
    finally:
        for daemon in daemons:
            daemon.kill()
    for name, daemon in zip(devices, daemons):
        assert "FAB verification failed" in daemon.text() or "could not be verified" in daemon.text()
        assert not (tmp_path / "state" / name / "data").exists()  # no message reached the training code
    if outcome is not None:
        assert all(r["clients_ok"] == 0 for r in outcome.rows[1:])
