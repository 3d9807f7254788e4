"""`python benchmarks/deployment.py [--rounds N]`: a loopback deployment against the Simulation Engine.

The same settings (the embedded base model, 3 clients, DP-SGD and SecAgg+) run once on Flower's Simulation
Engine and once on a real SuperLink (TLS, device authentication) with three device daemons on this machine.
It prints seconds per round side by side, and what a fresh process per message costs (a SuperNode starts one
for every message: four per round with SecAgg+, plus evaluation), into benchmarks/results/deployment.json, then
renders BENCHMARKS.md (section 6).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from common import ROOT, Provenance, log, publish
from fedlm.settings import RunSettings, settings_from_dict
from server.provision import create_ca, create_device, create_server_cert, set_authorized
from simulations.deploy import deploy
from simulations.launch import make_offline_safe, simulate

CLIENTS = 3
SOURCES = ("json", "email", "http")  # three standard-library packages: one device's private text each
CHARS = 120_000
REPEATS = 3  # fresh processes timed per kind; the median is reported
LOCAL_STEPS, NUM_SHARES, THRESHOLD = 5, 3, 2
LIGHT, HEAVY = 3, 2  # messages per client per round: SecAgg+'s setup, share keys, unmask; train, evaluate


def write_texts(root: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in SOURCES:
        text = "".join(p.read_text(errors="replace") for p in sorted((stdlib / name).rglob("*.py")))[:CHARS]
        (root / "texts" / name).mkdir(parents=True)
        (root / "texts" / name / "code.txt").write_text(text)
    return root / "texts"


def run_settings(root: Path, name: str, rounds: int, port: int = 0) -> RunSettings:
    deployment = {"name": "superlink", "port": port, "pki_dir": str(root / "pki"),
                  "state_dir": str(root / "superlink")} if port else {}
    return settings_from_dict(RunSettings, {
        "dataset": {"path": str(root / "texts"), "partitioner": "natural"},
        "federation": {"num_clients": CLIENTS, "clients_per_round": CLIENTS, "rounds": rounds},
        "train": {"local_steps": LOCAL_STEPS},
        "secagg": {"num_shares": NUM_SHARES, "reconstruction_threshold": THRESHOLD},
        "deployment": deployment, "output_dir": str(root / name)})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deployment(root: Path, rounds: int) -> list[dict]:
    pki = root / "pki"
    create_ca(pki)
    create_server_cert(pki, ["localhost", "127.0.0.1"])
    port, daemons = free_port(), []
    for name in SOURCES:
        create_device(pki, name)
        set_authorized(pki, name, allowed=True)
        args = ["--superlink", f"127.0.0.1:{port}", "--data", str(root / "texts" / name), "--state-dir",
                str(root / "devices" / name), "--ca", str(pki / "ca.pem"), "--key", str(pki / "devices" / name),
                "--runtime-port", str(free_port())]
        with (root / f"{name}.log").open("w") as out:
            daemons.append(subprocess.Popen([sys.executable, "-m", "client.daemon", *args], cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True))
    try:
        return deploy(run_settings(root, "deployed", rounds, port)).rows
    finally:
        for daemon in daemons:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(30)


CHILD = """
import sys, time, json
start = time.perf_counter()
import client.app
light = time.perf_counter() - start
if sys.argv[1] == "heavy":
    from client.lora_client import LoraClient
    from fedlm.settings import RunSettings
    imported = time.perf_counter() - start
    settings = RunSettings.from_json(open(sys.argv[2]).read())
    LoraClient(settings, 0, {"data-path": sys.argv[3], "state-dir": sys.argv[4]})
    print(json.dumps({"import": imported, "client": time.perf_counter() - start - imported}))
else:
    print(json.dumps({"import": light}))
"""


def message_costs(root: Path) -> dict[str, float]:
    """Median wall seconds of a fresh Python process doing what one message's ClientApp process does first."""
    import json

    settings_file = root / "deployed" / "settings.json"
    args = [str(settings_file), str(root / "texts" / SOURCES[0]), str(root / "devices" / SOURCES[0])]
    out: dict[str, list[float]] = {"interpreter": [], "light": [], "heavy": [], "heavy_import": [], "model": []}
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out["interpreter"].append(time.perf_counter() - start)
        for kind in ("light", "heavy"):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD, kind, *args], cwd=ROOT, check=True,
                                  capture_output=True, text=True)
            out[kind].append(time.perf_counter() - start)
            if kind == "heavy":
                parts = json.loads(done.stdout.strip().splitlines()[-1])
                out["heavy_import"].append(parts["import"])
                out["model"].append(parts["client"])
    return {k: statistics.median(v) for k, v in out.items()}


def figures(sim: list[dict], dep: list[dict], costs: dict[str, float]) -> dict:
    """Section 6's figures: both runs' round times and final perplexity, and one message process's costs."""
    def run(rows: list[dict]) -> dict:
        return {"round_seconds": statistics.median(r["seconds"] for r in rows[1:]), "round0_seconds": rows[0]["seconds"],
                "ppl_final": rows[-1]["eval_perplexity"]}

    return {"clients": CLIENTS, "rounds": len(sim) - 1, "local_steps": LOCAL_STEPS, "num_shares": NUM_SHARES,
            "reconstruction_threshold": THRESHOLD, "repeats": REPEATS, "cores": os.cpu_count() or 1,
            "light_messages": LIGHT, "heavy_messages": HEAVY, "simulation": run(sim), "deployment": run(dep),
            "costs": costs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    make_offline_safe()
    stamp = Provenance()
    with tempfile.TemporaryDirectory(prefix="pollinate-deploy-bench-") as tmp:
        root = Path(tmp)
        write_texts(root)
        log("simulation")
        sim = simulate(run_settings(root, "simulated", args.rounds)).rows
        log("loopback deployment")
        dep = run_deployment(root, args.rounds)
        log("per-message process costs")
        costs = message_costs(root)
    publish("deployment", stamp, figures(sim, dep, costs), args.output)


if __name__ == "__main__":
    main()
