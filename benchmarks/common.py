"""What every benchmark section shares: logging, the machine and versions it ran on, and BENCHMARKS.md merging."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path

from fedlm.training import native_bf16

ROOT = Path(__file__).resolve().parents[1]


TIMED_BATCH = 32
"""The batch that timing sections run at: cost per step needs a fixed batch, not each client's planned one."""

def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def machine() -> str:
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


def provenance(command: str, load_start: float) -> str:
    """The line every section opens with: how to reproduce it, when, on what, and how busy the machine was."""
    load_end = os.getloadavg()[0]
    return (f"_Produced by `{command}` on {now()}; {versions()}; {machine()}; 1-minute load average "
            f"{load_start:.2f} at start, {load_end:.2f} at end._")


def command_line() -> str:
    """This process's command, as typed from the repository root."""
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def section_number(section: str) -> str:
    return section.split(" ", 2)[1].rstrip(".")


def merge(old: str, sections: list[str]) -> str:
    """`old` with each of `sections` replacing the section of the same "## N." number, or inserted in order."""
    parts = old.split("\n## ")
    head = parts[0].rstrip("\n")
    kept = {section_number("## " + p): "## " + p for p in parts[1:]}
    for section in sections:
        kept[section_number(section)] = section
    ordered = sorted(kept.values(), key=lambda s: float(section_number(s)))
    return head + "\n\n" + "\n".join(s.rstrip("\n") + "\n" for s in ordered)


def write_sections(output: Path, sections: list[str]) -> None:
    """Replace or add `sections` in `output`, keeping every other section as it was measured."""
    old = output.read_text() if output.exists() else "# Pollinate benchmarks\n"
    output.write_text(merge(old, sections))
    log(f"wrote {', '.join('section ' + section_number(s) for s in sections)} to {output}")
