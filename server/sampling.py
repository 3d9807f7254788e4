"""Client sampling that depends only on (seed, round) and each client's stable identity.

Flower samples from `random` over node ids, which are drawn afresh by every simulation (and every SuperNode
registration), so the same seed picked different clients in different runs, and a resumed run could not pick
the clients the crashed run would have. Here each node is asked once for its stable identity (the
`client-id` of `client.app.identify`), and round r's cohort is drawn from the sorted identities with a
generator seeded by (seed, r): a resumed run draws the same cohorts with no random state to restore.

The draw is balanced: each round takes the clients asked least often so far (ties broken by the draw), so over
R rounds each of N clients is asked at most ceil(R K / N) times, the horizon its privacy plan is calibrated for
(fedlm/plan.py) and no fewer than floor(R K / N): the budget is spent, not left to chance. Client-level DP
accounts cohorts as random draws, so with it on the manager draws uniformly at random instead.
"""

from __future__ import annotations

import logging
import random

from flwr.app import Message
from flwr.common import GetPropertiesIns, MessageTypeLegacy
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.serverapp import Grid

IDENTITY_KEY = "client-id"


class StableClientManager(SimpleClientManager):
    """A client manager whose `sample` is reproducible across runs; the round loop sets `server_round`."""

    def __init__(self, grid: Grid, seed: int, timeout: float, balanced: bool = True) -> None:
        super().__init__()
        self.grid = grid
        self.seed = seed
        self.timeout = timeout
        self.balanced = balanced
        self._replay: tuple[tuple[str, ...], int, list[list[str]], dict[str, int]] | None = None
        """(identities, cohort size, each replayed round's cohort, times each was asked): the balanced draw."""
        self.server_round = 0
        self.identities: dict[str, str] = {}
        """node id -> the client's stable identity."""

    def identify(self, node_ids: list[str]) -> None:
        """Ask every node not yet identified for its identity, all at once; silent nodes are asked again later."""
        unknown = [cid for cid in node_ids if cid not in self.identities]
        if not unknown:
            return
        messages = [Message(content=compat.getpropertiesins_to_recorddict(GetPropertiesIns(config={})),
                            dst_node_id=int(cid), message_type=MessageTypeLegacy.GET_PROPERTIES,
                            group_id="identify") for cid in unknown]
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                log(logging.WARNING, "node %s did not say who it is (%s); it is not sampled this time",
                    reply.metadata.src_node_id, reply.error.reason)
                continue
            properties = compat.recorddict_to_getpropertiesres(reply.content).properties
            if IDENTITY_KEY in properties:
                self.identities[str(reply.metadata.src_node_id)] = str(properties[IDENTITY_KEY])

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        wanted = min_num_clients if min_num_clients is not None else num_clients
        # A device lost for good must not stall the federation (Flower would wait a day): after the round's
        # timeout go on with those connected; server.min_replies still guards what gets published.
        if not self.wait_for(wanted, timeout=self.timeout):  # a float: Flower passes it to Condition.wait_for
            log(logging.WARNING, "round %d: %d clients wanted, %d connected after %.0f s; going on with them",
                self.server_round, wanted, len(self.clients), self.timeout)
            num_clients = min(num_clients, len(self.clients))
        if num_clients >= len(self.clients) and criterion is None:
            return list(self.clients.values())  # everyone: no draw, no need to know who is who
        self.identify(list(self.clients))
        known = sorted((self.identities[cid], cid) for cid in self.clients if cid in self.identities)
        candidates = [cid for _, cid in known
                      if criterion is None or criterion.select(self.clients[cid])]
        if num_clients > len(candidates):
            log(logging.WARNING, "round %d: %d clients requested, only %d identified and available", self.server_round,
                num_clients, len(candidates))
            return []
        names = {self.identities[cid]: cid for cid in candidates}
        draw = self.balanced_cohort if self.balanced else self.random_cohort
        return [self.clients[names[name]] for name in draw(sorted(names), num_clients)]

    def random_cohort(self, names: list[str], k: int) -> list[str]:
        return self._draw(self.server_round).sample(names, k)

    def _draw(self, server_round: int) -> random.Random:
        return random.Random(f"{self.seed}:{server_round}")  # str seeds hash stably across processes

    def balanced_cohort(self, names: list[str], k: int) -> list[str]:
        """The k of `names` asked least often in rounds 1 .. server_round - 1, ties broken by the round's draw.

        Rounds are replayed from round 1 (once per process, then extended), so a resumed run draws what the
        crashed one would have, given the same clients."""
        if self._replay is None or self._replay[:2] != (tuple(names), k):
            self._replay = (tuple(names), k, [], dict.fromkeys(names, 0))
        cohorts, counts = self._replay[2], self._replay[3]
        server_round = max(self.server_round, 1)  # before round 1 (the base's evaluation): round 1's draw
        while len(cohorts) < server_round:
            order = self._draw(len(cohorts) + 1).sample(names, len(names))
            cohorts.append(sorted(order, key=counts.__getitem__)[:k])  # a stable sort: equals keep the draw's order
            for name in cohorts[-1]:
                counts[name] += 1
        return cohorts[server_round - 1]
