"""A client's durable privacy ledger, spent as a transaction: begin (check and project), train, commit (record)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedlm.files import write_atomic
from fedlm.privacy import epsilon_of
from fedlm.protocol import DECLINES, BudgetExceeded
from fedlm.settings import ACCOUNTANTS, ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock, the atomic write still holds
    fcntl = None

log = logging.getLogger(__name__)

LEDGER_VERSION = 1
"""The file format: {"version", "parameters": {...}, "history": [{key, noise_multiplier, sample_rate, steps,
epsilon}, ...]}; the parameters' plan figures and shares are optional. Unchanged otherwise since the ledger lived in
fedlm/privacy.py, so existing ledgers are read as they are."""


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class LedgerParameters:
    """A client's lifetime privacy parameters, fixed when its ledger is created.

    Raises:
        ValueError: a value out of range, or an unknown accountant.
    """
    noise_multiplier: float
    sample_rate: float
    delta: float
    target_epsilon: float
    """The lifetime budget: no round may take the cumulative epsilon past it."""
    accountant: str = "prv"
    # The plan these were chosen by (fedlm/plan.py); 0 in a ledger written before plans existed.
    sequences: int = 0
    """The client's training sequences when the ledger was created."""
    planned_steps: int = 0
    """Lifetime DP-SGD steps the noise was calibrated for."""
    planned_epsilon: float = 0.0
    """The epsilon after exactly `planned_steps` steps."""
    shares: int = 1
    """privacy=distributed_dp_sgd: the noise shares (K_min) `noise_multiplier` counts on; this client's own share
    alone has multiplier noise_multiplier / sqrt(shares). 1: the client adds all of its noise itself."""

    def __post_init__(self) -> None:
        numbers = (self.noise_multiplier, self.sample_rate, self.delta, self.target_epsilon)
        if not (all(map(_positive_number, numbers)) and self.sample_rate <= 1 and self.delta < 1):
            raise ValueError(f"invalid ledger parameters: noise_multiplier={self.noise_multiplier}, "
                             f"sample_rate={self.sample_rate}, delta={self.delta}, "
                             f"target_epsilon={self.target_epsilon} (need > 0, sample_rate <= 1, delta < 1)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant={self.accountant!r} is unknown; choose one of {list(ACCOUNTANTS)}")
        if isinstance(self.shares, bool) or not isinstance(self.shares, int) or self.shares < 1:
            raise ValueError(f"invalid ledger parameters: shares={self.shares!r} (need a whole number >= 1)")
        plan = (self.sequences, self.planned_steps, self.planned_epsilon)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in plan):
            raise ValueError(f"invalid plan figures: sequences={self.sequences}, planned_steps={self.planned_steps}, "
                             f"planned_epsilon={self.planned_epsilon} (need numbers >= 0)")

    def as_json(self) -> dict:
        return {"noise_multiplier": float(self.noise_multiplier), "sample_rate": float(self.sample_rate),
                "delta": float(self.delta), "target_epsilon": float(self.target_epsilon),
                "accountant": self.accountant, "sequences": int(self.sequences),
                "planned_steps": int(self.planned_steps), "planned_epsilon": float(self.planned_epsilon),
                "shares": int(self.shares)}

    def plan_metrics(self) -> dict[str, float]:
        """The plan as a client reports it with every update (metrics.jsonl, report.md)."""
        return {"plan_sequences": self.sequences, "plan_sample_rate": self.sample_rate,
                "plan_batch": self.sample_rate * self.sequences, "plan_noise_multiplier": self.noise_multiplier,
                "plan_steps": self.planned_steps, "plan_epsilon": self.planned_epsilon, "plan_shares": self.shares}


@dataclass(frozen=True)
class LedgerState:
    """One reading of the ledger file."""
    parameters: LedgerParameters
    history: tuple[dict, ...]
    """The recorded spends, oldest first: {key, noise_multiplier, sample_rate, steps, epsilon}."""

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon over everything recorded (0 before the first record)."""
        return float(self.history[-1]["epsilon"]) if self.history else 0.0

    def own_share_epsilon(self) -> float:
        """The cumulative epsilon from this client's own noise alone (multiplier noise_multiplier / sqrt(shares)):
        what remains if every other client of its rounds colluded with the server. Equal to `epsilon` when the
        client adds all of its noise itself (shares = 1)."""
        if self.parameters.shares == 1:
            return self.epsilon
        scale = math.sqrt(self.parameters.shares)
        return epsilon_of([(e["noise_multiplier"] / scale, e["sample_rate"], e["steps"]) for e in self.history],
                          self.parameters.delta, self.parameters.accountant)

    def has_spent(self, key: str) -> bool:
        """Whether the instruction `key` (e.g. "run 3 round 2") is recorded."""
        return any(entry["key"] == key for entry in self.history)


@dataclass(frozen=True)
class Spend:
    """A spend begun but not yet recorded: what to train with, and what it will cost."""
    key: str
    steps: int
    parameters: LedgerParameters
    """Train with these (the ledger's lifetime values), not with what the run's settings would give today."""
    epsilon: float
    """The cumulative epsilon before this spend."""
    projected_epsilon: float
    """The cumulative epsilon once it is recorded (unless another spend is recorded first)."""
    created: bool
    """Whether `begin` created the ledger (its parameters are the ones `new_parameters` returned)."""
    history: tuple[dict, ...] = field(repr=False)
    """The history `projected_epsilon` was computed on: commit reuses it only if the file still holds exactly this."""


class PrivacyLedger:
    """A client's durable privacy account: one JSON file the client owns, spent through `begin` and `commit`."""

    def __init__(self, path: Path, owner: str = "this client") -> None:
        self.path = Path(path)
        self.owner = owner
        """Who refusals name, e.g. "client 3"."""

    # -- reading --------------------------------------------------------------------------------------
    def _corrupt(self, reason: object) -> ConfigError:
        return ConfigError(
            f"privacy ledger {self.path} is unreadable or corrupt ({reason}). It records the privacy budget "
            "this client has already spent: do not delete it lightly, since a new ledger starts again from "
            "epsilon 0 and the client could exceed its lifetime budget. Restore it from a backup, or delete "
            "it only if this client's data has never been trained on.")

    def _load(self) -> LedgerState | None:
        """The file, parsed and checked once; None if it does not exist."""
        try:
            state = json.loads(self.path.read_bytes())
            if state["version"] != LEDGER_VERSION:
                raise ValueError(f"version {state['version']!r}, this Pollinate reads {LEDGER_VERSION}")
            params, history = state["parameters"], state["history"]
            plan = {k: params[k] for k in ("sequences", "planned_steps", "planned_epsilon", "shares") if k in params}
            parameters = LedgerParameters(**{k: params[k] for k in ("noise_multiplier", "sample_rate", "delta",
                                                                     "target_epsilon", "accountant")}, **plan)
            if not isinstance(history, list):
                raise ValueError("bad history")
            for e in history:
                if not (isinstance(e["key"], str) and isinstance(e["steps"], int) and all(
                        isinstance(e[k], (int, float)) for k in ("noise_multiplier", "sample_rate", "epsilon"))):
                    raise ValueError(f"bad history entry {e!r}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise self._corrupt(err) from None
        return LedgerState(parameters, tuple(history))

    def read(self) -> LedgerState:
        """The ledger as it is on disk (one parse).

        Raises:
            FileNotFoundError: there is no ledger yet.
            ConfigError: the file is corrupt.
        """
        state = self._load()
        if state is None:
            raise FileNotFoundError(f"privacy ledger {self.path} does not exist: its first begin() creates it")
        return state

    @staticmethod
    def _epsilon_after(state: LedgerState, spend: tuple[float, float, int]) -> float:
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in state.history]
        return epsilon_of(history + [spend], state.parameters.delta, state.parameters.accountant)

    # -- writing --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the ledger's directory (two processes never interleave a read-modify-write)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            if fcntl is not None:
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(dir_fd)  # releases the lock

    def _write(self, state: LedgerState) -> None:
        # A crash at any point leaves either the old or the new file, never a torn one. A writer killed before
        # its rename leaves a temporary file behind; readers never look at it, and since every writer of this
        # ledger holds the lock, any one present now is such a leftover.
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        data = {"version": LEDGER_VERSION, "parameters": state.parameters.as_json(), "history": list(state.history)}
        write_atomic(self.path, lambda f: f.write(json.dumps(data, indent=1).encode()))

    def _spent_twice(self, key: str, when: str) -> BudgetExceeded:
        return BudgetExceeded(f"{self.owner} {DECLINES}: it already trained {key!r} ({when}; privacy ledger "
                              f"{self.path}): an instruction delivered twice is never spent twice")

    def begin(self, key: str, steps: int, *,
              new_parameters: Callable[[], LedgerParameters] | None = None) -> Spend:
        """Check that `steps` more steps under `key` fit the budget, before any training.

        One read under the lock. A missing ledger is created (durably, before returning) with the parameters
        `new_parameters()` returns: it is called only then, so an expensive noise calibration runs once per
        client lifetime, and may raise to refuse before anything is written. The projected epsilon is
        computed here once; `commit` reuses it.

        Raises:
            BudgetExceeded: `key` is already spent, or the spend would take the client past its budget.
            FileNotFoundError: no ledger, and no `new_parameters` to create one.
            ValueError: steps < 0, or invalid new parameters.
            ConfigError: the file is corrupt.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0 (got {steps})")
        with self._locked():
            state, created = self._load(), False
            if state is None:
                if new_parameters is None:
                    raise FileNotFoundError(f"privacy ledger {self.path} does not exist; pass new_parameters "
                                            "to begin() to create it")
                state, created = LedgerState(new_parameters(), ()), True
                self._write(state)
            if state.has_spent(key):
                raise self._spent_twice(key, "recorded before this round began")
            params = state.parameters
            projected = self._epsilon_after(state, (params.noise_multiplier, params.sample_rate, steps))
        if projected > params.target_epsilon:
            raise BudgetExceeded(f"{self.owner} {DECLINES}: it would take its epsilon from {state.epsilon:.3f} to "
                                 f"{projected:.3f}, past its lifetime budget {params.target_epsilon:g}")
        return Spend(key=key, steps=int(steps), parameters=params, epsilon=state.epsilon,
                     projected_epsilon=projected, created=created, history=state.history)

    def commit(self, spend: Spend) -> float:
        """Record `spend` durably; returns the new cumulative epsilon. Call it before the update leaves.

        Re-reads under the lock. If the history is exactly what `begin` saw, the entry carries the epsilon
        computed there; if another spend was recorded meanwhile, the epsilon is recomputed on the new history.
        The entry is written whatever it costs (the steps were taken: a crash or a refusal over-counts, never
        under-counts), but an update that would end past the budget must not leave.

        Raises:
            BudgetExceeded: `spend.key` was recorded while this one trained (one instruction delivered to two
                processes), or a spend recorded meanwhile leaves this one past the budget (recorded anyway).
            ConfigError: the file is corrupt, or was removed since `begin`.
        """
        with self._locked():
            state = self._load()  # re-read under the lock: another process may have recorded since begin
            if state is None:
                raise ConfigError(f"privacy ledger {self.path} disappeared between begin() and commit() of "
                                  f"{spend.key!r}: restore it from a backup; this update must not leave")
            if state.has_spent(spend.key):
                raise self._spent_twice(spend.key, "recorded by another process while this one trained")
            spent = (spend.parameters.noise_multiplier, spend.parameters.sample_rate, spend.steps)
            unchanged = state.history == spend.history and state.parameters == spend.parameters
            eps = spend.projected_epsilon if unchanged else self._epsilon_after(state, spent)
            entry = {"key": spend.key, "noise_multiplier": spent[0], "sample_rate": spent[1], "steps": spent[2],
                     "epsilon": eps}
            self._write(LedgerState(state.parameters, (*state.history, entry)))
        if eps > state.parameters.target_epsilon:
            raise BudgetExceeded(f"{self.owner} {DECLINES}: spends recorded while it trained took its epsilon from "
                                 f"{state.epsilon:.3f} to {eps:.3f}, past its lifetime budget "
                                 f"{state.parameters.target_epsilon:g} (the steps are recorded; the update stays)")
        return eps
