"""Client sampling: a round's cohort depends on (seed, round) and the clients' stable identities, never on node ids."""

import logging
import math
import time

import pytest

from flwr.server.compat.grid_client_proxy import GridClientProxy

from server.sampling import StableClientManager


def _manager(node_ids: list[int], names: list[str], seed: int = 0, timeout: float = 5.0,
             balanced: bool = True) -> StableClientManager:
    manager = StableClientManager(grid=None, seed=seed, timeout=timeout, balanced=balanced)
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


@pytest.mark.parametrize("clients, k, rounds", [(8, 4, 10), (8, 3, 10), (5, 2, 7), (10, 1, 25)])
def test_balanced_cohorts_ask_every_client_as_often_as_its_privacy_plan_expects(clients, k, rounds):
    names = NAMES + [f"client-{i}" for i in range(8, clients)]
    manager = _manager(list(range(1, clients + 1)), names[:clients])
    asked = dict.fromkeys(names[:clients], 0)
    for server_round in range(1, rounds + 1):
        cohort = _cohort(manager, server_round, k)
        assert len(cohort) == k
        for name in cohort:
            asked[name] += 1
        # At every point, nobody is asked more than ceil(r K / N) times nor fewer than floor(r K / N).
        assert max(asked.values()) <= math.ceil(server_round * k / clients)
        assert min(asked.values()) >= server_round * k // clients
    fresh = _manager(list(range(50, 50 + clients)), names[:clients])  # a resumed run, new node ids
    assert _cohort(fresh, rounds, k) == _cohort(manager, rounds, k)


def test_with_client_level_dp_cohorts_are_uniform_draws():
    manager = _manager(list(range(1, 9)), NAMES, balanced=False)
    asked = dict.fromkeys(NAMES, 0)
    for server_round in range(1, 41):
        for name in _cohort(manager, server_round, 4):
            asked[name] += 1
    # Uniform draws of 4 from 8 over 40 rounds: each is asked Binomial(40, 1/2) times, so some stray from 20
    # (the balanced draw gives exactly 20 to everyone); P(all within 1 of 20) is about 1e-5.
    assert max(abs(a - 20) for a in asked.values()) > 1
