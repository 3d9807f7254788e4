"""`python -m simulations.plan [overrides]`: every client's privacy plan for a run, without training.

Prepares the run's data as the launcher would (so each client's number of training sequences is the real one),
then prints what each client's plan (fedlm/plan.py) would fix in its ledger: the sampling rate and expected
batch, the noise multiplier, the lifetime steps and the epsilon they reach. Takes the same Hydra overrides as
`python -m simulations.run`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from fedlm.plan import plan_privacy, planned_rounds
from fedlm.settings import ConfigError, RunSettings
from simulations.launch import make_offline_safe, prepare
from simulations.run import compose_settings, refuse


def plan_table(settings: RunSettings, sizes: list[int], out=print) -> None:
    """Print one row per client as its plan is computed (each takes a few seconds)."""
    privacy, fed = settings.privacy, settings.federation
    rounds = planned_rounds(settings)
    steps = 1 if privacy.distributed else settings.train.local_steps
    out(f"Privacy plans: target epsilon {privacy.target_epsilon:g} per client over its lifetime, "
        f"{privacy.accountant.upper()} accounting, clipping norm {privacy.max_grad_norm:g}; each client is asked "
        f"to join {rounds} of {fed.rounds} rounds ({fed.clients_per_round} of {fed.num_clients} per round) and "
        f"takes {steps} step{'s' if steps > 1 else ''} in each.")
    if privacy.distributed:
        out(f"privacy=distributed_dp_sgd: the noise multiplier is the round sum's, once server.min_replies="
            f"{settings.server.min_replies} clients add their share; each client's own share alone has "
            f"multiplier sigma / sqrt({settings.server.min_replies}).")
    out("")
    out("| client | sequences n | sampling rate q | expected batch | noise multiplier | lifetime steps "
        "| delta | projected epsilon |")
    out("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for client, n in enumerate(sizes):
        plan = plan_privacy(settings, n)
        out(f"| {client} | {n} | {plan.sample_rate:.4f} | {plan.sample_rate * n:.1f} | {plan.noise_multiplier:.3f} "
            f"| {plan.planned_steps} | {plan.delta:.2g} | {plan.planned_epsilon:.3f} |")


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    if any(o in ("-h", "--help") for o in overrides):
        print(__doc__)
        return
    make_offline_safe()
    try:
        with tempfile.TemporaryDirectory(prefix="pollinate-plan-") as tmp:
            settings = compose_settings(overrides, tmp)
            if not settings.privacy.enabled:
                raise ConfigError("privacy=disabled: there is no privacy plan to print (drop the override, or "
                                  "use privacy=dp_sgd)")
            prepare(settings)
            summary = json.loads((Path(tmp) / "data" / "summary.json").read_text())
            plan_table(settings, [c["train_sequences"] for c in summary])
    except ConfigError as err:
        refuse(err)


if __name__ == "__main__":
    main()
