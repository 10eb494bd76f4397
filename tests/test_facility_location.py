"""Facility location against brute force, apricot-select and its own invariants."""

from __future__ import annotations

import functools
import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_crest.selection import class_budgets, facility_location, facility_location_objective
from lightning_crest.selection._facility_location import _dense_greedy


def _similarity_matrix(points: np.ndarray, similarity: str = "distance") -> np.ndarray:
    dist = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    if similarity == "distance":
        return dist.max() - dist
    return np.exp(-dist / points.shape[1])


def _objective(sim: np.ndarray, picks: list[int] | tuple[int, ...]) -> float:
    return float(sim[:, list(picks)].max(axis=1).sum()) if len(picks) else 0.0


def _reference_greedy(sim: np.ndarray, budget: int) -> list[int]:
    """Textbook greedy: evaluate F(S + j) for every j, keep the first best."""
    picks: list[int] = []
    for _ in range(budget):
        rest = [j for j in range(len(sim)) if j not in picks]
        values = [_objective(sim, [*picks, j]) for j in rest]
        picks.append(rest[int(np.argmax(values))])
    return picks


def _assert_greedy_steps(sim: np.ndarray, picks: list[int], gains: np.ndarray, abs_tol: float = 0.0) -> None:
    """Every pick has the largest marginal gain on ``sim`` given the earlier ones, and its gain is that increment.

    Exact ties may go either way: on a kNN graph two mutual nearest neighbours that nothing else covers tie
    exactly, and the sparse greedy's incrementally summed gains need not break that tie by index.
    """
    for t, pick in enumerate(picks):
        before = _objective(sim, picks[:t])
        increments = [_objective(sim, [*picks[:t], j]) - before for j in range(len(sim))]
        assert pick not in picks[:t]
        assert increments[pick] >= max(increments) * (1 - 1e-6)
        assert gains[t] == pytest.approx(increments[pick], rel=1e-5, abs=abs_tol)


def _ownership(points: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Brute-force cluster sizes: a pick owns itself; any other point goes to its nearest pick of its own class,
    the earlier pick in greedy order on a tie."""
    dist = torch.cdist(points.double(), points[indices].double())
    picks = indices.tolist()
    weights = torch.zeros(len(picks))
    for i in range(len(points)):
        if i in picks:
            owner = picks.index(i)
        else:
            same = [t for t, j in enumerate(picks) if labels[j] == labels[i]]
            owner = min(same, key=lambda t: (float(dist[i, t]), t))
        weights[owner] += 1
    return weights


def _knn_similarity(points: torch.Tensor, k: int, similarity: str) -> np.ndarray:
    """One class's zero-filled kNN similarity: row i holds the k nearest points (itself included) that cover i."""
    dist = torch.cdist(points, points)
    rows, nearest = torch.arange(len(points)).unsqueeze(1), dist.argsort(dim=1)[:, :k]
    if similarity == "distance":
        values = 2 * (points - points.mean(0)).norm(dim=1).max() - dist[rows, nearest]
    else:
        values = torch.exp(-dist[rows, nearest] / points.shape[1])
    sim = torch.zeros(len(points), len(points), dtype=points.dtype)
    sim[rows, nearest] = values
    return sim.numpy()


def _largest_remainder(counts: list[int], budget: int) -> list[int]:
    """Plain-Python class_budgets: floors of the exact quotas, leftovers to the largest remainders (lower class
    first on a tie), then each present class left at zero takes one pick from the class with the most (the
    lower class on a tie)."""
    quotas = [Fraction(budget * n, sum(counts)) for n in counts]
    budgets = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(counts)), key=lambda c: (budgets[c] - quotas[c], c))
    for c in by_remainder[: budget - sum(budgets)]:
        budgets[c] += 1
    for c, n in enumerate(counts):
        if n > 0 and budgets[c] == 0:
            budgets[budgets.index(max(budgets))] -= 1
            budgets[c] = 1
    return budgets


def _pool(n: int, d: int = 3, seed: int = 0, clusters: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if clusters:
        centres = torch.randn(clusters, d, generator=gen, dtype=torch.float64) * 5
        owner = torch.randint(0, clusters, (n,), generator=gen)
        return centres[owner] + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("similarity", ["distance", "exp"])
@pytest.mark.parametrize(("n", "budget", "seed"), [(6, 2, 0), (9, 3, 1), (12, 4, 2), (12, 6, 3), (5, 5, 4)])
def test_matches_exhaustive_greedy_and_bound(n: int, budget: int, seed: int, similarity: str) -> None:
    points = _pool(n, seed=seed)
    sim = _similarity_matrix(points.numpy(), similarity)
    selection = facility_location(points, budget, similarity=similarity)  # type: ignore[arg-type]

    assert selection.indices.tolist() == _reference_greedy(sim, budget)
    optimum = max(_objective(sim, s) for s in itertools.combinations(range(n), budget))
    value = _objective(sim, selection.indices.tolist())
    assert value >= (1 - 1 / math.e) * optimum - 1e-12
    assert value == pytest.approx(
        facility_location_objective(points, selection.indices, similarity=similarity)
    )
    # Gains are the increments of the objective along the pick order.
    prefix = [_objective(sim, selection.indices[: t + 1].tolist()) for t in range(budget)]
    assert selection.gains.double().numpy() == pytest.approx(np.diff([0.0, *prefix]), rel=1e-6)


def test_per_class_matches_exhaustive_greedy_within_each_class() -> None:
    points = _pool(12, seed=5)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 0, 1, 0, 0])
    selection = facility_location(points, 6, labels)
    budgets = class_budgets(torch.bincount(labels), 6)
    for cls in range(3):
        members = torch.nonzero(labels == cls).flatten()
        sim = _similarity_matrix(points[members].numpy())
        expected = members[_reference_greedy(sim, int(budgets[cls]))].tolist()
        chosen = [i for i in selection.indices.tolist() if labels[i] == cls]
        assert chosen == expected


@pytest.mark.parametrize("knn", [None, 64])
def test_given_budgets_pick_within_each_class_and_may_leave_classes_out(knn: int | None) -> None:
    # Each class with picks against the exhaustive greedy over its members alone, with cluster sizes of its own
    # points; a class without picks is left out. Three pools of 60 points in 12 classes, 8 picks each.
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(3, 60, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(12, (3, 60), generator=gen)
    counts = torch.stack([torch.bincount(row, minlength=12) for row in labels])
    budgets = torch.zeros(3, 12, dtype=torch.long)
    for row in range(3):
        present = torch.nonzero(counts[row]).flatten()
        chosen = present[torch.randperm(len(present), generator=gen)[:7]]
        budgets[row, chosen] = 1
        budgets[row, chosen[0]] += 1  # one class with two picks
    selection = facility_location(points, 8, labels, knn=knn, budgets=budgets)
    for row in range(3):
        picked: dict[int, float] = {}
        for cls in torch.nonzero(budgets[row]).flatten().tolist():
            members = torch.nonzero(labels[row] == cls).flatten()
            sim = _similarity_matrix(points[row, members].numpy())
            local = torch.tensor(_reference_greedy(sim, int(budgets[row, cls])))
            owners = _ownership(points[row, members], torch.zeros(len(members)), local)
            picked |= dict(zip(members[local].tolist(), owners.tolist()))
        got = dict(zip(selection.indices[row].tolist(), selection.weights[row].tolist()))
        assert got == picked
        assert selection.weights[row].sum() == counts[row][budgets[row] > 0].sum()
    # The proportional split, given, is the default.
    default = facility_location(points, 20, labels)
    given = facility_location(points, 20, labels, budgets=class_budgets(counts, 20))
    assert torch.equal(default.indices, given.indices)
    assert torch.equal(default.weights, given.weights)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"labels": None}, ValueError, "pass the `labels`"),
        ({"budgets": torch.ones(4)}, TypeError, "integer tensor"),
        ({"budgets": torch.ones(3, dtype=torch.long)}, ValueError, r"shape \(C,\) or \(P, C\)"),
        ({"budgets": torch.tensor([2, 1, 0, 0])}, ValueError, "sum to `budget`=2"),
        ({"budgets": torch.tensor([3, -1, 0, 0])}, ValueError, "non-negative"),
        ({"budgets": torch.tensor([0, 0, 0, 2])}, ValueError, "class 3 2 picks in pool 0, which holds 1"),
        ({"budgets": torch.tensor([[1, 1, 0, 0]] * 2)}, ValueError, "2 rows for 1 pools"),
    ],
)
def test_bad_budgets_are_refused(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    options: dict[str, object] = {
        "labels": torch.tensor([0, 0, 1, 1, 2, 3]),
        "budgets": torch.tensor([1, 1, 0, 0]),
    }
    options |= kwargs
    with pytest.raises(error, match=match):
        facility_location(_pool(6), 2, **options)  # type: ignore[arg-type]


def test_weights_are_cluster_sizes() -> None:
    points = _pool(40, seed=6)
    labels = torch.arange(40) % 3
    selection = facility_location(points, 7, labels)
    assert torch.equal(selection.weights, _ownership(points, labels, selection.indices))


@pytest.mark.parametrize("seed", range(5))
def test_invariants_per_class(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    r, num_classes, budget = 300, 7, 50
    labels = torch.randint(0, num_classes, (r,), generator=gen)
    labels[:3] = 6  # a small class
    points = torch.randn(r, 4, generator=gen)
    selection = facility_location(points, budget, labels)

    assert selection.indices.shape == selection.weights.shape == selection.gains.shape == (budget,)
    assert selection.indices.dtype == torch.int64
    assert selection.indices.unique().numel() == budget
    assert float(selection.weights.sum()) == r
    assert bool((selection.weights >= 1).all())  # every pick covers at least itself
    expected = class_budgets(torch.bincount(labels, minlength=num_classes), budget)
    assert torch.equal(torch.bincount(labels[selection.indices], minlength=num_classes), expected)
    per_class_weight = torch.zeros(num_classes).index_add_(0, labels[selection.indices], selection.weights)
    assert torch.equal(per_class_weight, torch.bincount(labels, minlength=num_classes).float())
    assert bool((selection.gains[:-1] >= selection.gains[1:]).all())


@pytest.mark.parametrize("similarity", ["distance", "exp"])
def test_zero_gains_with_duplicates_match_exhaustive_greedy(similarity: str) -> None:
    """Once every point is covered all gains are zero: the picks must still be new, lowest index first."""
    points = _pool(4, seed=12).repeat(2, 1)  # every point twice
    sim = _similarity_matrix(points.numpy(), similarity)
    selection = facility_location(points, 7, similarity=similarity)  # type: ignore[arg-type]
    assert selection.indices.tolist() == _reference_greedy(sim, 7)
    # A class of a single point has a zero gain under "distance" (its diameter is zero).
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1])
    single = facility_location(points, 3, labels, similarity=similarity)  # type: ignore[arg-type]
    assert 7 in single.indices.tolist()
    assert single.indices.unique().numel() == 3


def test_padded_blocks_with_duplicates_and_spent_gains() -> None:
    """Classes above 25 points go through the expansion path, padded to a multiple of 8 points; one class has
    fewer distinct points than picks, so its late gains are zero and the padding must still never be picked."""
    gen = torch.Generator().manual_seed(21)
    repeated = torch.randn(10, 4, generator=gen, dtype=torch.float64).repeat(3, 1)  # 30 points, 10 distinct
    points = torch.cat([repeated, torch.randn(29, 4, generator=gen, dtype=torch.float64) + 4.0])
    labels = torch.tensor([0] * 30 + [1] * 29)
    selection = facility_location(points, 26, labels)
    assert selection.indices.unique().numel() == 26
    assert torch.equal(torch.bincount(labels[selection.indices]), torch.tensor([13, 13]))
    assert torch.equal(selection.weights, _ownership(points, labels, selection.indices))
    for cls in (0, 1):
        members = torch.nonzero(labels == cls).flatten()
        mine = labels[selection.indices] == cls
        position = {int(j): k for k, j in enumerate(members)}
        picks = [position[int(j)] for j in selection.indices[mine]]
        _assert_greedy_steps(
            _similarity_matrix(points[members].numpy()), picks, selection.gains[mine].numpy(), abs_tol=1e-6
        )
    # Class 0's last picks cover nothing new (up to the rounding of distances between duplicates).
    assert float(selection.gains[-3:].abs().max()) < 1e-6
    # In float32 (floored squared distances before the square root) the picks are still distinct, per class.
    single = facility_location(points.float(), 26, labels)
    assert single.indices.unique().numel() == 26
    assert torch.equal(torch.bincount(labels[single.indices]), torch.tensor([13, 13]))
    assert float(single.weights.sum()) == len(points)


def test_class_budgets_largest_remainder() -> None:
    # 128 picks over 600 points: quotas 21.33, 12.8 (x5), 10.67 (x4); floors 21, 12, 10 sum to 121, and the 7
    # leftovers go to the largest remainders: the five 0.8s, then two of the four tied 0.67s (lower index first).
    counts = [100, 60, 60, 60, 60, 60, 50, 50, 50, 50]
    expected = [21, 13, 13, 13, 13, 13, 11, 11, 10, 10]
    assert _largest_remainder(counts, 128) == expected
    assert class_budgets(torch.tensor(counts), 128).tolist() == expected
    # Batched rows are independent; ties go to the lower class index.
    assert class_budgets(torch.tensor([[3, 3], [1, 5]]), 3).tolist() == [[2, 1], [1, 2]]
    # A class that rounds to zero picks still gets one, taken from the largest class.
    assert class_budgets(torch.tensor([97, 2, 1]), 3).tolist() == [1, 1, 1]
    # A class never receives more picks than members, even with every point picked.
    assert class_budgets(torch.tensor([1, 5, 9]), 15).tolist() == [1, 5, 9]


def test_class_budgets_refuse_negative_counts_and_empty_pools() -> None:
    with pytest.raises(ValueError, match=r"`counts` must be non-negative class sizes, got \[5, -1\]"):
        class_budgets(torch.tensor([5, -1]), 2)
    with pytest.raises(ValueError, match="`budget`=0 must be at least 1"):
        class_budgets(torch.tensor([0, 0]), 0)


def test_class_budgets_refuse_counts_and_budgets_of_other_types() -> None:
    with pytest.raises(
        TypeError, match=r"`counts` must be an integer tensor of class sizes, got dtype torch\.float32"
    ):
        class_budgets(torch.tensor([2.7, 3.9]), 3)  # they were truncated to [2, 3]
    with pytest.raises(TypeError, match="`counts` must be an integer tensor of class sizes, got list"):
        class_budgets([3, 4], 3)  # type: ignore[arg-type]
    for bad in (2.5, math.nan, True):
        with pytest.raises(TypeError, match=f"`budget` must be an int, got {bad!r}"):
            class_budgets(torch.tensor([3, 4]), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"similarity": "cosine"},
            ValueError,
            "`similarity` must be one of",
        ),  # it computed the exp objective
        (
            {"indices": torch.tensor([0, -1])},
            ValueError,
            r"positions in \[0, 20\), got \[0, -1\]",
        ),  # it wrapped
        ({"indices": torch.tensor([0, 20])}, ValueError, r"positions in \[0, 20\)"),
        ({"indices": torch.tensor([3, 3])}, ValueError, "distinct picks"),
        ({"indices": torch.tensor([0.0, 1.0])}, TypeError, "`indices` must be an integer tensor"),
        (
            {"labels": torch.zeros(5, dtype=torch.long)},
            ValueError,
            "`labels` must have shape",
        ),  # 5 points counted
        ({"features": torch.full((20, 3), math.nan)}, ValueError, "NaN"),  # it returned nan
        ({"features": torch.randn(2, 20, 3)}, ValueError, "one pool of shape"),
    ],
)
def test_the_objective_refuses_bad_input(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"features": _pool(20), "indices": torch.tensor([0, 5]), **kwargs}
    with pytest.raises(error, match=match):
        facility_location_objective(**args)  # type: ignore[arg-type]


def test_sparse_class_ids_give_the_same_selection_as_compact_ones() -> None:
    # Dataset-wide class ids (here up to 10**9) must not size the per-class tables: the selection depends only on
    # the ids' order, so it equals the one with ids 0, 1, 2.
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(2, 60, 4, generator=gen)
    compact = torch.randint(0, 3, (2, 60), generator=gen)
    sparse = torch.tensor([7, 100_000, 10**9])[compact]
    for knn in (None, 8):
        expected = facility_location(features, 12, compact, knn=knn)
        got = facility_location(features, 12, sparse, knn=knn)
        assert torch.equal(got.indices, expected.indices)
        assert torch.equal(got.weights, expected.weights)


def test_class_budgets_match_plain_python_largest_remainder() -> None:
    rng = random.Random(0)
    starved = tied = 0
    for _ in range(200):
        counts = [rng.choice((0, 1, 2, 3, rng.randint(1, 40))) for _ in range(rng.randint(1, 6))]
        counts[rng.randrange(len(counts))] += 1  # at least one class present
        present = sum(n > 0 for n in counts)
        budget = rng.randint(present, sum(counts))
        got = class_budgets(torch.tensor(counts), budget).tolist()
        assert got == _largest_remainder(counts, budget)
        assert sum(got) == budget
        assert all((n > 0) <= b <= n for b, n in zip(got, counts, strict=True))
        starved += any(n > 0 and budget * n < sum(counts) for n in counts)
        remainders = [budget * n % sum(counts) for n in counts if budget * n % sum(counts)]
        tied += len(set(remainders)) < len(remainders)
    assert starved >= 20  # the zero-pick rule and remainder ties are exercised, not just the plain rounding
    assert tied >= 20
    # A batch of pools gives each row its own split.
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 10, (50, 4), generator=gen)
    batch[:, 0] += 7
    for budget in range(4, 8):
        expected = [_largest_remainder(row, budget) for row in batch.tolist()]
        assert class_budgets(batch, budget).tolist() == expected


@pytest.mark.parametrize(
    ("counts", "budget"),
    [([5, 1, 1], 2), ([5, 0, 1], 0), ([2, 1], 4), ([[3, 3], [1, 0]], 2), ([[3, 3], [1, 1]], 1)],
)
def test_class_budgets_outside_classes_present_and_pool_size(counts: list[int], budget: int) -> None:
    with pytest.raises(ValueError, match="between the number of classes present and the pool size"):
        class_budgets(torch.tensor(counts), budget)


def test_batched_pools_equal_separate_calls() -> None:
    gen = torch.Generator().manual_seed(7)
    pools = torch.randn(5, 120, 6, generator=gen)
    labels = torch.randint(0, 4, (5, 120), generator=gen)
    batched = facility_location(pools, 24, labels)
    assert batched.indices.shape == (5, 24)
    for p in range(5):
        single = facility_location(pools[p], 24, labels[p])
        assert torch.equal(batched.indices[p], single.indices)
        assert torch.equal(batched.weights[p], single.weights)
        # Distances come from the matmul form of cdist, whose float32 rounding (~1e-5 on small distances)
        # depends on how the blocks are laid out; sums of a few dozen of them agree to about 1e-4.
        assert torch.allclose(batched.gains[p], single.gains, rtol=1e-3)


# --- apricot-select as an independent oracle ---------------------------------------------------------------


@pytest.fixture(scope="module")
def apricot_selection() -> type:
    """apricot's FacilityLocationSelection with its numba kernels compiled once, not on every fit."""
    facility = pytest.importorskip("apricot.functions.facilityLocation")
    for name in ("calculate_gains", "calculate_gains_sparse", "calculate_gains_sieve"):
        kernel = getattr(facility, name)
        if not hasattr(kernel, "cache_info"):
            setattr(facility, name, functools.cache(kernel))
    return facility.FacilityLocationSelection  # type: ignore[no-any-return]


@pytest.mark.parametrize("optimizer", ["naive", "lazy"])
@pytest.mark.parametrize("clusters", [0, 6])
def test_matches_apricot(apricot_selection: type, optimizer: str, clusters: int) -> None:
    points = _pool(200, d=5, seed=11, clusters=clusters)
    sim = _similarity_matrix(points.numpy())
    budget = 25
    apricot = apricot_selection(budget, metric="precomputed", optimizer=optimizer).fit(sim)
    ours = facility_location(points, budget)
    assert _objective(sim, ours.indices.tolist()) == pytest.approx(_objective(sim, apricot.ranking), rel=1e-4)
    # Gains match pick by pick (apricot's gains are relative to an empty set, like ours).
    assert ours.gains.double().numpy() == pytest.approx(apricot.gains, rel=1e-4)


def test_greedy_on_precomputed_similarity_matches_apricot(apricot_selection: type) -> None:
    gen = torch.Generator().manual_seed(3)
    raw = torch.rand(80, 80, generator=gen, dtype=torch.float64)
    sim = (raw + raw.T) / 2
    apricot = apricot_selection(10, metric="precomputed", optimizer="naive").fit(sim.numpy())
    picks, gains = _dense_greedy(sim[None], torch.ones(1, 80, dtype=torch.bool), torch.tensor([10]))
    assert picks[0].tolist() == apricot.ranking.tolist()
    assert gains[0].numpy() == pytest.approx(apricot.gains, rel=1e-9)


# --- kNN similarity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("similarity", ["distance", "exp"])
def test_knn_equal_to_pool_size_matches_dense(backend: str, similarity: str) -> None:
    if backend == "faiss":
        pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(8)
    points = torch.randn(150, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (150,), generator=gen)
    dense = facility_location(points, 20, labels, similarity=similarity)  # type: ignore[arg-type]
    # k >= every class size: the exact full-graph branch (k below the class size is tested below).
    sparse = facility_location(points, 20, labels, similarity=similarity, knn=150, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(sparse.indices, dense.indices)
    assert torch.equal(sparse.weights, dense.weights)
    assert torch.allclose(sparse.gains, dense.gains, rtol=1e-4)


def test_knn_greedy_matches_reference_on_sparse_similarity() -> None:
    """The incremental sparse greedy equals a naive greedy on the same (zero-filled) kNN similarity."""
    gen = torch.Generator().manual_seed(9)
    points = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    k = 6
    selection = facility_location(points, 8, knn=k, backend="torch")
    dist = torch.cdist(points, points)
    nearest = dist.argsort(dim=1)[:, :k]
    bound = 2 * (points - points.mean(0)).norm(dim=1).max()
    sim = torch.zeros(60, 60, dtype=torch.float64)
    rows = torch.arange(60).unsqueeze(1)
    sim[rows, nearest] = bound - dist[rows, nearest]  # row i: the candidates that can cover i
    assert selection.indices.tolist() == _reference_greedy(sim.numpy(), 8)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("similarity", ["distance", "exp"])
def test_knn_below_class_size_matches_per_class_reference(backend: str, similarity: str) -> None:
    if backend == "faiss":
        pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(13)
    pools = torch.randn(3, 60, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (3, 60), generator=gen)
    k, budget = 5, 9
    counts = torch.stack([torch.bincount(row, minlength=3) for row in labels])
    assert int(counts.min()) > k  # every class takes the kNN-graph branch, not the full graph
    batched = facility_location(pools, budget, labels, similarity=similarity, knn=k, backend=backend)  # type: ignore[arg-type]
    for p in range(3):
        single = facility_location(pools[p], budget, labels[p], similarity=similarity, knn=k, backend=backend)  # type: ignore[arg-type]
        assert torch.equal(batched.indices[p], single.indices)
        assert torch.equal(batched.weights[p], single.weights)
        assert torch.equal(batched.gains[p], single.gains)
        assert torch.equal(single.weights, _ownership(pools[p], labels[p], single.indices))
        budgets = class_budgets(counts[p], budget)
        for cls in range(3):
            members = torch.nonzero(labels[p] == cls).flatten()
            sim = _knn_similarity(pools[p][members], k, similarity)
            in_class = labels[p][single.indices] == cls
            picks = torch.searchsorted(members, single.indices[in_class]).tolist()
            assert len(picks) == int(budgets[cls])
            _assert_greedy_steps(sim, picks, single.gains[in_class].double().numpy())


def test_knn_quality_close_to_dense() -> None:
    gen = torch.Generator().manual_seed(10)
    points = torch.randn(1500, 6, generator=gen)
    dense = facility_location(points, 150)
    sparse = facility_location(points, 150, knn=32, backend="torch")

    def medoid_cost(indices: torch.Tensor) -> float:
        return float(torch.cdist(points, points[indices]).min(dim=1).values.sum())

    assert medoid_cost(sparse.indices) <= 1.05 * medoid_cost(dense.indices)
    assert float(sparse.weights.sum()) == 1500


def test_knn_merges_a_blob_of_near_duplicates() -> None:
    # 600 points within 1e-5 of each other and 400 spread ones: dense greedy spends one or two picks on the blob.
    # On a plain kNN graph a pick covers only the 8 points listing it, so covering the blob would take ~75 picks;
    # merged into one weighted point it takes one, and the other picks cover the spread points.
    gen = torch.Generator().manual_seed(11)
    blob = 1e-5 * torch.randn(600, 4, generator=gen)
    spread = torch.randn(400, 4, generator=gen) + 3.0
    points = torch.cat([blob, spread])
    dense = facility_location(points, 40)
    sparse = facility_location(points, 40, knn=8, backend="torch")
    assert int((sparse.indices < 600).sum()) <= int((dense.indices < 600).sum()) + 1
    blob_weight = float(sparse.weights[sparse.indices < 600].sum())
    assert blob_weight == 600  # every blob point is owned by a blob pick, and every weight is a real count
    assert float(sparse.weights.sum()) == 1000
    assert len(set(sparse.indices.tolist())) == 40

    def medoid_cost(indices: torch.Tensor) -> float:
        return float(torch.cdist(points, points[indices]).min(dim=1).values.sum())

    assert medoid_cost(sparse.indices) <= 1.05 * medoid_cost(dense.indices)


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"features": torch.ones(5, 2, dtype=torch.long)}, TypeError, "floating-point"),
        ({"features": torch.ones(5)}, ValueError, r"shape \(r, d\)"),
        ({"features": torch.ones(0, 10, 2)}, ValueError, r"P, r, d >= 1"),
        ({"budget": 0}, ValueError, r"\[1, r\]"),
        ({"budget": 11}, ValueError, r"\[1, r\]"),
        ({"budget": 2.0}, TypeError, "`budget` must be an int"),
        ({"features": torch.full((10, 2), float("nan"))}, ValueError, "NaN or inf"),
        ({"features": torch.randn(10, 2).index_fill_(0, torch.tensor([7]), float("nan"))}, ValueError, "NaN"),
        ({"features": torch.randn(10, 2).index_fill_(0, torch.tensor([2]), float("inf"))}, ValueError, "NaN"),
        (
            {"features": torch.randn(10, 2).index_fill_(0, torch.tensor([9]), -float("inf"))},
            ValueError,
            "NaN",
        ),
        (
            {"features": torch.randn(10, 4) * 1e19},
            ValueError,
            r"`features` values up to .* in 4 dimensions would overflow the squared distances "
            r"\(max \|f\| \* sqrt\(d\) must stay below 4.61e\+18\); scale the features down",
        ),
        (
            {"features": torch.randn(10, 4) * 1e19, "knn": 3},
            ValueError,
            "would overflow the squared distances",
        ),
        (  # the kNN search works in float32 whatever the input's dtype
            {"features": torch.randn(10, 4, dtype=torch.float64) * 1e19, "knn": 3},
            ValueError,
            r"must stay below 4.61e\+18",
        ),
        ({"labels": torch.tensor([0, 1, 2, -1, 0, 1, 2, 0, 1, 2])}, ValueError, "minimum of -1"),
        ({"labels": torch.zeros(9, dtype=torch.long)}, ValueError, "`labels` must have shape"),
        ({"labels": torch.zeros(10)}, TypeError, "integer"),
        ({"labels": torch.arange(10) % 5, "budget": 4}, ValueError, "5 classes present"),
        ({"similarity": "cosine"}, ValueError, r"`similarity` must be one of .*, got 'cosine'"),
        ({"knn": 0}, ValueError, r"`knn` must be None \(dense\) or a positive int, got 0"),
        ({"backend": "annoy"}, ValueError, r"`backend` must be one of .*, got 'annoy'"),
    ],
)
def test_bad_input(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    args: dict[str, object] = {"features": torch.randn(10, 2), "budget": 3, **kwargs}
    with pytest.raises(error, match=match):
        facility_location(**args)  # type: ignore[arg-type]


def test_numpy_integer_budget() -> None:
    features = torch.randn(30, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        facility_location(features, np.int64(6)).indices, facility_location(features, 6).indices
    )


def test_large_float64_features_keep_their_range() -> None:
    # 1e19 overflows float32 squared distances (refused above) but not float64 ones.
    features = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    big, small = facility_location(features * 1e19, 8), facility_location(features, 8)
    assert torch.equal(big.indices, small.indices)
    assert torch.equal(big.weights, small.weights)
    assert bool(torch.isfinite(big.gains).all())


@pytest.mark.parametrize(
    "size", [20, 60]
)  # block distances from the differences (<= 25 points), and expanded
def test_features_that_require_grad(size: int) -> None:
    features = torch.randn(size, 3, generator=torch.Generator().manual_seed(1))
    plain = facility_location(features, 5)
    tracked = facility_location(features.clone().requires_grad_(True), 5)
    assert torch.equal(tracked.indices, plain.indices)
    assert not tracked.gains.requires_grad
    # The reused buffers stay out of any graph: a later plain call still works and agrees.
    assert torch.equal(facility_location(features, 5).gains, plain.gains)


@pytest.mark.parametrize("knn_size", [None, 3])
def test_faiss_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch, knn_size: int | None) -> None:
    from lightning_crest.selection import knn

    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    # Raised while validating, so also for the dense path that would never search.
    with pytest.raises(ImportError, match=r"lightning-crest\[faiss\]"):
        facility_location(torch.randn(10, 2), 3, knn=knn_size, backend="faiss")


def test_dense_too_large_asks_for_knn(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_crest.selection import _facility_location as module

    monkeypatch.setattr(module, "MAX_DENSE_BYTES", 1000)
    with pytest.raises(ValueError, match="pass `knn`"):
        facility_location(torch.randn(100, 2), 3)


@pytest.mark.parametrize("knn", [None, 4])
def test_duplicate_picks_each_own_themselves(knn: int | None) -> None:
    # Identical proxies (a saturated softmax) tie for each other; every pick still represents at least itself.
    points = torch.cat(
        [torch.zeros(6, 2), torch.randn(10, 2, generator=torch.Generator().manual_seed(0)) + 5]
    )
    selection = facility_location(points, 12, knn=knn, backend="torch")
    # At least two picks are copies of the origin, so the ownership ties between them are exercised.
    assert int((points[selection.indices] == 0).all(dim=1).sum()) >= 2
    labels = torch.zeros(16, dtype=torch.long)
    assert torch.equal(selection.weights, _ownership(points, labels, selection.indices))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_unpicked_copies_belong_to_the_earliest_of_equal_picks_on_every_path(backend: str) -> None:
    # 20 identical proxies and 8 picks in their class: the 16 unpicked copies are equally near every pick of a copy.
    # The earliest pick takes them on the dense path, and so must it on the kNN path with either backend, or the
    # weights would depend on the backend.
    if backend == "faiss":
        pytest.importorskip("faiss")
    other = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)) + 5
    points, labels = torch.cat([torch.zeros(20, 3), other]), torch.arange(2).repeat_interleave(20)
    dense = facility_location(points, 8, labels)
    sparse = facility_location(points, 8, labels, knn=4, backend=backend)
    assert torch.equal(sparse.weights, _ownership(points, labels, sparse.indices))
    copies = labels[sparse.indices] == 0
    assert (
        sparse.weights[copies].tolist() == dense.weights[labels[dense.indices] == 0].tolist() == [17, 1, 1, 1]
    )


@pytest.mark.parametrize("knn", [None, 4])
def test_gains_keep_float64(knn: int | None) -> None:
    points = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    selection = facility_location(points, 8, knn=knn, backend="torch")
    assert selection.gains.dtype == torch.float64
    assert facility_location(points.float(), 8, knn=knn, backend="torch").gains.dtype == torch.float32
    if knn is None:  # the dense path computes in float64: gains beyond float32's range stay finite
        huge = facility_location(points * 1e38, 8)
        assert bool(torch.isfinite(huge.gains).all())
        assert huge.gains.sum().item() == pytest.approx(
            facility_location_objective(points * 1e38, huge.indices)
        )


def test_many_uneven_blocks_are_solved_in_size_groups() -> None:
    from lightning_crest.selection._facility_location import _size_groups

    gen = torch.Generator().manual_seed(12)
    labels = torch.randint(0, 10, (10, 600), generator=gen)
    labels[0, :150] = 0  # one large class makes the sizes uneven
    pools = torch.randn(10, 600, 10, generator=gen)
    sizes = sorted(torch.stack([torch.bincount(row, minlength=10) for row in labels]).flatten().tolist())
    assert len(_size_groups(sizes, np.arange(len(sizes)))) > 1  # this case takes the grouped path
    batched = facility_location(pools, 128, labels)
    for p in range(10):
        single = facility_location(pools[p], 128, labels[p])  # ten blocks: one group
        assert torch.equal(batched.indices[p], single.indices)
        assert torch.equal(batched.weights[p], single.weights)


def test_results_do_not_share_memory_with_later_calls() -> None:
    """The dense path reuses host buffers between calls; nothing it returns may point into them."""
    gen = torch.Generator().manual_seed(13)
    first_pools, second_pools = torch.randn(2, 4, 90, 6, generator=gen)
    labels = torch.randint(0, 3, (4, 90), generator=gen)
    first = facility_location(first_pools, 20, labels)
    kept = [field.clone() for field in (first.indices, first.weights, first.gains)]
    facility_location(second_pools, 20, labels)
    facility_location(second_pools[0] * 3, 40)
    assert all(torch.equal(a, b) for a, b in zip(kept, (first.indices, first.weights, first.gains)))


def test_concurrent_calls_from_threads_match_sequential_ones() -> None:
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(14)
    pools = torch.randn(8, 3, 150, 8, generator=gen)
    labels = torch.randint(0, 5, (8, 3, 150), generator=gen)
    expected = [facility_location(pools[k], 30, labels[k]) for k in range(8)]
    with ThreadPoolExecutor(max_workers=4) as executor:
        results = list(executor.map(lambda k: facility_location(pools[k], 30, labels[k]), range(8)))
    for want, got in zip(expected, results, strict=True):
        assert torch.equal(want.indices, got.indices)
        assert torch.equal(want.weights, got.weights)


@pytest.mark.parametrize("size", [20, 40])  # both sides of the switch from differences to the expansion
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_pairwise_distances_match_float64_reference(size: int, offset: float) -> None:
    from lightning_crest.selection._facility_location import _pairwise_distances

    gen = torch.Generator().manual_seed(15)
    scales = torch.logspace(-3, 0, 7).view(7, 1, 1)
    points = torch.randn(7, size, 10, generator=gen) * scales + offset * scales
    points[:, 1] = points[:, 0]  # an exact duplicate of the first point
    points[:, 3] = points[:, 2]  # and of another one
    points[:, 5] = points[:, 4] + 1e-4 * scales[:, 0]  # a near pair
    exact = torch.cdist(points.double(), points.double(), compute_mode="donot_use_mm_for_euclid_dist")
    raw = _pairwise_distances(points)
    assert raw.dtype == torch.float32
    got = raw.double()
    scale = exact.amax(dim=(1, 2), keepdim=True)
    if size <= 25:  # from the differences: within float32 rounding of the scale
        assert float(((got - exact) / scale).abs().max()) < 1e-6
    else:
        # The expansion loses eps * scale^2 in the squared distance, so a distance d is off by up to about
        # eps * scale^2 / d: 1e-7 of the scale at d ~ scale, sqrt(eps) = 3.5e-4 of it for (near-)duplicates. Centred
        # on the block's first point it does not grow with the offset (torch.cdist: 3e-2 of the scale at 100).
        eps = torch.finfo(torch.float32).eps
        bound = eps * scale**2 / torch.maximum(exact, eps**0.5 * scale)
        assert float(((got - exact).abs() / bound).max()) < 4
        assert float(((got - exact) / scale).abs().max()) < 1e-3
    assert not bool(got.diagonal(dim1=1, dim2=2).any())  # a point is at distance exactly 0 from itself


def test_buffers_made_under_inference_mode_serve_later_calls() -> None:
    import threading

    gen = torch.Generator().manual_seed(16)
    pools = torch.randn(2, 3, 60, 5, generator=gen)
    labels = torch.randint(0, 3, (3, 60), generator=gen)
    expected = [facility_location(pool, 12, labels) for pool in pools]
    results: list[object] = []

    def fresh_thread() -> None:  # a thread of its own: its buffers are created here, in inference mode
        try:
            with torch.inference_mode():
                first = facility_location(pools[0], 12, labels)
            results.extend([first, facility_location(pools[1] * 1.0, 12, labels)])
        except RuntimeError as error:
            results.append(error)

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert len(results) == 2, results
    for want, got in zip(expected, results, strict=True):
        assert torch.equal(want.indices, got.indices)  # type: ignore[attr-defined]
