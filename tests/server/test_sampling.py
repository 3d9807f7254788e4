"""Client sampling: a round's cohort depends on (seed, round) and the clients' stable identities, never on node ids."""

import logging
import time

from flwr.server.compat.grid_client_proxy import GridClientProxy

from server.sampling import StableClientManager


def _manager(node_ids: list[int], names: list[str], seed: int = 0, timeout: float = 5.0) -> StableClientManager:
    manager = StableClientManager(grid=None, seed=seed, timeout=timeout)
    for node_id, name in zip(node_ids, names):
        manager.register(GridClientProxy(node_id, grid=None, run_id=1))
        manager.identities[str(node_id)] = name  # as identify() would have learnt them
    return manager


def _cohort(manager: StableClientManager, server_round: int, k: int) -> set[str]:
    manager.server_round = server_round
    return {manager.identities[proxy.cid] for proxy in manager.sample(k)}


NAMES = [f"client-{i}" for i in range(8)]


def test_the_cohort_follows_identities_not_node_ids():
    # Two runs of the same federation: Flower draws new node ids each time, in another order.
    first = _manager([101, 102, 103, 104, 105, 106, 107, 108], NAMES)
    second = _manager([9_001, 42, 7, 555, 31_337, 12, 808, 3], NAMES)
    for server_round in range(1, 6):
        assert _cohort(first, server_round, 4) == _cohort(second, server_round, 4)
        assert len(_cohort(first, server_round, 4)) == 4


def test_cohorts_change_with_the_round_and_the_seed():
    manager, other_seed = _manager(list(range(1, 9)), NAMES), _manager(list(range(1, 9)), NAMES, seed=1)
    cohorts = [frozenset(_cohort(manager, r, 4)) for r in range(1, 11)]
    assert len(set(cohorts)) > 5  # 70 possible cohorts of 4 from 8: ten rounds repeating would be a broken draw
    assert cohorts != [frozenset(_cohort(other_seed, r, 4)) for r in range(1, 11)]
    assert cohorts == [frozenset(_cohort(manager, r, 4)) for r in range(1, 11)]  # a resumed run draws the same


def test_a_short_federation_goes_on_with_those_connected_after_the_timeout(caplog):
    manager = _manager([1, 2], NAMES[:2], timeout=0.6)
    manager.server_round = 3
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        sampled = manager.sample(3)
    assert 0.5 < time.monotonic() - start < 5  # it waited the timeout (not rounded down to 0 s), then went on
    assert sorted(proxy.cid for proxy in sampled) == ["1", "2"]
    assert "round 3: 3 clients wanted, 2 connected after 1 s; going on with them" in caplog.text
