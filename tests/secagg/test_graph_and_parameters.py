import math

import pytest

from device_runtime.secagg import parameters
from device_runtime.secagg.graph import NeighbourGraph


def test_the_graph_is_symmetric_and_regular() -> None:
    graph = NeighbourGraph(b"seed", 40, 8)

    for client in range(1, 41):
        neighbours = graph.neighbours(client)
        assert len(neighbours) == 8
        assert client not in neighbours
        assert all(graph.are_neighbours(v, client) for v in neighbours)


def test_the_graph_depends_on_the_round_seed_only() -> None:
    first, again, other = (NeighbourGraph(s, 40, 8) for s in (b"one", b"one", b"two"))

    assert all(first.neighbours(c) == again.neighbours(c) for c in range(1, 41))
    assert any(first.neighbours(c) != other.neighbours(c) for c in range(1, 41))


def test_the_complete_graph_joins_everyone() -> None:
    graph = NeighbourGraph(b"seed", 5, 4)

    assert graph.neighbours(3) == {1, 2, 4, 5}


@pytest.mark.parametrize(("n", "k"), [(1, 0), (10, 3), (10, 10), (10, 0)])
def test_impossible_graphs_are_refused(n: int, k: int) -> None:
    with pytest.raises(ValueError):
        NeighbourGraph(b"seed", n, k)


def test_neighbours_grow_logarithmically_with_the_population() -> None:
    populations = (100, 1000, 10_000)
    degrees = [parameters.choose_parameters(n).num_neighbours for n in populations]

    assert degrees == sorted(degrees)
    assert degrees[-1] < 100  # 10,000 clients share with under 1% of the others
    # 100 times the population costs at most about log(10,000) / log(100) = 2 times the degree.
    assert degrees[-1] <= 2 * math.log(10_000) / math.log(100) * degrees[0]


@pytest.mark.parametrize("n", [5, 50, 300, 1000])
def test_chosen_parameters_meet_the_bounds_they_claim(n: int) -> None:
    p = parameters.choose_parameters(n)
    k, t = p.num_neighbours, p.threshold

    fails_privacy = n * parameters._hypergeometric_tail(n - 1, p.max_corrupt, k, 2 * t - k)
    fails_correctness = n * parameters._hypergeometric_tail(n - 1, p.max_dropouts, k, k - t + 1)

    assert fails_privacy <= 2.0**-parameters.security_bits
    assert fails_correctness <= 2.0**-parameters.correctness_bits
    assert 2 * t > k  # one share of each kind per honest neighbour never suffices
    assert p.max_dropouts == math.ceil(0.1 * n)


def test_more_dropouts_need_more_neighbours() -> None:
    low = parameters.choose_parameters(300, dropout_rate=0.05)
    high = parameters.choose_parameters(300, dropout_rate=0.3)

    assert high.num_neighbours > low.num_neighbours


def test_an_infeasible_threat_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lower the rates or enrol more"):
        parameters.choose_parameters(3, dropout_rate=0.4, corrupt_rate=0.3)
    with pytest.raises(ValueError, match="at least 2"):
        parameters.choose_parameters(1)
