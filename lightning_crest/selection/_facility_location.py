"""Weighted facility location: the greedy that picks CREST's mini-batch coresets.

The objective of a set ``S`` of picks from a pool ``V`` is ``F(S) = sum_{i in V} max_{j in S} s_ij``, where the
similarity ``s_ij`` decreases with ``||f_i - f_j||`` and is zero between points of different classes. ``F`` is
monotone submodular, so the greedy that adds the pick of largest marginal gain is within ``1 - 1/e`` of the optimum.
Each pick's weight is the size of its cluster: the number of pool points whose most similar pick it is.

Two exact greedy implementations share the bookkeeping:

* dense: one ``(n, n)`` similarity block per (pool, class), all blocks of all pools advanced together, one pick
  per block and step. Marginal gains are recomputed in full at every step (naive greedy), which on small blocks
  is cheaper than a lazy priority queue because it is a handful of batched tensor operations.
* sparse (``knn=k``): each point is covered only by its ``k`` nearest neighbours; the greedy keeps every
  candidate's gain up to date incrementally, touching only the points that the last pick covers better.
"""

from __future__ import annotations

import itertools
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_crest._checks import check_integer_tensor
from lightning_crest.selection.knn import KnnBackend, get_backend, knn_graph

Similarity = Literal["distance", "exp"]
Backend = Literal["auto", "torch", "faiss"]

SIMILARITIES: tuple[str, ...] = ("distance", "exp")
BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")

# The dense path holds two (n, n) blocks per (pool, class); above this it asks for `knn` instead of swapping.
MAX_DENSE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Selection:
    """Result of :func:`facility_location`.

    Attributes:
        indices: ``(budget,)`` or ``(P, budget)`` int64 positions into the pool, in pick order.
        weights: Same shape, float: cluster sizes. They sum to the pool size ``r`` for every pool (to the size of
            the classes picked from, with ``budgets``).
        gains: Same shape, float64 for float64 features and float32 otherwise: the marginal gain of each pick
            when it was made.
    """

    indices: Tensor
    weights: Tensor
    gains: Tensor


def class_budgets(counts: Tensor, budget: int) -> Tensor:
    """Split ``budget`` picks across classes in proportion to their sizes.

    Largest-remainder rounding, computed in integers so that ties are exact: every class gets
    ``floor(budget * n_c / r)`` and the remaining picks go to the largest remainders (lower class index first on a
    tie: on pools whose classes are all the same size, the same classes get the extra picks every time, and their
    weights, the cluster sizes, are smaller in proportion, so that every class keeps its share of the total weight).
    A class present in the pool that rounds to zero picks takes one from the class with the most picks (the lower
    class index on a tie), so every pool point has a pick of its own class to be assigned to. A class never gets
    more picks than members: its proportional share is at most its size because ``budget <= r``.

    Args:
        counts: ``(..., C)`` non-negative integer class sizes.
        budget: Total number of picks, at least the number of non-empty classes and at most ``counts.sum(-1)``.

    Returns:
        ``(..., C)`` int64 budgets summing to ``budget`` along the last dimension.

    Raises:
        TypeError: If ``counts`` is not an integer tensor or ``budget`` not an int.
        ValueError: If ``counts`` has a negative size, or ``budget`` is outside the range above.
    """
    check_integer_tensor("counts", counts, "class sizes")
    budget = _check_budget_type(budget)
    return torch.from_numpy(_class_budgets(counts.detach().cpu().long().numpy(), budget)).to(counts.device)


def _class_budgets(counts: np.ndarray[Any, Any], budget: int) -> np.ndarray[Any, Any]:
    """:func:`class_budgets` on an int64 array (the bookkeeping is a few small integer vectors: numpy is cheaper)."""
    if bool((counts < 0).any()):
        raise ValueError(f"`counts` must be non-negative class sizes, got {counts.tolist()}.")
    total = counts.sum(-1, keepdims=True)
    present = (counts > 0).sum(-1)
    if bool((total < budget).any()) or bool((present > budget).any()) or budget < 1:
        raise ValueError(
            f"`budget`={budget} must be at least 1 and lie between the number of classes present and the pool size; "
            f"got pools of sizes {total.ravel().tolist()} with {present.ravel().tolist()} classes."
        )
    base = budget * counts // total
    remainder = budget * counts % total
    leftover = budget - base.sum(-1, keepdims=True)
    # Rank classes by remainder (a stable sort of the negated remainders keeps lower class indices first on ties).
    order = np.argsort(-remainder, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1)  # the inverse permutation: each class's place in that order
    budgets: np.ndarray[Any, Any] = base + (rank < leftover)
    starved = (counts > 0) & (budgets == 0)
    if bool(starved.any()):
        flat, flat_counts = budgets.reshape(-1, counts.shape[-1]), counts.reshape(-1, counts.shape[-1])
        for row in np.flatnonzero(starved.reshape(-1, counts.shape[-1]).any(-1)).tolist():
            for cls in np.flatnonzero((flat_counts[row] > 0) & (flat[row] == 0)).tolist():
                flat[row, int(flat[row].argmax())] -= 1
                flat[row, cls] = 1
    return budgets


def facility_location(
    features: Tensor,
    budget: int,
    labels: Tensor | None = None,
    similarity: Similarity = "distance",
    knn: int | None = None,
    backend: Backend = "auto",
    budgets: Tensor | None = None,
) -> Selection:
    """Pick a weighted coreset by greedy facility location, within each class.

    Args:
        features: ``(r, d)`` pool, or ``(P, r, d)`` for ``P`` pools selected in one call. Any floating dtype
            (the dense path keeps float64 and computes others in float32; kNN distances are float32), CPU or
            CUDA. Values must keep squared distances finite: ``max |f| * sqrt(d)`` at most a quarter of the square
            root of the dtype's largest value (4.6e18 in float32).
        budget: Number of picks per pool, ``1 <= budget <= r``.
        labels: ``(r,)`` or ``(P, r)`` integer classes. Picks are made within each class with budgets
            proportional to the class sizes (:func:`class_budgets`). ``None`` treats the pool as one class.
        similarity: ``"distance"``: ``s_ij = D - ||f_i - f_j||`` with ``D`` the largest distance within the class
            (CRAIG and the CREST paper). ``"exp"``: ``s_ij = exp(-||f_i - f_j|| / d)`` (the CREST reference code).
        knn: ``None`` for the exact dense similarity. An integer ``k`` keeps only each point's ``k`` nearest
            neighbours (itself included) as the picks that can cover it, so no ``r x r`` matrix is built: for
            pools too large for that matrix, since its greedy takes one step (and host round trip) at a time and
            is far slower on small pools (on an H200, 55 ms against 2.7 ms dense for 128 of 600). With
            ``"distance"``, ``D`` is then the bound ``2 max_i ||f_i - mean||`` of the class diameter (the exact one
            needs all pairs): a point that no pick covers counts as farther than any real distance. Points of a
            class in the same cell of a grid of side ``1e-3`` of that bound are first merged into one point
            weighted by their number (near-duplicate proxies of learned examples would otherwise take one pick
            per ``k`` of them); the gains are those of the merged objective. Too few neighbours leave most points
            uncovered: picking 32 of 3,000 points in 10 classes, ``k = 8`` was farther from the pool on average
            than random picks, ``k = 16`` within 6% of dense and ``k = 32`` within 2%; measure against the dense
            greedy where it fits.
        backend: kNN search for ``knn``: ``"torch"``, ``"faiss"`` or ``"auto"`` (faiss when installed and the
            pool is large).
        budgets: ``(C,)`` or ``(P, C)`` integer picks per class (``C`` above every label), summing to ``budget``
            in every pool, instead of the proportional split. A class may get none (for pools with more classes
            than picks, see :func:`~lightning_crest.pool.sampled_class_budgets`): its points are then left
            uncovered, and the weights sum to the size of the classes picked from.

    Returns:
        A :class:`Selection`. Picks are in greedy order: by decreasing marginal gain, which is the order a greedy
        over all classes with per-class budgets takes them.

    On CPU the dense path keeps two buffers per calling thread and dtype between calls (the similarity blocks and
    the greedy's scratch, each only up to 32 MB), so that repeated selections do not fault in fresh memory each
    time.

    Raises:
        TypeError: If ``features`` is not floating point, ``labels`` not integer or ``budget`` not an ``int``.
        ValueError: On wrong shapes, a ``budget`` outside ``[number of classes present, r]``, ``budgets`` that do
            not sum to it or exceed a class's size, non-finite features, an unknown ``similarity``/``backend`` or a
            dense problem too large for memory.
        ImportError: If ``backend="faiss"`` and faiss is not installed.
    """
    _validate(features, budget, labels, similarity, knn, backend)
    budget = int(budget)  # numpy integers too
    knn = None if knn is None else int(knn)
    # Selection is not differentiable; a graph would also reach the reused buffers (see _workspace).
    features = features.detach()
    batched = features.ndim == 3
    pools = features if batched else features.unsqueeze(0)
    work_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    pools = pools.to(work_dtype)
    # The bookkeeping by class runs in numpy on the host: (pool, class) pairs get flat ids pool * C + class.
    num_pools, r = pools.shape[:2]
    if labels is None:
        classes = np.zeros((num_pools, r), dtype=np.int64)
    else:
        classes = labels.detach().cpu().numpy().astype(np.int64, copy=False).reshape(num_pools, r)
    num_classes = int(classes.max()) + 1
    if budgets is not None:
        num_classes = _check_budgets(budgets, budget, num_classes, labels is not None)
    elif num_classes > classes.size:  # sparse class ids (dataset-wide ones): tables sized by the ids present
        classes = np.unique(classes, return_inverse=True)[1].reshape(num_pools, r)
        num_classes = int(classes.max()) + 1
    flat_ids = (classes + num_classes * np.arange(num_pools)[:, None]).ravel()
    counts = np.bincount(flat_ids, minlength=num_pools * num_classes).reshape(num_pools, num_classes)
    if budgets is None:
        present = int((counts > 0).sum(1).max())
        if present > budget:
            raise ValueError(
                f"`budget`={budget} is smaller than the {present} classes present in a pool; every "
                f"class needs at least one pick so that each point has a pick of its own class. Raise the budget, "
                "or pass `budgets` that leave some classes out."
            )
        per_class = _class_budgets(counts, budget)
    else:
        if budgets.ndim == 2 and len(budgets) != num_pools:
            raise ValueError(
                f"`budgets` has {len(budgets)} rows for {num_pools} pools; pass one row per pool, or one for all."
            )
        per_class = np.broadcast_to(budgets.detach().cpu().long().numpy(), counts.shape)
        excess = per_class > counts
        if bool(excess.any()):
            pool, cls = (int(i) for i in np.argwhere(excess)[0])
            raise ValueError(
                f"`budgets` gives class {cls} {int(per_class[pool, cls])} picks in pool {pool}, which holds "
                f"{int(counts[pool, cls])} of its points; a class gets at most as many picks as points."
            )
    if knn is None:
        result = _dense_selection(pools, flat_ids, counts, per_class, budget, similarity)
    else:
        search = get_backend(backend, device=pools.device, pool_size=pools.shape[1])
        parts = [
            _sparse_selection(
                pool, torch.from_numpy(cls).to(pool.device), picks, budget, similarity, knn, search
            )
            for pool, cls, picks in zip(pools, classes, per_class)
        ]
        result = Selection(*(torch.stack(field) for field in zip(*(_fields(p) for p in parts))))
    result = Selection(result.indices, result.weights, result.gains.to(work_dtype))
    if batched:
        return result
    return Selection(result.indices[0], result.weights[0], result.gains[0])


def facility_location_objective(
    features: Tensor, indices: Tensor, labels: Tensor | None = None, similarity: Similarity = "distance"
) -> float:
    """Exact dense objective ``F(S)`` of one pool: a reference for tests and benchmarks, not a fast path.

    Args:
        features: ``(r, d)`` pool.
        indices: ``(m,)`` picks.
        labels: ``(r,)`` classes or ``None``.
        similarity: As in :func:`facility_location`.

    Returns:
        The objective value, computed in float64.

    Raises:
        TypeError, ValueError: As :func:`facility_location` for its arguments; also for ``indices`` that are not
            distinct integer positions in ``[0, r)`` and for a ``features`` batch of pools.
    """
    if isinstance(features, Tensor) and features.ndim == 3:
        raise ValueError(f"`features` must be one pool of shape (r, d), got {tuple(features.shape)}.")
    check_integer_tensor("indices", indices, "pool positions")
    _validate(features, 1, labels, similarity, None, "auto")
    r = len(features)
    if indices.ndim != 1 or (indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < r):
        raise ValueError(f"`indices` must be a 1-d tensor of positions in [0, {r}), got {indices.tolist()}.")
    if len(set(indices.tolist())) != indices.numel():
        raise ValueError(f"`indices` must be distinct picks, got {indices.tolist()}.")
    features = features.double()
    labels = torch.zeros(len(features), dtype=torch.long) if labels is None else labels.cpu().long()
    picked = torch.zeros(len(features), dtype=torch.bool)
    picked[indices.cpu()] = True
    total = 0.0
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        dist = torch.cdist(features[members], features[members])
        sim = _similarity(dist, dist.amax(), similarity, features.shape[1])
        in_class = picked[members]
        if bool(in_class.any()):
            total += float(sim[:, in_class].amax(dim=1).sum())
    return total


def _fields(selection: Selection) -> tuple[Tensor, Tensor, Tensor]:
    return selection.indices, selection.weights, selection.gains


def _similarity(dist: Tensor, diameter: Tensor | float, similarity: str, dim: int) -> Tensor:
    if similarity == "distance":
        return diameter - dist
    return torch.exp(-dist / dim)


def _dense_selection(
    pools: Tensor,
    flat_ids: np.ndarray[Any, Any],
    counts: np.ndarray[Any, Any],
    per_class: np.ndarray[Any, Any],
    budget: int,
    similarity: str,
) -> Selection:
    """Greedy on one dense similarity block per (pool, class) with picks, all blocks advanced together.

    ``flat_ids`` ``(P * r,)`` numbers each point's (pool, class) pair ``pool * C + class``; ``counts`` ``(P, C)``,
    and ``per_class`` ``(P, C)`` the picks of each. Index bookkeeping is done in numpy; only the similarity blocks
    and the greedy run on ``pools.device``.
    """
    num_pools, r, dim = pools.shape
    num_classes = counts.shape[1]
    device = pools.device
    block_budgets = per_class.ravel()
    flat_counts = counts.ravel()
    block_ids = np.flatnonzero(block_budgets)
    num_blocks = len(block_ids)
    size = int(flat_counts.max())
    if 2 * num_blocks * size * size * pools.element_size() > MAX_DENSE_BYTES:
        raise ValueError(
            f"The dense similarity for pools of shape {tuple(pools.shape)} needs "
            f"{2 * num_blocks * size * size * pools.element_size() / 2**30:.1f} GiB; pass `knn` (for example "
            f"knn=32) to use a sparse nearest-neighbour similarity instead."
        )

    # Blocks of very different sizes are solved in groups of similar size: each group is padded only to its own
    # largest block and runs only as many steps as its largest budget.
    # numpy sorts 16-bit integers by radix, several times faster than 64-bit ones.
    order = np.argsort(flat_ids.astype(np.int16) if flat_counts.size <= 2**15 else flat_ids, kind="stable")
    starts = np.cumsum(flat_counts) - flat_counts
    steps = int(block_budgets.max())
    shape = (num_pools * num_classes, steps)
    indices = torch.zeros(shape, dtype=torch.long, device=device)
    gains = pools.new_full(shape, -torch.inf)
    weights = torch.zeros(shape, dtype=torch.float32, device=device)
    block_sizes = flat_counts[block_ids]
    by_size = np.argsort(block_sizes, kind="stable")
    points_all = pools.reshape(num_pools * r, dim)
    for rows in _size_groups(block_sizes[by_size].tolist(), by_size):
        ids = block_ids[rows]
        size = _block_size(int(flat_counts[ids].max()))
        # members[block, slot] = flat position of the point; padding repeats the block's first member, so that
        # it leaves the block's distances (and diameter) unchanged.
        slots = np.arange(size)
        valid_np = slots < flat_counts[ids][:, None]
        members = torch.from_numpy(order[starts[ids][:, None] + np.where(valid_np, slots, 0)]).to(device)
        valid = torch.from_numpy(valid_np).to(device)
        points = points_all.index_select(0, members.flatten()).view(*members.shape, dim)
        # sim[b, j, i]: how well candidate j covers point i. Padded rows and columns copy the first member's; the
        # greedy starts padded points fully covered, so they add no gain (see _greedy_steps).
        dist = _pairwise_distances(points)
        if similarity == "distance":
            sim = torch.sub(dist.amax(dim=(1, 2), keepdim=True), dist, out=dist)
        else:
            sim = dist.div_(-dim).exp_()
        group_picks, group_gains = _dense_greedy(sim, valid, torch.from_numpy(block_budgets[ids]))
        taken = group_picks.shape[1]
        target = torch.from_numpy(ids).to(device)
        indices[target, :taken] = members.gather(1, group_picks) % r
        gains[target, :taken] = group_gains
        weights[target, :taken] = _cluster_sizes(sim, valid, group_picks, group_gains)

    # From (pool, class, step) layout to pool positions in greedy order.
    shape3 = (num_pools, num_classes, steps)
    return _greedy_order(indices.view(shape3), weights.view(shape3), gains.view(shape3), budget)


# Per greedy step, a run of blocks costs a fixed overhead of a few tensor operations plus its padded pairs; on
# CPU the overhead equals roughly this many pairs (measured on 2 cores: ~60 us per step against ~0.16 ns per pair;
# ten pools of 600 proxies in 10 classes then run as one group, 3% faster than as two).
_STEP_OVERHEAD_PAIRS = 400_000

# Padding a block to a multiple of this many points makes its rows whole vectors: a greedy step over 100 blocks of
# 80 points took 84 us on 2 cores, over 100 blocks of 77 points 96 us (every size between 73 and 79 took longer
# than 80, and likewise below 64 and 72).
_ROW_MULTIPLE = 8

# Blocks of up to this many points get their distances from the differences (as torch.cdist does), larger ones from
# the expansion; only the latter are padded to _ROW_MULTIPLE.
_DIFFERENCES_MAX_POINTS = 25

# Squared distances are floored here before the square root: on the measured CPU a float32 square root of zero (or
# of anything below about 1e-32) takes a slow path, six times slower than other values, and padded blocks have many
# zeros. The resulting distance of 1e-15 is below the expansion's own error (3.5e-4 of the block's spread, see
# _pairwise_distances) for any spread above 3e-12, and a padded row stays a copy of its first member's up to it.
_SQUARED_FLOOR_FLOAT32 = 1e-30


def _block_size(points: int) -> int:
    """Points per padded block for a largest class of ``points``: a multiple of _ROW_MULTIPLE on the expansion path."""
    if points <= _DIFFERENCES_MAX_POINTS:
        return points
    return -(-points // _ROW_MULTIPLE) * _ROW_MULTIPLE


# Host memory reused between calls, per thread: the similarity blocks and the greedy's scratch are megabytes that a
# fresh allocation gets as new pages from the system, and faulting them in took a quarter of a ten-pool call on a
# 2-core VM. Buffers above this size are not kept.
_MAX_KEPT_BYTES = 32 * 1024**2


class _Workspace(threading.local):
    buffers: dict[tuple[str, torch.dtype], Tensor]

    def __init__(self) -> None:
        self.buffers = {}


_WORKSPACE = _Workspace()


def _workspace(name: str, shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` like ``like``; on CPU it reuses this thread's buffer called ``name``.

    Each name must have at most one live user at a time and never escape a call of :func:`facility_location`.
    """
    numel = math.prod(shape)
    if like.device.type != "cpu" or numel * like.element_size() > _MAX_KEPT_BYTES:
        return like.new_empty(shape)
    key = (name, like.dtype)
    buffer = _WORKSPACE.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        # A buffer made under inference mode could not be written to outside it by later calls.
        with torch.inference_mode(False):
            buffer = _WORKSPACE.buffers[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)


def _pairwise_distances(points: Tensor) -> Tensor:
    """``(K, n, n)`` Euclidean distances within each of ``K`` blocks of points ``(K, n, d)``, in a workspace buffer.

    Up to 25 points per block (where :func:`torch.cdist` does the same) from the differences; above, by the
    expansion ``||a||^2 + ||b||^2 - 2 a.b`` of the points taken relative to their block's first point (which
    leaves the distances unchanged and avoids the cancellation of points far from the origin), with the diagonal
    set to exactly zero. The expansion loses about ``eps s^2`` of a squared distance (``s`` the block's spread),
    so a distance ``d`` is off by up to ``eps s^2 / d``: 1e-7 of ``s`` for ``d ~ s``, and up to ``sqrt(eps)``,
    3.5e-4 of ``s`` in float32, for near-duplicates. That is far below the spread of the similarities the greedy
    compares, and the cost of differences for every pair (``d`` times the memory) is not worth it. These figures
    are for full float32 matrix products: with ``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA) the
    products keep about 10 bits of mantissa, and picks near a tie can change (a few percent of them in an
    emulation on pools of 600 proxies) while the objective barely moves.
    """
    blocks, size, _ = points.shape
    dist = _workspace("similarity", (blocks, size, size), points)
    # Up to _DIFFERENCES_MAX_POINTS, torch.cdist takes the differences, without a (K, n, n, d) temporary.
    if size <= _DIFFERENCES_MAX_POINTS:
        return dist.copy_(torch.cdist(points, points))
    centred = points - points[:, :1]
    norms = centred.square().sum(dim=2)
    torch.add(norms.unsqueeze(2), norms.unsqueeze(1), out=dist)
    floor = _SQUARED_FLOOR_FLOAT32 if dist.dtype == torch.float32 else 0.0
    dist.baddbmm_(centred, centred.transpose(1, 2), alpha=-2).clamp_min_(floor).sqrt_()
    dist.diagonal(dim1=1, dim2=2).zero_()
    return dist


def _size_groups(sizes: list[int], blocks: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    """Split ``blocks`` (sorted by their ``sizes``) into 1, 2 or 4 runs of similar size, the cheapest estimate.

    A run of ``k`` blocks padded to ``n`` points takes about ``n`` steps (budgets grow with the class size), each
    costing the fixed overhead plus ``k n^2`` pairs. Splitting pays off for many blocks of uneven sizes.
    """
    count = len(sizes)

    def runs(groups: int) -> list[tuple[int, int]]:
        bounds = sorted({round(count * q / groups) for q in range(groups + 1)})
        return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]

    def cost(groups: int) -> float:
        return sum(
            sizes[b - 1] * (_STEP_OVERHEAD_PAIRS + (b - a) * sizes[b - 1] ** 2) for a, b in runs(groups)
        )

    best = min((1, 2, 4), key=cost)
    return [blocks[a:b] for a, b in runs(best)]


def _dense_greedy(sim: Tensor, valid: Tensor, budgets: Tensor) -> tuple[Tensor, Tensor]:
    """Exact greedy on ``(K, n, n)`` similarity blocks, ``sim[b, j, i]`` = how well ``j`` covers ``i``.

    All blocks are advanced together, one pick per block and step, up to the largest budget; a block whose own
    budget is spent keeps picking and the extra picks are discarded at the end. A padded row or column
    (``valid`` false) must be zero or a copy of the block's first member's.

    Returns ``(K, max budget)`` picks (slots in the block) and gains, ``-inf`` where a block's budget is spent.
    """
    steps = int(budgets.max())
    budgets = budgets.to(sim.device)
    spent = torch.arange(steps, device=sim.device) >= budgets.unsqueeze(1)
    picks, gains = _greedy_steps(sim, valid, steps, mask=False)
    # A picked candidate has a gain of exactly zero and a padded one loses its tie with the first member, so the
    # unmasked argmax can only return either when every gain of its block is zero. The masked greedy settles those.
    if bool((gains <= 0).logical_and_(~spent).any()):
        picks, gains = _greedy_steps(sim, valid, steps, mask=True)
    return picks, gains.masked_fill_(spent, -torch.inf)


def _greedy_steps(sim: Tensor, valid: Tensor, steps: int, *, mask: bool) -> tuple[Tensor, Tensor]:
    """Run ``steps`` naive greedy steps on every block; returns ``(K, steps)`` picks and gains.

    The gain of ``j`` is ``sum_i max(s_ji - c_i, 0)`` with ``c`` the current coverage, recomputed for every
    candidate at every step (on small blocks a handful of batched passes beats a lazy priority queue). It is
    computed directly, not as a difference of two large sums, so that small late gains keep their precision.
    Padded points start with an infinite coverage, so they never add gain. Without ``mask`` picked and padded
    candidates are not excluded: a picked one has a zero gain, a padded one a zero gain or that of the first
    member, whose lower index wins the tie. With ``mask`` they get ``-inf``.
    """
    num_blocks, size, _ = sim.shape
    rows = torch.arange(num_blocks, device=sim.device)
    coverage = sim.new_zeros(num_blocks, size).masked_fill_(~valid, torch.inf)
    # sim[b, j] is row b * size + j of flat_rows.
    flat_rows, row_starts = sim.reshape(num_blocks * size, size), rows * size
    scratch = _workspace("gain terms", sim.shape, sim)
    excluded = sim.new_zeros(num_blocks, size).masked_fill_(~valid, -torch.inf) if mask else None
    gain = sim.new_empty(num_blocks, size)
    # Written in place, one contiguous row per step: no per-step allocations and no stacking at the end.
    gains = sim.new_empty(steps, num_blocks)
    picks = torch.empty(steps, num_blocks, dtype=torch.long, device=sim.device)
    # Views made once: at these sizes creating them in every step is a measurable part of the step.
    covered, pick_rows, gain_rows = coverage.unsqueeze(1), picks.unbind(0), gains.unbind(0)
    row = torch.empty_like(row_starts)
    for best, best_gain in zip(pick_rows, gain_rows, strict=True):
        torch.sub(sim, covered, out=scratch).clamp_(min=0)
        torch.sum(scratch, dim=2, out=gain)
        if excluded is not None:
            gain.add_(excluded)
        torch.max(gain, dim=1, out=(best_gain, best))
        if excluded is not None:
            excluded[rows, best] = -torch.inf
        torch.maximum(coverage, flat_rows.index_select(0, torch.add(row_starts, best, out=row)), out=coverage)
    return picks.t(), gains.t()


def _cluster_sizes(sim: Tensor, valid: Tensor, picks: Tensor, gains: Tensor) -> Tensor:
    """Number of valid points whose most similar pick (earliest on a tie) is each pick; a pick owns itself."""
    num_blocks, size, _ = sim.shape
    active = ~torch.isinf(gains)
    # to_picks[b, t, i] = sim[b, picks[b, t], i]: whole rows of sim. A step past the block's budget takes the row
    # of the block's first pick, so it only ever ties with that earlier step and never owns a point: max(dim=1)
    # returns the first maximal index (and on CPU runs twice as fast as an argmax over a last dimension of steps).
    starts = torch.arange(num_blocks, device=sim.device).unsqueeze(1) * size
    rows = torch.where(active, picks, picks[:, :1]) + starts
    to_picks = sim.reshape(num_blocks * size, size).index_select(0, rows.flatten()).view(*picks.shape, size)
    owner = to_picks.max(dim=1).indices
    # Picks with identical features tie for each other; without this the later ones would own nothing.
    blocks, steps = torch.nonzero(active, as_tuple=True)
    owner[blocks, picks[blocks, steps]] = steps
    weights = torch.zeros(picks.shape, dtype=torch.float32, device=sim.device)
    return weights.scatter_add_(1, owner, valid.float())


def _greedy_order(indices: Tensor, weights: Tensor, gains: Tensor, budget: int) -> Selection:
    """Merge per-class pick sequences ``(P, C, steps)`` into ``(P, budget)`` by decreasing gain.

    Each class's gains are non-increasing (submodularity), so a stable sort of the step-major sequence keeps every
    class's own order and yields the order of a greedy over all classes with per-class budgets.
    """
    num_pools = indices.shape[0]
    flat_gains = gains.transpose(1, 2).reshape(num_pools, -1)
    order = torch.sort(flat_gains, dim=1, descending=True, stable=True).indices[:, :budget]
    return Selection(
        indices=indices.transpose(1, 2).reshape(num_pools, -1).gather(1, order),
        weights=weights.transpose(1, 2).reshape(num_pools, -1).gather(1, order),
        gains=flat_gains.gather(1, order),
    )


def _sparse_selection(
    pool: Tensor,
    classes: Tensor,
    budgets: np.ndarray[Any, Any],
    budget: int,
    similarity: str,
    knn: int,
    search: KnnBackend,
) -> Selection:
    """Greedy on each class's k-nearest-neighbour graph of one pool ``(r, d)``, ``budgets`` ``(C,)`` picks per class."""
    steps = int(budgets.max())
    shape = (1, len(budgets), steps)
    indices = torch.zeros(shape, dtype=torch.long)
    weights = torch.zeros(shape, dtype=torch.float32)
    gains = torch.full(shape, -torch.inf, dtype=torch.float64)
    for cls in np.flatnonzero(budgets).tolist():
        members = torch.nonzero(classes == cls).flatten()
        points = pool[members]
        radius = (points - points.mean(0)).norm(dim=1).amax()
        # With k >= n the graph holds every pair: exact, nothing merged, and the exact diameter is free.
        full_graph = knn >= len(members)
        cells, multiplicity = (
            (None, None)
            if full_graph
            else _merge_near_duplicates(points, _MERGE_RESOLUTION * 2 * float(radius), int(budgets[cls]))
        )
        candidates = points if cells is None else points[cells]
        dist, neighbours = knn_graph(candidates, min(knn, len(candidates)), search)
        diameter = dist.amax() if full_graph else 2 * radius
        sim = _similarity(dist.to(pool.dtype), diameter, similarity, pool.shape[1])
        if multiplicity is not None:
            sim = sim * multiplicity.unsqueeze(1)  # row i stands for all the points merged into it
        picks, pick_gains = _sparse_greedy(sim, neighbours, int(budgets[cls]))
        if cells is not None:
            picks = cells[picks]
        # The most similar pick of a point is its nearest pick, among its neighbours or not.
        _, owner = search.search(points[picks], points, 1)
        owner = owner.flatten()
        owner[picks] = torch.arange(len(picks), device=owner.device)  # a pick owns itself, duplicates too
        count = torch.bincount(owner.cpu(), minlength=len(picks))
        n = len(picks)
        indices[0, cls, :n] = members[picks].cpu()
        weights[0, cls, :n] = count.float()
        gains[0, cls, :n] = pick_gains.cpu()
    result = _greedy_order(indices, weights, gains, budget)
    return Selection(*(field[0].to(pool.device) for field in _fields(result)))


# Points of a class that fall in the same cell of a grid this fine (relative to the class's diameter bound) are
# merged into one weighted point before the kNN graph is built.
_MERGE_RESOLUTION = 1e-3


def _merge_near_duplicates(points: Tensor, side: float, budget: int) -> tuple[Tensor | None, Tensor | None]:
    """Positions of one representative per occupied grid cell of ``side``, and how many points each stands for.

    On a kNN graph a pick covers only the points that list it among their ``k`` neighbours, so a blob of many
    near-identical points (confidently learned examples have proxies near zero) would take one pick per ``k`` of
    them where the dense objective needs one. Merging each blob into a weighted point removes that waste. Returns
    ``(None, None)`` when nothing merges, when the grid is degenerate, or when fewer cells than ``budget`` remain.
    """
    if side <= 0.0:
        return None, None
    _, inverse, counts = torch.unique(
        torch.round(points / side), dim=0, return_inverse=True, return_counts=True
    )
    if len(counts) == len(points) or len(counts) < budget:
        return None, None
    positions = torch.arange(len(points), device=points.device)
    first = torch.full((len(counts),), len(points), dtype=torch.long, device=points.device)
    first.scatter_reduce_(0, inverse, positions, "amin")
    return first, counts.to(points.dtype)


def _sparse_greedy(sim: Tensor, neighbours: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Exact greedy on a kNN similarity: row ``i`` lists the candidates ``neighbours[i]`` that can cover ``i``.

    Gains are kept in float64 and updated incrementally: a pick changes the coverage of the rows that list it,
    and only the candidates in those rows change gain.
    """
    size, k = neighbours.shape
    device = sim.device
    sim = sim.double()
    flat = neighbours.reshape(-1)
    gains = torch.zeros(size, dtype=torch.float64, device=device).index_add_(0, flat, sim.reshape(-1))
    coverage = torch.zeros(size, dtype=torch.float64, device=device)
    # Reverse adjacency: entries (row * k + slot) grouped by the candidate they name.
    entries = torch.argsort(flat, stable=True)
    bounds = torch.cat([flat.new_zeros(1), torch.bincount(flat, minlength=size).cumsum(0)]).tolist()
    picks = torch.zeros(budget, dtype=torch.long, device=device)
    pick_gains = torch.zeros(budget, dtype=torch.float64, device=device)
    for step in range(budget):
        best_gain, best = gains.max(dim=0)
        picks[step], pick_gains[step] = best, best_gain
        gains[best] = -torch.inf
        j = int(best)
        hits = entries[bounds[j] : bounds[j + 1]]
        rows, values = hits // k, sim.reshape(-1)[hits]
        better = values > coverage[rows]
        rows, values = rows[better], values[better]
        if len(rows) == 0:
            continue
        row_sim = sim[rows]
        before = (row_sim - coverage[rows].unsqueeze(1)).clamp_(min=0)
        after = (row_sim - values.unsqueeze(1)).clamp_(min=0)
        gains.index_add_(0, neighbours[rows].reshape(-1), (after - before).reshape(-1))
        coverage[rows] = values
    return picks, pick_gains


def _check_budget_type(budget: object) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"`budget` must be an int, got {budget!r} ({type(budget).__name__}).")
    return int(budget)


def _check_budgets(budgets: object, budget: int, num_classes: int, labelled: bool) -> int:
    """Raise unless ``budgets`` is a valid per-class split of ``budget``; return its number of classes."""
    if not labelled:
        raise ValueError("`budgets` gives picks per class: pass the `labels` they refer to.")
    budgets = check_integer_tensor("budgets", budgets, "picks per class")
    if budgets.ndim not in (1, 2) or budgets.shape[-1] < num_classes:
        raise ValueError(
            f"`budgets` must have shape (C,) or (P, C) with C above every label ({num_classes - 1}), got "
            f"{tuple(budgets.shape)}."
        )
    sums = budgets.sum(-1).flatten().tolist()
    if int(budgets.min()) < 0 or any(total != budget for total in sums):
        raise ValueError(
            f"`budgets` must be non-negative and sum to `budget`={budget} in every pool, got sums {sums}."
        )
    return int(budgets.shape[-1])


def _validate(
    features: object, budget: object, labels: object, similarity: object, knn: object, backend: object
) -> None:
    if not isinstance(features, Tensor) or not features.is_floating_point():
        kind = f"dtype {features.dtype}" if isinstance(features, Tensor) else type(features).__name__
        raise TypeError(
            f"`features` must be a floating-point tensor of shape (r, d) or (P, r, d), got {kind}."
        )
    if features.ndim not in (2, 3) or 0 in features.shape:
        raise ValueError(
            f"`features` must have shape (r, d) or (P, r, d) with P, r, d >= 1, got {tuple(features.shape)}."
        )
    budget = _check_budget_type(budget)
    r = features.shape[-2]
    if not 1 <= budget <= r:
        raise ValueError(
            f"`budget` must lie in [1, r] = [1, {r}] for features of shape {tuple(features.shape)}, got {budget}."
        )
    # The extremes are NaN when any value is (and a quarter of the cost of a full isfinite mask on the host).
    extremes = torch.stack(torch.aminmax(features)).tolist()
    if not all(math.isfinite(extreme) for extreme in extremes):
        raise ValueError(
            "`features` contains NaN or inf values; coresets of non-finite features are meaningless."
        )
    # Coordinates up to m in size differ by up to 2m: squared distances reach 4 m^2 d, and the expansion's sums a
    # few times that. The bound keeps them all finite; beyond it they overflow to inf.
    largest = max(abs(extreme) for extreme in extremes)
    # The kNN search works in float32 whatever the input's dtype.
    wide = features.dtype == torch.float64 and knn is None
    limit = math.sqrt(torch.finfo(torch.float64 if wide else torch.float32).max) / 4
    if largest * math.sqrt(features.shape[-1]) > limit:
        raise ValueError(
            f"`features` values up to {largest:.3g} in {features.shape[-1]} dimensions would overflow the squared "
            f"distances (max |f| * sqrt(d) must stay below {limit:.3g}); scale the features down."
        )
    if labels is not None:
        labels = check_integer_tensor("labels", labels, "classes")
        if labels.shape != features.shape[:-1]:
            raise ValueError(
                f"`labels` must have shape {tuple(features.shape[:-1])} to match `features` "
                f"{tuple(features.shape)}, got {tuple(labels.shape)}."
            )
        if labels.device != features.device:
            raise ValueError(f"`labels` is on {labels.device} but `features` on {features.device}; move one.")
        lowest = int(labels.min())
        if lowest < 0:
            raise ValueError(f"`labels` must be non-negative class indices, got a minimum of {lowest}.")
    if similarity not in SIMILARITIES:
        raise ValueError(f"`similarity` must be one of {SIMILARITIES}, got {similarity!r}.")
    if knn is not None and (isinstance(knn, bool) or not isinstance(knn, numbers.Integral) or knn < 1):
        raise ValueError(f"`knn` must be None (dense) or a positive int, got {knn!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    if backend == "faiss":
        get_backend("faiss", device=features.device, pool_size=r)
