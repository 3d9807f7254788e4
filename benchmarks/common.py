"""What every benchmark script shares: logging, provenance (command, date, versions, machine, load), and the
results/<section>.json files that benchmarks/render.py turns into BENCHMARKS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
"""One JSON file per section, committed: the figures BENCHMARKS.md is rendered from."""


TIMED_BATCH = 32
"""The batch that timing sections run at: cost per step needs a fixed batch, not each client's planned one."""


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def machine() -> str:
    from fedlm.training import native_bf16  # torch: only scripts that measure need it, not the renderer

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else "MemTotal: 0 kB"
    ram_gb = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal"))) / 2**20
    avx512 = "yes" if " avx512f" in cpuinfo else "no"
    bf16 = "yes" if native_bf16() else "no"
    return f"{cpu}, {os.cpu_count()} cores, {ram_gb:.0f} GiB RAM, AVX-512: {avx512}, native bf16: {bf16}, no GPU used"


def versions() -> str:
    names = ", ".join(f"{name} {version(name)}" for name in ("torch", "flwr", "opacus", "transformers", "peft"))
    return f"Python {platform.python_version()}, {names}"


def now() -> str:
    return f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"


def commit() -> str | None:
    """The code's commit, marked `+changes` when the work tree differs from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def command_line() -> str:
    """This process's command, as typed from the repository root."""
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


class Provenance:
    """Started when a measurement starts (the load then), finished when it ends: how to reproduce it, when, on
    what, and how busy the machine was. Every section's JSON carries one (`provenance`)."""

    def __init__(self, command: str | None = None) -> None:
        self.command, self.date, self.load_start = command or command_line(), now(), os.getloadavg()[0]
        if self.load_start > 0.5:
            log(f"warning: 1-minute load average is {self.load_start:.2f}; other processes will skew the timings")

    def record(self) -> dict:
        return {"command": self.command, "date": self.date, "commit": commit(), "versions": versions(),
                "machine": machine(), "load_start": round(self.load_start, 2),
                "load_end": round(os.getloadavg()[0], 2)}


def results_for(output: Path) -> Path:
    """Where the JSON behind `output` lives: benchmarks/results/ for the repository's BENCHMARKS.md, else a folder
    beside `output` (a scratch run must not overwrite the committed figures)."""
    if output.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        return RESULTS
    return output.parent / f"{output.stem}-results"


def write_result(name: str, provenance: Provenance | dict, figures: dict, results: Path = RESULTS) -> Path:
    """Write section `name`'s figures and provenance to RESULTS/NAME.json (replacing its last measurement)."""
    record = provenance.record() if isinstance(provenance, Provenance) else provenance
    path = results / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": record, "figures": figures}, indent=1, ensure_ascii=False) + "\n")
    log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def read_result(name: str, results: Path = RESULTS) -> dict | None:
    """Section `name`'s last measurement ({"provenance", "figures"}), or None if it was never measured."""
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def publish(name: str, provenance: Provenance | dict, figures: dict, output: Path) -> None:
    """A script's last step: its figures to JSON, then `output` (BENCHMARKS.md) re-rendered from all of them."""
    import render  # benchmarks/ is sys.path[0] when a script runs; the renderer imports no torch

    results = results_for(output)
    write_result(name, provenance, figures, results)
    render.write(output, results)
