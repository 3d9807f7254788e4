"""Provisioning: a CA, a server certificate for the right names, device keys Flower accepts, the authorized list."""

import ipaddress
import json
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from fedlm.flower_process import OFFLINE_ENV
from fedlm.settings import ConfigError
from server import provision
from server.provision import (authorized, create_ca, create_device, create_server_cert, live_node_ids, main,
                              set_authorized, supernode_statuses)


def test_server_certificate_is_signed_by_the_ca_for_every_name(tmp_path):
    create_ca(tmp_path)
    create_server_cert(tmp_path, ["localhost", "127.0.0.1", "fl.example.org"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Python's TLS stack loads the pair and trusts it through the CA: what the SuperLink and devices do.
    ssl.create_default_context().load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    for secret in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600


def test_device_keys_are_openssh_ec_keys_on_a_nist_curve(tmp_path):
    key_path = create_device(tmp_path, "alice")
    private = load_ssh_private_key(key_path.read_bytes(), password=None)
    public = load_ssh_public_key(key_path.with_suffix(".pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert create_device(tmp_path, "bob").read_bytes() != key_path.read_bytes()


def test_register_and_revoke_edit_the_authorized_list(tmp_path):
    for name in ("alice", "bob", "carol"):
        create_device(tmp_path, name)
        set_authorized(tmp_path, name, allowed=True)
    set_authorized(tmp_path, "bob", allowed=False)
    set_authorized(tmp_path, "alice", allowed=True)  # registering twice changes nothing
    assert authorized(tmp_path) == ["alice", "carol"]
    with pytest.raises(ConfigError, match=r"devices/dave\.pub is missing; create the device first"):
        set_authorized(tmp_path, "dave", allowed=True)


def test_bad_input_names_the_fix(tmp_path, capsys):
    with pytest.raises(ConfigError, match="create the CA first"):
        create_server_cert(tmp_path, ["localhost"])
    with pytest.raises(ConfigError, match="must be letters, digits"):
        create_device(tmp_path, "../evil")
    main(["init", "--dir", str(tmp_path / "pki"), "--devices", "a,b"])
    assert "authorized devices" in capsys.readouterr().out and authorized(tmp_path / "pki") == ["a", "b"]
    with pytest.raises(SystemExit, match="Provisioning error: .*create the device first"):
        main(["register", "zed", "--dir", str(tmp_path / "pki")])


def _fake_cli(monkeypatch, stdout: str, returncode: int = 0) -> list:
    """Replace the Flower CLI with a canned reply; returns the calls it received."""
    calls = []

    def fake(args, flwr_home):
        calls.append(args)
        return subprocess.CompletedProcess(["flwr", *args], returncode, stdout=stdout, stderr="")

    monkeypatch.setattr(provision, "flwr_cli", fake)
    return calls


def test_supernode_list_is_read_into_statuses_by_node_id(monkeypatch, tmp_path):
    nodes = [{"node-id": "7", "status": "online"}, {"node-id": 8, "status": "registered"},
             {"node-id": 9, "status": "unregistered"}, {"node-id": 10, "status": "offline"}]
    calls = _fake_cli(monkeypatch, json.dumps({"success": True, "nodes": nodes}))
    assert supernode_statuses(tmp_path) == {7: "online", 8: "registered", 9: "unregistered", 10: "offline"}
    assert calls == [["supernode", "list", "pollinate", "--format", "json"]]
    assert live_node_ids(tmp_path) == {7, 8, 10}  # an unregistered node is not accepted
    _fake_cli(monkeypatch, json.dumps({"success": False, "error-message": "no SuperLink"}))
    with pytest.raises(RuntimeError, match="flwr supernode list failed: no SuperLink"):
        supernode_statuses(tmp_path)
    _fake_cli(monkeypatch, "Traceback: not JSON", returncode=1)
    with pytest.raises(RuntimeError, match="flwr supernode list failed: Traceback: not JSON"):
        supernode_statuses(tmp_path)


def test_the_flower_cli_runs_offline_from_this_python(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(subprocess, "run", lambda command, env, **kw: seen.update(command=command, env=env))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # the caller's environment does not switch telemetry on
    provision.flwr_cli(["supernode", "list"], tmp_path / "home")
    assert seen["command"] == [str(Path(sys.executable).with_name("flwr")), "supernode", "list"]
    assert seen["env"]["FLWR_HOME"] == str(tmp_path / "home")
    assert {k: seen["env"][k] for k in OFFLINE_ENV} == OFFLINE_ENV
    assert seen["env"]["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
