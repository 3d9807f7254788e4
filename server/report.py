"""A run's report.md: a summary table and PNG plots of loss and perplexity per round, from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs on servers with no display
import matplotlib.pyplot as plt  # noqa: E402

from fedlm.settings import RunSettings  # noqa: E402
from server.record import read_metrics  # noqa: E402


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


def privacy_lines(rows: list[dict], settings: RunSettings) -> list[str]:
    """What the privacy guarantee is, in figures, and its plot."""
    privacy = settings.privacy
    lines = []
    if privacy.client_level:
        noised = [r for r in rows if r.get("client_epsilon") is not None]
        lines += [f"Client-level differential privacy (second layer): each client's whole update is clipped to "
                  f"L2 norm {privacy.update_clipping_norm:g}, updates are averaged with equal weights, and the "
                  f"server adds Gaussian noise (multiplier {privacy.update_noise_multiplier:g}). Client-level epsilon "
                  f"after round {noised[-1]['round'] if noised else 0}: **{noised[-1]['client_epsilon'] if noised else 0:.3f}** "
                  "(the privacy unit is a client's whole data; client sampling is accounted as Poisson; the "
                  "server is trusted to add the noise).", ""]
    if not privacy.enabled:
        return lines + ["Sample-level differential privacy: **off** (`privacy=disabled`).", ""]
    spent = [r for r in rows if r.get("epsilon_max") is not None]
    last = spent[-1] if spent else {}
    declined = sum(r.get("clients_declined", 0) for r in rows)
    if privacy.distributed:
        lines += [
            f"Federation-wide DP-SGD (`privacy=distributed_dp_sgd`): each round is one central DP-SGD step over the "
            f"union of the sampled clients' Poisson batches (rate {privacy.sample_rate:g} per sequence). Each "
            f"client adds discrete Gaussian noise of std sigma x C / sqrt(K_min), K_min = server.min_replies = "
            f"{settings.server.min_replies}, to its clipped gradient sum before SecAgg+; the server unmasks only "
            "sums of at least K_min shares. The epsilon below holds while at least K_min clients of each round "
            "add their share honestly; if every other client colludes with the server, a client keeps the "
            f"guarantee of its own share alone: at most **{last.get('epsilon_alone_max', 0):.3f}** after round "
            f"{last.get('round', 0)}.", ""]
    return lines + [
        f"Differential privacy: DP-SGD on every client (sample-level: the privacy unit is one training sequence of "
        f"up to {settings.dataset.seq_len} tokens), lifetime budget epsilon = {privacy.target_epsilon:g} per "
        f"client, delta = {last.get('delta', float('nan')):.2g}, per-sequence clipping norm "
        f"{privacy.max_grad_norm:g}, {privacy.accountant.upper()} accounting. After round {last.get('round', 0)} "
        f"the clients' cumulative epsilon is at most **{last.get('epsilon_max', 0):.3f}** "
        f"(mean {last.get('epsilon_mean', 0):.3f}); {declined} training requests were declined to stay "
        "within budget.", "", *plan_lines(rows, privacy.target_epsilon), "![epsilon](epsilon.png)", ""]


def plan_lines(rows: list[dict], budget: float) -> list[str]:
    """Each client's privacy plan (fixed before its first round) and what it has spent of its budget."""
    clients: dict[int, dict] = {}
    for r in rows:
        for metrics in r.get("clients", []):
            seen = clients.setdefault(metrics["client"], {"rounds": 0})
            seen.update(metrics, rounds=seen["rounds"] + 1)
    planned = {c: m for c, m in sorted(clients.items()) if "plan_steps" in m}
    if not planned:
        return []
    lines = ["Each client's privacy plan (`python -m simulations.plan` prints it before a run) and its spend:", "",
             "| client | sequences n | sampling rate q | expected batch | noise multiplier | planned steps "
             "| planned epsilon | rounds trained | epsilon spent | of the budget |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for client, m in planned.items():
        lines.append(f"| {client} | {m['plan_sequences']} | {m['plan_sample_rate']:.4f} | {m['plan_batch']:.1f} "
                     f"| {m['plan_noise_multiplier']:.3f} | {m['plan_steps']} | {m['plan_epsilon']:.3f} "
                     f"| {m['rounds']} | {m['epsilon']:.3f} | {100 * m['epsilon'] / budget:.0f} % |")
    return lines + [""]


def _cell(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_report(run_dir: Path, settings: RunSettings, title: str = "Pollinate run") -> Path:
    """Write report.md and its PNG plots into `run_dir`; returns the report's path."""
    rows = read_metrics(run_dir)
    _plot(rows, {"train_loss": "train (per-sequence)", "eval_loss": "held-out (federated)",
                 "central_loss": "held-out (central)"}, "loss", run_dir / "loss.png")
    _plot(rows, {"eval_perplexity": "held-out, all clients", "eval_perplexity_worst": "held-out, worst client",
                 "central_perplexity": "held-out, central"}, "perplexity", run_dir / "perplexity.png",
          log_scale=True)
    if settings.privacy.enabled:
        _plot(rows, {"epsilon_max": "max over clients that trained", "epsilon_mean": "mean over them"},
              "cumulative epsilon", run_dir / "epsilon.png")
    evaluated = [r for r in rows if r["eval_perplexity"] is not None]  # a round can end with no evaluation
    total_seconds = sum(r["seconds"] for r in rows)
    headline = "No round was evaluated."
    if evaluated:
        first, last = evaluated[0], evaluated[-1]
        change = 100 * (last["eval_perplexity"] / first["eval_perplexity"] - 1)
        headline = (f"Held-out perplexity (federated evaluation on every client's own held-out split): "
                    f"**{first['eval_perplexity']:.2f} at round {first['round']}"
                    f"{' (base model)' if first['round'] == 0 else ''} -> {last['eval_perplexity']:.2f} "
                    f"after round {last['round']}** ({change:+.1f} %).")
    lost = [r for r in rows if r.get("abandoned")]
    if lost:
        headline += (f"\n\n**{len(lost)} of {len(rows) - 1} rounds were abandoned and changed nothing:** " + "; ".join(
            f"round {r['round']} at {r.get('abandoned_stage')} ({r.get('abandoned_reason')})" for r in lost) + ".")
    lines = [
        f"# {title}", "", f"{headline} Wall time {total_seconds:.0f} s.", "",
        *privacy_lines(rows, settings),
        "| round | train loss | held-out loss | held-out ppl | worst client ppl | clients ok/sampled (declined) "
        "| MB down | MB up | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        train, loss, ppl, worst = (_cell(r.get(key), digits) for key, digits in (
            ("train_loss", 3), ("eval_loss", 3), ("eval_perplexity", 2), ("eval_perplexity_worst", 2)))
        lines.append(f"| {r['round']} | {train} | {loss} | {ppl} | {worst} "
                     f"| {r['clients_ok']}/{r['clients_sampled']} ({r.get('clients_declined', 0)}) | {r['bytes_down'] / 1e6:.2f} "
                     f"| {r['bytes_up'] / 1e6:.2f} | {r['seconds']:.1f}{' (abandoned)' if r.get('abandoned') else ''} |")
    if any("central_perplexity" in r for r in rows):
        lines += ["", "Central evaluation (server-side data): " + ", ".join(
            f"round {r['round']}: {r['central_perplexity']:.2f}" for r in rows if "central_perplexity" in r)]
    lines += ["", "![loss](loss.png)", "", "![perplexity](perplexity.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
