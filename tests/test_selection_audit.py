"""Audit tests for the selection engine: behaviours that the main suites leave unchecked (found by mutation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_crest.selection import facility_location

# --- input validation -----------------------------------------------------------------------------------------


def test_overflow_bound_grows_with_the_square_root_of_the_dimension() -> None:
    # The documented limit is max |f| * sqrt(d) <= sqrt(float32 max) / 4 = 4.61e18: 1e18 is fine in 4
    # dimensions (2e18) but not in 100 (1e19), where squared distances would overflow.
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="in 100 dimensions would overflow the squared distances"):
        facility_location(1e18 * torch.rand(10, 100, generator=gen).add_(0.5).clamp_(max=1.0), 3)
    accepted = facility_location(2e18 * torch.rand(10, 4, generator=gen).add_(0.5).clamp_(max=1.0), 3)
    assert accepted.indices.unique().numel() == 3


@pytest.mark.parametrize(
    ("features_shape", "labels_shape"),
    [((2, 10, 3), (10,)), ((2, 10, 3), (1, 10)), ((10, 3), (2, 10)), ((10, 3), (1, 10))],
)
def test_labels_must_match_every_leading_dimension(
    features_shape: tuple[int, ...], labels_shape: tuple[int, ...]
) -> None:
    features = torch.randn(*features_shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="`labels` must have shape"):
        facility_location(features, 3, torch.zeros(labels_shape, dtype=torch.long))


@pytest.mark.parametrize("knn", [True, False])
def test_knn_rejects_booleans(knn: bool) -> None:
    with pytest.raises(ValueError, match=r"`knn` must be None \(dense\) or a positive int"):
        facility_location(torch.randn(10, 2), 3, knn=knn)


# --- kNN path: merging of near-duplicates ------------------------------------------------------------------------


def test_knn_merges_every_point_of_a_grid_cell_into_one_pick() -> None:
    # The grid has side 1e-3 of the bound 2 max ||f - mean||. A blob within [0.05, 0.45] of a side in every
    # coordinate lies in one cell (whether the cells are centred on the multiples of the side or start at them), so
    # it is one weighted point and takes one pick, however finely a kNN graph of its points would split it.
    gen = torch.Generator().manual_seed(3)
    spread = torch.randn(400, 4, generator=gen) + 3.0
    unit = torch.rand(600, 4, generator=gen) * 2 - 1  # in [-1, 1]

    def side(points: torch.Tensor) -> float:
        return 1e-3 * 2 * float((points - points.mean(0)).norm(dim=1).amax())

    blob = side(torch.cat([torch.zeros(600, 4), spread])) * (0.25 + 0.2 * unit)
    points = torch.cat([blob, spread])
    scaled = blob / side(points)
    # The precondition: one cell for the whole blob.
    assert float(scaled.min()) > 0.0
    assert float(scaled.max()) < 0.5
    selection = facility_location(points, 40, knn=8, backend="torch")
    assert int((selection.indices < 600).sum()) == 1
    assert float(selection.weights[selection.indices < 600].sum()) == 600
    assert float(selection.weights.sum()) == 1000
    assert selection.indices.unique().numel() == 40


def test_knn_budget_above_the_number_of_occupied_cells_keeps_distinct_picks() -> None:
    # 5 distinct points repeated 6 times: merging would leave 5 candidates for 10 picks, so nothing is merged and
    # the greedy runs on the plain kNN graph, where duplicates are distinct candidates.
    gen = torch.Generator().manual_seed(4)
    points = torch.randn(5, 3, generator=gen).repeat(6, 1)
    selection = facility_location(points, 10, knn=4, backend="torch")
    assert selection.indices.unique().numel() == 10
    assert bool(torch.isfinite(selection.gains).all())
    assert float(selection.weights.sum()) == 30
    assert bool((selection.weights >= 1).all())


# --- dense path: merging the classes' pick sequences ------------------------------------------------------------


def _brute_force_weights(points: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A pick owns itself; any other point goes to its nearest pick of its class, the earlier one on a tie."""
    dist = torch.cdist(points.double(), points[indices].double())
    picks = indices.tolist()
    weights = torch.zeros(len(picks))
    for i in range(len(points)):
        if i in picks:
            weights[picks.index(i)] += 1
            continue
        same = [t for t, j in enumerate(picks) if labels[j] == labels[i]]
        weights[min(same, key=lambda t: (float(dist[i, t]), t))] += 1
    return weights


def test_tied_gains_keep_each_class_in_its_own_greedy_order() -> None:
    # 10 classes of 4 distinct points repeated 5 times, 12 picks each: after 4 picks every class's gains are exactly
    # zero, so 80 picks tie. Merging the classes must still keep each class's own pick order (the one a call on that
    # class alone returns), and the weights must follow it: an unpicked copy belongs to its earliest picked copy.
    gen = torch.Generator().manual_seed(5)
    classes = [torch.randn(4, 3, generator=gen, dtype=torch.float64).repeat(5, 1) + 10 * c for c in range(10)]
    points = torch.cat(classes)
    labels = torch.arange(10).repeat_interleave(20)
    selection = facility_location(points, 120, labels)
    assert bool((selection.gains[1:] <= selection.gains[:-1]).all())
    assert torch.equal(selection.weights, _brute_force_weights(points, labels, selection.indices))
    for c, members in enumerate(classes):
        alone = facility_location(members, 12)
        mine = selection.indices[labels[selection.indices] == c] - 20 * c
        assert torch.equal(mine, alone.indices)
        assert torch.equal(selection.weights[labels[selection.indices] == c], alone.weights)


@pytest.mark.parametrize("similarity", ["distance", "exp"])
def test_knn_equal_to_the_class_size_is_the_exact_dense_objective(similarity: str) -> None:
    # With k equal to a class's size the graph holds every pair, so the exact diameter is used, as on the dense
    # path: the gains (not only the picks) equal the dense ones. Class sizes 30 and 30 with knn=30.
    gen = torch.Generator().manual_seed(6)
    points = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    labels = torch.arange(2).repeat_interleave(30)
    dense = facility_location(points, 12, labels, similarity=similarity)
    sparse = facility_location(points, 12, labels, similarity=similarity, knn=30, backend="torch")
    assert torch.equal(sparse.indices, dense.indices)
    assert torch.equal(sparse.weights, dense.weights)
    torch.testing.assert_close(sparse.gains, dense.gains, rtol=1e-4, atol=0)


@pytest.mark.parametrize("similarity", ["distance", "exp"])
def test_knn_gains_are_those_of_the_merged_objective(similarity: str) -> None:
    # 14 distinct points repeated 1 to 5 times: each set of copies is one cell, merged into a point weighted by its
    # number of copies. The merged objective is F(S) = sum_c m_c max_{j in S, j among c's k nearest} s_cj over the
    # cells c, with m_c the copies of c and the kNN graph built on the distinct points; every pick must have the
    # largest marginal gain of F given the earlier ones, and report that gain.
    gen = torch.Generator().manual_seed(7)
    distinct = torch.randn(14, 3, generator=gen, dtype=torch.float64)
    copies = torch.tensor([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4])
    points = distinct.repeat_interleave(copies, dim=0)
    k, budget = 4, 6
    selection = facility_location(points, budget, similarity=similarity, knn=k, backend="torch")

    dist = torch.cdist(distinct, distinct)
    nearest = dist.argsort(dim=1)[:, :k]
    if similarity == "distance":
        values = 2 * (points - points.mean(0)).norm(dim=1).max() - dist
    else:
        values = torch.exp(-dist / points.shape[1])
    sim = torch.zeros(14, 14, dtype=torch.float64)  # sim[c, j]: how well candidate j covers cell c
    rows = torch.arange(14).unsqueeze(1)
    sim[rows, nearest] = values[rows, nearest]

    def objective(picks: list[int]) -> float:
        if not picks:
            return 0.0
        return float((copies.double() * sim[:, picks].amax(dim=1)).sum())

    cell_of = torch.arange(14).repeat_interleave(copies)
    picks = cell_of[selection.indices].tolist()
    assert len(set(picks)) == budget
    for t, pick in enumerate(picks):
        before = objective(picks[:t])
        increments = [objective([*picks[:t], j]) - before for j in range(14)]
        assert increments[pick] >= max(increments) * (1 - 1e-6)
        assert float(selection.gains[t]) == pytest.approx(increments[pick], rel=1e-4)
    # Whatever was merged, the weights count the original points.
    assert float(selection.weights.sum()) == len(points)


@pytest.mark.parametrize("similarity", ["distance", "exp"])
def test_knn_on_a_class_of_identical_points(similarity: str) -> None:
    # A class whose points all coincide has a zero diameter bound, so its grid is degenerate and nothing is merged:
    # it gets its share of distinct picks like any other class, and every point is owned by one of them.
    gen = torch.Generator().manual_seed(8)
    same = torch.full((20, 3), 0.5, dtype=torch.float64)
    other = torch.randn(20, 3, generator=gen, dtype=torch.float64) + 5.0
    points, labels = torch.cat([same, other]), torch.arange(2).repeat_interleave(20)
    selection = facility_location(points, 6, labels, similarity=similarity, knn=4, backend="torch")
    assert selection.indices.unique().numel() == 6
    assert torch.equal(torch.bincount(labels[selection.indices]), torch.tensor([3, 3]))
    assert bool(torch.isfinite(selection.gains).all())
    assert torch.equal(selection.weights[labels[selection.indices] == 0].sum(), torch.tensor(20.0))
    assert float(selection.weights.sum()) == 40


def test_knn_accepts_numpy_integers_as_budget_does() -> None:
    features = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    plain = facility_location(features, 5, knn=8, backend="torch")
    numpy_int = facility_location(features, np.int64(5), knn=np.int64(8), backend="torch")
    assert torch.equal(plain.indices, numpy_int.indices)
    torch.testing.assert_close(plain.gains, numpy_int.gains)
