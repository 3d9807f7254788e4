"""`python -m client.daemon ...`: the program a device runs. Checks its inputs, then runs a Flower SuperNode.

    python -m client.daemon --superlink server.example.org:9092 --data ~/notes --state-dir ~/.pollinate \\
        --ca ca.pem --key alice [--max-epsilon 8] [--lora-rank 4] [--trusted-entities trusted.yaml]

Everything that can be wrong on the device (data, key, CA certificate) stops it within seconds with one
message naming the file and the fix; a SuperLink that is away is waited for (the SuperNode reconnects by
itself, with backoff), never treated as an error. Packages are never installed at run time.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedlm.flower_process import answers_tls, flower_env, flower_executable, split_address as _split_address
from fedlm.settings import ConfigError
from fedlm.data.sources import check_local_text

PROBE_SECONDS = 5.0
REFUSED_RETRY_SECONDS = 5.0
REFUSED_HINT = ("the SuperLink refused this device's key: it is not registered, or was revoked. On the server: "
                "python -m server.provision register NAME --dir pki (it takes effect when the server starts, or "
                "at once with --superlink HOST:PORT)")
WRONG_CA_HINT = "copy the federation's CA certificate (pki/ca.pem on the server) to this device and pass it with --ca"


def _readable_file(path: Path, flag: str) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{flag} {path} does not exist or is not a file; pass the right path")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{flag} {path} is unreadable ({err.strerror}); fix its permissions") from None


def check_data(path: Path) -> None:
    """The device's private text, read by the same strict readers its training uses (fedlm/data/sources.py).

    Raises:
        ConfigError: naming the path (or the file, byte and line) and what to put there.
    """
    check_local_text(path, "--data")


def check_key(path: Path) -> None:
    """The device's authentication key: an EC private key in OpenSSH format (python -m server.provision device)."""
    try:
        key = load_ssh_private_key(_readable_file(path, "--key"), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--key {path} is not an OpenSSH private key ({err}); use the file "
                          "`python -m server.provision device NAME` wrote for this device (devices/NAME)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"--key {path} is a {type(key).__name__}, but SuperNode authentication needs an EC key; "
                          "create one with python -m server.provision device NAME")


def check_ca(path: Path) -> None:
    try:
        x509.load_pem_x509_certificate(_readable_file(path, "--ca"))
    except ValueError as err:
        raise ConfigError(f"--ca {path} is not a PEM certificate ({err}); {WRONG_CA_HINT}") from None


def split_address(address: str) -> tuple[str, int]:
    try:
        return _split_address(address)
    except ValueError:
        raise ConfigError(f"--superlink {address!r} must be HOST:PORT, e.g. server.example.org:9092") from None


def probe_tls(address: str, ca: Path) -> bool:
    """Whether the SuperLink answered a TLS handshake checked against `ca`; False if it is not reachable now.

    Raises:
        ConfigError: it answered with a certificate `ca` does not vouch for (the wrong CA, or a host name the
            server certificate does not name).
    """
    host, port = split_address(address)
    try:
        return answers_tls(host, port, ca, timeout=PROBE_SECONDS)  # False: the SuperNode keeps retrying
    except ssl.SSLCertVerificationError as err:
        if "match" in str(err.verify_message or err):
            raise ConfigError(f"the SuperLink's certificate does not name {host!r} ({err.verify_message}); connect "
                              "with a name it holds, or re-issue it: python -m server.provision server-cert "
                              f"--names {host},...") from None
        raise ConfigError(f"the SuperLink at {address} presented a certificate that --ca {ca} did not sign "
                          f"({err.verify_message}); {WRONG_CA_HINT}") from None


def node_config(args: argparse.Namespace) -> str:
    """Flower's --node-config: space-separated key=value pairs, values in TOML (JSON strings are valid TOML)."""
    values = {"data-path": str(args.data.resolve()), "state-dir": str(args.state_dir.resolve()),
              "max-epsilon": args.max_epsilon, "min-noise-multiplier": args.min_noise_multiplier,
              "lora-rank": args.lora_rank}
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items() if value is not None)


def supernode_command(args: argparse.Namespace) -> list[str]:
    command = [flower_executable("flower-supernode"), "--superlink", args.superlink,
               "--root-certificates", str(args.ca.resolve()), "--auth-supernode-private-key", str(args.key.resolve()),
               "--node-config", node_config(args), "--port", str(args.runtime_port)]
    if args.trusted_entities:
        command += ["--trusted-entities", str(args.trusted_entities.resolve())]
    return command


def check_inputs(args: argparse.Namespace) -> None:
    """Every check on local input, before anything starts.

    Raises:
        ConfigError: the first problem found, naming the file and the fix.
    """
    split_address(args.superlink)
    check_data(args.data)
    check_key(args.key)
    check_ca(args.ca)
    if args.trusted_entities:
        _readable_file(args.trusted_entities, "--trusted-entities")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ConfigError(f"--lora-rank must be >= 1 (got {args.lora_rank})")
    try:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        (args.state_dir / ".writable").touch()
        (args.state_dir / ".writable").unlink()
    except OSError as err:
        raise ConfigError(f"--state-dir {args.state_dir} is not writable ({err.strerror}); choose a folder this "
                          "user owns (it keeps the privacy ledger)") from None


class SuperNodeRunner:
    """Runs the SuperNode, forwards stop signals to it, and explains the failures a device owner can fix."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.child: subprocess.Popen | None = None
        self.stopping = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        self.stopping = True
        if self.child and self.child.poll() is None:
            self.child.send_signal(signum)

    def run_once(self) -> tuple[int, str]:
        env = flower_env((self.args.state_dir / "flwr").resolve())  # the SuperNode's own Flower home
        self.child = subprocess.Popen(supernode_command(self.args), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        seen: list[str] = []
        # A thread, not a loop to end-of-file: the SuperNode's detached SuperExec inherits the pipe and keeps it
        # open until it sees the SuperNode gone, which needs this process to reap the SuperNode first.
        threading.Thread(target=_forward, args=(self.child.stdout, seen), daemon=True).start()
        code = self.child.wait()
        time.sleep(0.2)  # the last lines
        return code, "".join(seen)

    def __call__(self) -> int:
        """Run until the SuperNode exits or this daemon is told to stop; returns the exit code.

        A refused key is retried for --refused-grace seconds only: a SuperLink registers its devices just after
        it starts, and keeps a crashed device's old session for up to a minute; past that, it is an error.
        """
        deadline = time.monotonic() + self.args.refused_grace
        while True:
            code, text = self.run_once()
            refused = "Failed to activate SuperNode" in text
            if code and refused and not self.stopping and time.monotonic() < deadline:
                print("Pollinate device: the SuperLink refused this device's key; trying again in "
                      f"{REFUSED_RETRY_SECONDS:g} s (for up to --refused-grace={self.args.refused_grace:g} s)",
                      file=sys.stderr, flush=True)
                time.sleep(REFUSED_RETRY_SECONDS)
                if not self.stopping:
                    continue
            break
        if code and refused:
            print(f"Pollinate device: {REFUSED_HINT}", file=sys.stderr)
        elif code and "CERTIFICATE_VERIFY_FAILED" in text:
            print(f"Pollinate device: the SuperLink's certificate was not signed by --ca {self.args.ca}; "
                  f"{WRONG_CA_HINT}", file=sys.stderr)
        return code


def _forward(stream, seen: list[str]) -> None:
    """Copy the SuperNode's output through, keeping the lines that explain a failure."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        if "Failed to activate" in line or "CERTIFICATE_VERIFY_FAILED" in line:
            seen.append(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the federation's SuperLink")
    parser.add_argument("--data", type=Path, required=True, help="this device's private text: .txt folder/file or .jsonl")
    parser.add_argument("--state-dir", type=Path, required=True, help="this device's own folder: privacy ledger, caches")
    parser.add_argument("--ca", type=Path, required=True, help="the federation's CA certificate (pki/ca.pem)")
    parser.add_argument("--key", type=Path, required=True, help="this device's private key (pki/devices/NAME)")
    parser.add_argument("--max-epsilon", type=float, help="refuse runs whose privacy budget is larger")
    parser.add_argument("--min-noise-multiplier", type=float, help="refuse runs with less DP-SGD noise")
    parser.add_argument("--lora-rank", type=int, help="train a lower LoRA rank than the run's lora.r")
    parser.add_argument("--trusted-entities", type=Path, help="YAML of trusted signers: run signed app bundles only")
    parser.add_argument("--refused-grace", type=float, default=90.0,
                        help="seconds to keep retrying a refused key before exiting: covers the SuperLink's start-up "
                        "and a crashed session of this device, which Flower expires after two missed 30 s heartbeats")
    parser.add_argument("--runtime-port", type=int, default=9094,
                        help="local port of the SuperNode's runtime API (one per SuperNode on a machine)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_inputs(args)
        if probe_tls(args.superlink, args.ca):
            print(f"Pollinate device: SuperLink {args.superlink} answered; its certificate checks out", flush=True)
        else:
            print(f"Pollinate device: SuperLink {args.superlink} is not reachable yet; waiting for it", flush=True)
    except ConfigError as err:
        print(f"Pollinate device: {err}", file=sys.stderr)
        return 2
    return SuperNodeRunner(args)()


if __name__ == "__main__":
    sys.exit(main())
