"""`python -m server.provision ...`: a federation's keys and certificates, and which devices may join it.

    python -m server.provision init --dir pki --devices alice,bob,carol --names localhost,127.0.0.1,myhost
    python -m server.provision device dave --dir pki          # one more device key pair
    python -m server.provision register dave --dir pki        # allow it (live on a running SuperLink too)
    python -m server.provision revoke bob --dir pki           # refuse it from now on
    python -m server.provision list --dir pki

Layout of `--dir`: ca.pem/ca.key (the federation's CA), server.pem/server.key (the SuperLink's TLS
certificate), devices/NAME (a device's private EC key, OpenSSH format: it goes to that device only) and
devices/NAME.pub, and authorized.txt: the names of the devices the SuperLink accepts. The server launcher
registers exactly those (and unregisters the rest) every time it starts a SuperLink.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlm.flower_process import flower_env, flower_executable
from fedlm.settings import ConfigError

DEFAULT_NAMES = ("localhost", "127.0.0.1")
CERT_DAYS = 825  # the longest validity common TLS clients accept for a server certificate
# Flower's SuperNode authentication accepts NIST curves only; P-384 is what its own docs generate.
DEVICE_CURVE = ec.SECP384R1


def _write_private(path: Path, data: bytes) -> None:
    """A secret: created readable by its owner only (a later chmod would leave a window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pollinate"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clocks a little behind
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS)))


def create_ca(pki: Path) -> Path:
    """A new CA (ca.pem, ca.key). Its certificate goes to every device; its key stays with the operator."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name("Pollinate federation CA"), _name("Pollinate federation CA"), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    pki.mkdir(parents=True, exist_ok=True)
    _write_private(pki / "ca.key", _pem_key(key))
    (pki / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki / "ca.pem"


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _load_ca(pki: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as err:
        raise ConfigError(f"{err.filename} is missing; create the CA first: python -m server.provision ca "
                          f"--dir {pki}") from None
    return cert, key


def create_server_cert(pki: Path, names: list[str]) -> Path:
    """server.pem/server.key for the SuperLink, valid for every host name and IP devices use to reach it."""
    if not names:
        raise ConfigError("--names is empty; give every name and IP devices use to reach the server, "
                          "e.g. --names localhost,127.0.0.1,server.example.org")
    ca_cert, ca_key = _load_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(names[0]), ca_cert.subject, key.public_key())
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(pki / "server.key", _pem_key(key))
    (pki / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki / "server.pem"


def _check_device_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"device name {name!r} must be letters, digits, '-' or '_' (it names its key files)")
    return name


def create_device(pki: Path, name: str) -> Path:
    """devices/NAME (private key, OpenSSH format, for that device only) and devices/NAME.pub."""
    key = ec.generate_private_key(DEVICE_CURVE())
    base = pki / "devices" / _check_device_name(name)
    _write_private(base, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    base.with_suffix(".pub").write_bytes(public + f" pollinate-{name}\n".encode())
    return base


# ---------------------------------------------------------------- which devices may join

def authorized(pki: Path) -> list[str]:
    """Names of the devices the SuperLink accepts (authorized.txt), in the order they were registered."""
    path = pki / "authorized.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _public_key_path(pki: Path, name: str) -> Path:
    path = pki / "devices" / f"{_check_device_name(name)}.pub"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; create the device first: python -m server.provision device {name} "
                          f"--dir {pki}")
    return path


def set_authorized(pki: Path, name: str, allowed: bool) -> None:
    """Add or remove one device in authorized.txt (the SuperLink follows at its next sync)."""
    _public_key_path(pki, name)
    names = [n for n in authorized(pki) if n != name or allowed]
    names += [name] if allowed and name not in names else []
    (pki / "authorized.txt").write_text("".join(f"{n}\n" for n in names))


def flwr_cli(args: list[str], flwr_home: Path) -> subprocess.CompletedProcess:
    """Run the Flower CLI against the connection `pollinate` kept in `flwr_home` (see write_connection)."""
    return subprocess.run([flower_executable("flwr"), *args], env=flower_env(flwr_home), capture_output=True,
                          text=True, timeout=60)


def write_connection(flwr_home: Path, address: str, ca_cert: Path) -> None:
    """The Flower CLI's connection `pollinate`: the SuperLink's address and the CA that signed its certificate."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "pollinate"\n\n[superlink.pollinate]\n'
        f'address = "{address}"\nroot-certificates = "{Path(ca_cert).resolve()}"\n')


def _cli_json(args: list[str], flwr_home: Path) -> dict:
    done = flwr_cli([*args, "pollinate", "--format", "json"], flwr_home)
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-500:]}
    if done.returncode != 0 or not reply.get("success", True):
        raise RuntimeError(f"flwr {' '.join(args[:2])} failed: {reply.get('error-message', reply)}")
    return reply


def supernode_statuses(flwr_home: Path) -> dict[int, str]:
    """`flwr supernode list`: the status (registered, online, offline, unregistered) of every SuperNode id.

    Raises:
        RuntimeError: the SuperLink could not be reached or refused the request.
    """
    nodes = _cli_json(["supernode", "list"], flwr_home).get("nodes", [])
    return {int(n["node-id"]): n.get("status", "") for n in nodes}


def live_node_ids(flwr_home: Path) -> set[int]:
    """Ids of the SuperNodes the running SuperLink accepts (registered, online or offline)."""
    statuses = supernode_statuses(flwr_home)
    return {node_id for node_id, status in statuses.items() if status in ("registered", "online", "offline")}


def sync_registrations(pki: Path, flwr_home: Path) -> dict[str, int]:
    """Make the running SuperLink accept exactly the authorized devices: register new ones, unregister revoked.

    The SuperLink lists node ids, not keys, so nodes.json remembers which id each device's key received.
    Returns the node id of every authorized device.
    """
    ids_path = pki / "nodes.json"
    known: dict[str, int] = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    live, wanted = live_node_ids(flwr_home), authorized(pki)
    for name, node_id in list(known.items()):
        if name not in wanted and node_id in live:
            _cli_json(["supernode", "unregister", str(node_id)], flwr_home)
        if name not in wanted or node_id not in live:
            del known[name]
    for name in wanted:
        if name not in known:
            reply = _cli_json(["supernode", "register", str(_public_key_path(pki, name))], flwr_home)
            known[name] = int(reply["node-id"])
    ids_path.write_text(json.dumps(known, indent=2))
    return known


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.provision", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["init", "ca", "server-cert", "device", "register", "revoke", "list"])
    parser.add_argument("names", nargs="*", help="device names (device, register, revoke)")
    parser.add_argument("--dir", type=Path, default=Path("pki"), help="where keys and certificates live")
    parser.add_argument("--names", dest="hosts", default=",".join(DEFAULT_NAMES),
                        help="server certificate: comma-separated host names and IPs devices connect to")
    parser.add_argument("--devices", default="", help="init: comma-separated device names to create and authorize")
    parser.add_argument("--superlink", default="", help="register/revoke/list: HOST:PORT of a running SuperLink "
                        "to update now (otherwise it follows authorized.txt when the server next starts)")
    args = parser.parse_args(argv)
    pki: Path = args.dir
    try:
        if args.command in ("init", "ca"):
            print(f"CA certificate: {create_ca(pki)} (give it to every device; keep ca.key offline)")
        if args.command in ("init", "server-cert"):
            print(f"server certificate: {create_server_cert(pki, [h for h in args.hosts.split(',') if h])}")
        devices = [d for d in args.devices.split(",") if d] if args.command == "init" else args.names
        if args.command in ("init", "device"):
            for name in devices:
                print(f"device {name}: {create_device(pki, name)} (copy to that device only) and its .pub")
        if args.command in ("init", "register", "revoke"):
            for name in devices:
                set_authorized(pki, name, allowed=args.command != "revoke")
        if args.superlink and args.command in ("register", "revoke", "list"):
            home = pki / "flwr-home"
            write_connection(home, args.superlink, pki / "ca.pem")
            ids = sync_registrations(pki, home)
            print("registered on the SuperLink: " + ", ".join(f"{n} (node {i})" for n, i in ids.items()))
        print(f"authorized devices ({pki / 'authorized.txt'}): {', '.join(authorized(pki)) or 'none'}")
    except (ConfigError, RuntimeError) as err:  # RuntimeError: the SuperLink refused or could not be reached
        sys.exit(f"Provisioning error: {err}")


if __name__ == "__main__":
    main()
