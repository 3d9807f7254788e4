"""The device daemon's checks: every local mistake stops it before a SuperNode starts, naming file and fix."""

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from flwr.common.config import parse_config_args

from client.daemon import check_inputs, main, node_config, parse_args, probe_tls
from fedlm.settings import ConfigError
from server.provision import create_ca, create_device, create_server_cert


@pytest.fixture
def device(tmp_path):
    """A provisioned federation and one device's valid arguments."""
    pki = tmp_path / "pki"
    create_ca(pki)
    create_server_cert(pki, ["localhost", "127.0.0.1"])
    create_device(pki, "alice")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("some private text\n")
    return tmp_path, ["--superlink", "127.0.0.1:1", "--data", str(tmp_path / "notes"), "--state-dir",
                      str(tmp_path / "state"), "--ca", str(pki / "ca.pem"), "--key", str(pki / "devices" / "alice")]


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def test_valid_inputs_pass_and_reach_the_node_config(device):
    root, argv = device
    args = parse_args([*argv, "--max-epsilon", "4", "--lora-rank", "2"])
    check_inputs(args)
    config = parse_config_args([node_config(args)])  # Flower's own parser, as the SuperNode reads it
    assert config == {"data-path": str(root / "notes"), "state-dir": str(root / "state"),
                      "max-epsilon": 4.0, "lora-rank": 2}


@pytest.mark.parametrize("flag, make, message", [
    ("--data", lambda r: r / "missing", r"--data='.*missing' does not exist"),
    ("--data", lambda r: (r / "empty").mkdir() or r / "empty", r"--data .*empty holds no \.txt file"),
    ("--data", lambda r: (r / "x.csv").write_text("a") and r / "x.csv", r"must be a folder of \.txt files"),
    # Strict UTF-8, by the readers training uses: this file passed the daemon before and failed mid-run.
    ("--data", lambda r: (r / "notes" / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1")) and r / "notes",
     r"latin1\.txt is not UTF-8 text \(invalid continuation byte at byte 3, line 1\); re-save it as UTF-8"),
    ("--data", lambda r: (r / "d.jsonl").write_text('{"text": "a"}\n[1, 2]\n') and r / "d.jsonl",
     r"d\.jsonl, line 2: expected a JSON object, got list"),
    ("--key", lambda r: r / "nokey", r"--key .*nokey does not exist"),
    ("--key", lambda r: (r / "junk").write_text("junk") and r / "junk", r"not an OpenSSH private key"),
    ("--key", lambda r: (r / "rsa").write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())) and r / "rsa", r"needs an EC key"),
    ("--ca", lambda r: r / "pki" / "devices" / "alice.pub", r"--ca .* is not a PEM certificate"),
    ("--superlink", lambda r: "nohost", r"must be HOST:PORT"),
])
def test_bad_inputs_stop_with_one_clear_message(device, flag, make, message):
    root, argv = device
    with pytest.raises(ConfigError, match=message):
        check_inputs(parse_args(_with(argv, flag, str(make(root)))))


def _tls_server(pki: Path) -> tuple[int, threading.Event]:
    """A real TLS endpoint with the federation's server certificate, on a free loopback port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], stop


def test_tls_probe_accepts_the_right_ca_and_names_the_wrong_one(device, tmp_path_factory):
    root, _ = device
    port, stop = _tls_server(root / "pki")
    other = create_ca(tmp_path_factory.mktemp("other"))
    try:
        assert probe_tls(f"127.0.0.1:{port}", root / "pki" / "ca.pem")
        with pytest.raises(ConfigError, match=rf"--ca {other} did not sign .*copy the federation's CA"):
            probe_tls(f"127.0.0.1:{port}", other)
    finally:
        stop.set()
    create_server_cert(root / "pki", ["fl.example.org"])  # a certificate that does not name 127.0.0.1
    port, stop = _tls_server(root / "pki")
    try:
        with pytest.raises(ConfigError, match=r"does not name '127\.0\.0\.1'.*server-cert --names 127\.0\.0\.1"):
            probe_tls(f"127.0.0.1:{port}", root / "pki" / "ca.pem")
    finally:
        stop.set()
    with socket.socket() as s:  # a port nobody listens on: not an error, the SuperNode will wait
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert probe_tls(f"127.0.0.1:{free}", root / "pki" / "ca.pem") is False


def test_main_exits_2_before_starting_anything(device, capsys):
    root, argv = device
    assert main(_with(argv, "--key", str(root / "nokey"))) == 2
    assert "Pollinate device: --key" in capsys.readouterr().err


@pytest.mark.integration  # starts a fresh interpreter
def test_checking_a_device_s_data_needs_no_training_stack(tmp_path):
    """The daemon checks its inputs in seconds: the readers import neither torch nor the model."""
    import subprocess
    import sys
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("some text\n")
    code = ("import sys; from client.daemon import check_data; from pathlib import Path; "
            "check_data(Path(sys.argv[1])); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "notes")], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.split() == ["False", "False"]
