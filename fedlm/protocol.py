"""What travels beside the adapter: the keys of a round's instructions and a client's refusal code (no heavy imports)."""

from __future__ import annotations

ROUND = "round"
"""The round an instruction belongs to; a reply carries it back so the server can drop a stale one."""
PROXIMAL_MU = "proximal-mu"
"""FedProx: weight of the proximal term (mu/2)||w - w_global||^2 the client adds to its local objective."""
FROZEN_A = "frozen-a"
"""FFA-LoRA: the client keeps every lora_A as the shared seed drew it and sends only lora_B."""

DECLINED = 1001
"""Error code of a client's refusal to train (budget spent, privacy floor, instruction already spent): outside
Flower's own ErrorCode range (0-8), so the server counts such a client as a non-participant, not a failure."""

DECLINES = "declines to train this round"
"""The words every refusal's message carries, for people reading logs."""


class BudgetExceeded(RuntimeError):
    """A client must not train this round: its budget would be exceeded or the run asks for too little privacy."""
