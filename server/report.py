"""A run's report.md: a summary table and PNG plots of loss and perplexity per round, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs on servers with no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _plot(rows: list[dict], series: dict[str, str], ylabel: str, path: Path, log_scale: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for key, label in series.items():
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dir: Path, title: str = "Pollinate run") -> Path:
    """Write report.md, loss.png and perplexity.png into `run_dir`; returns the report's path."""
    rows = read_metrics(run_dir)
    _plot(rows, {"train_loss": "train (per-sequence)", "eval_loss": "held-out (federated)",
                 "central_loss": "held-out (central)"}, "loss", run_dir / "loss.png")
    _plot(rows, {"eval_perplexity": "held-out, all clients", "eval_perplexity_worst": "held-out, worst client",
                 "central_perplexity": "held-out, central"}, "perplexity", run_dir / "perplexity.png",
          log_scale=True)
    first, last = rows[0], rows[-1]
    change = 100 * (last["eval_perplexity"] / first["eval_perplexity"] - 1)
    total_seconds = sum(r["seconds"] for r in rows)
    lines = [
        f"# {title}", "",
        f"Held-out perplexity (federated evaluation on every client's own held-out split): "
        f"**{first['eval_perplexity']:.2f} at round 0 (base model) -> {last['eval_perplexity']:.2f} after round "
        f"{last['round']}** ({change:+.1f} %). Wall time {total_seconds:.0f} s.", "",
        "| round | train loss | held-out loss | held-out ppl | worst client ppl | clients ok/sampled "
        "| MB down | MB up | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        train = "" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        worst = "" if r.get("eval_perplexity_worst") is None else f"{r['eval_perplexity_worst']:.2f}"
        lines.append(f"| {r['round']} | {train} | {r['eval_loss']:.3f} | {r['eval_perplexity']:.2f} | {worst} "
                     f"| {r['clients_ok']}/{r['clients_sampled']} | {r['bytes_down'] / 1e6:.2f} "
                     f"| {r['bytes_up'] / 1e6:.2f} | {r['seconds']:.1f} |")
    if any("central_perplexity" in r for r in rows):
        lines += ["", "Central evaluation (server-side data): " + ", ".join(
            f"round {r['round']}: {r['central_perplexity']:.2f}" for r in rows if "central_perplexity" in r)]
    lines += ["", "![loss](loss.png)", "", "![perplexity](perplexity.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
