"""Exact Euclidean k-nearest-neighbour search for facility-location selection.

Facility location only needs, for every point of the pool, the few candidates that are close enough to
matter, so the selection engine works on a sparse kNN graph instead of the dense ``(r, r)`` similarity
matrix. In the graph returned by :func:`knn_graph`, **row** ``i`` is a *covered* point and the row's
entries ``indices[i, :]`` are the *candidates that can cover it*, ordered from the closest (normally the
point itself, at distance 0) to the farthest.

Two interchangeable backends implement the :class:`KnnBackend` protocol:

* :class:`TorchKnn` - chunked ``||a||^2 + ||b||^2 - 2ab`` matmul plus ``torch.topk``; CPU or CUDA.
* :class:`FaissKnn` - ``faiss.IndexFlatL2`` (``GpuIndexFlatL2`` for CUDA tensors when faiss has GPUs);
  needs ``pip install 'lightning-crest[faiss]'``.

:func:`get_backend` picks one (``"auto"`` prefers faiss on large pools) and caches the instances.
:func:`knn_graph` searches large CPU pools cell by cell with either backend, skipping the cells that cannot
hold a point's neighbours (exact, by the triangle inequality).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "AUTO_FAISS_MIN_POOL",
    "BACKEND_NAMES",
    "CELL_SEARCH_MIN_POOL",
    "FaissKnn",
    "KnnBackend",
    "TorchKnn",
    "faiss_available",
    "get_backend",
    "knn_graph",
]

# knn_graph (queries == database), d=10, k=32, 2 CPU cores, torch 2.14.1 vs faiss-cpu 1.15.1, median of
# 5-15 interleaved runs (shared host, so about +-30% noise):
#     n:      256    512   1024   2048   4096   8192  16384  32768  60000
#     torch  0.7ms  2.1ms  7.4ms   14ms   57ms  200ms  0.81s  3.0s   9-25s
#     faiss  0.8ms  1.9ms  5.2ms   15ms   45ms  151ms  0.57s  2.0s   3-8s
# Below ~4k points the two are within noise and a few milliseconds of each other; from 4096 up faiss
# is consistently 1.2-3x faster.
AUTO_FAISS_MIN_POOL = 4096

# CPU pools of at least this many points are searched cell by cell (:func:`_cell_search`), in cells of about
# ``_CELL_POINTS`` points. Measured like the table above on gradient proxies of a briefly trained CNN: at 16,384
# points 0.6 s for torch cell by cell against 1.0 s at once, and 0.96 s against 0.5-0.7 s for faiss, whose
# small searches cost more; at 32,768 points 1.3-1.5 s against 4.3-4.5 s for torch and 2.0 s against 2.6 s for
# faiss. Uniform or Gaussian pools, which the cells cannot prune, are searched at once after 0.09-0.16 s of
# k-means and sampled cells at 32,768 points (5-7% of faiss's search at once).
CELL_SEARCH_MIN_POOL = {"torch": 16384, "faiss": 32768}
_CELL_POINTS = 100

BACKEND_NAMES = ("auto", "torch", "faiss")

_FAISS_MISSING = (
    "The 'faiss' kNN backend needs faiss; install it with: pip install 'lightning-crest[faiss]' (or '.[faiss]' in a "
    "checkout)"
)

# GpuIndexFlatL2 rejects larger k; such rare searches fall back to the CPU index.
_FAISS_GPU_MAX_K = 2048


class KnnBackend(Protocol):
    """Exact Euclidean k-nearest-neighbour search."""

    name: str

    def search(self, database: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Find the ``k`` nearest rows of ``database`` for every row of ``queries``.

        Args:
            database: ``(n, d)`` floating tensor of candidate points.
            queries: ``(q, d)`` floating tensor on the same device as ``database``.
            k: Number of neighbours, ``1 <= k <= n``.

        Returns:
            ``(distances, indices)``: ``(q, k)`` float32 Euclidean (not squared) distances, ascending per
            row, and ``(q, k)`` int64 positions into ``database``; both on the queries' device.
        """
        ...


@functools.cache
def _import_faiss() -> ModuleType | None:
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def faiss_available() -> bool:
    """Whether faiss can be imported (the import is attempted once per process)."""
    return _import_faiss() is not None


def _require_faiss() -> ModuleType:
    faiss = _import_faiss()
    if faiss is None:
        raise ImportError(_FAISS_MISSING)
    return faiss


def _faiss_num_gpus() -> int:
    faiss = _import_faiss()
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


@functools.cache
def _gpu_resources() -> Any:
    # StandardGpuResources reserves scratch memory on every device it touches; one shared instance keeps
    # repeated searches from re-allocating it.
    return _require_faiss().StandardGpuResources()


def _prepare(database: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Validate the search arguments; return both inputs as float32, contiguous and centred."""
    for label, tensor in (("database", database), ("queries", queries)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"knn: {label} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"knn: {label} must be 2-D (points, features), got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"knn: {label} must be a floating tensor, got dtype {tensor.dtype}")
    if database.shape[1] != queries.shape[1]:
        raise ValueError(
            f"knn: database {tuple(database.shape)} and queries {tuple(queries.shape)} "
            "have different feature dimensions"
        )
    if database.device != queries.device:
        raise ValueError(f"knn: database is on {database.device} but queries are on {queries.device}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"knn: k must be an int, got {k!r}")
    n = database.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"knn: k must satisfy 1 <= k <= n = {n} (database rows), got k={k}")
    database = database.detach().to(torch.float32)
    # Distances are translation invariant, and centring keeps the norms in the expanded
    # ||a||^2 + ||b||^2 - 2ab form small: with features far from the origin float32 cancellation would
    # otherwise swamp the differences between neighbours (even a point's distance to itself).
    center = database.mean(dim=0)
    return (database - center).contiguous(), (queries.detach().to(torch.float32) - center).contiguous()


@contextlib.contextmanager
def _float32_products() -> Iterator[None]:
    """Matrix products in full float32 inside, whatever ``torch.set_float32_matmul_precision`` allows outside (TF32
    on CUDA, bfloat16 on CPUs with AMX or AVX-512 BF16, 10 and 8 bits of mantissa): the searches' rounding bounds
    are those of float32. The settings are restored as they were, and another thread changing them meanwhile is
    not supported."""
    cuda, mkldnn = torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)
    if not hasattr(cuda, "fp32_precision"):  # torch < 2.9: TF32 on CUDA is the only reduced precision
        allowed = cuda.allow_tf32
        cuda.allow_tf32 = False
        try:
            yield
        finally:
            cuda.allow_tf32 = allowed
        return
    # The per-operation settings take precedence over the global ones, old API or new.
    settings: list[Any] = [backend for backend in (cuda, mkldnn) if hasattr(backend, "fp32_precision")]
    saved = [backend.fp32_precision for backend in settings]
    try:
        for backend in settings:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, value in zip(settings, saved):
            backend.fp32_precision = value


# Candidates per query that TorchKnn ranks exactly at most, beyond its 2k nearest by the expanded form.
_MAX_CANDIDATES = 1024


class TorchKnn:
    """Exact kNN in pure torch, chunked over the queries so memory stays bounded.

    Distances come from the expanded form ``||a||^2 - 2ab + ||b||^2``, and every row that its rounding leaves in
    doubt is ranked again from the differences, up to ``_MAX_CANDIDATES`` per query: beyond that (a pile of points
    within float32 rounding of one another) the neighbours returned are some of the pile, each as near as the others
    to that precision. Equally near rows come in the order of their indices. The products run in full float32
    whatever ``torch.set_float32_matmul_precision`` says (Lightning suggests ``"high"``, TF32, on recent GPUs).

    Args:
        max_chunk_bytes: Budget of each block the search allocates: the ``(chunk, n)`` float32 distances, and the
            candidates ranked exactly with their ``(rows, width, d)`` differences. At least one query row is
            processed at a time whatever the budget.
    """

    name = "torch"

    def __init__(self, max_chunk_bytes: int = 64 * 2**20) -> None:
        if max_chunk_bytes <= 0:
            raise ValueError(f"TorchKnn: max_chunk_bytes must be positive, got {max_chunk_bytes}")
        self.max_chunk_bytes = max_chunk_bytes

    @_float32_products()
    def search(self, database: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """See :meth:`KnnBackend.search`."""
        database, queries = _prepare(database, queries, k)
        n, d = database.shape
        # Per query: the float32 distances, the first candidates' int64 indices (2k of them), and the gathered
        # (chunk, k, d) neighbour block, which can outgrow the distances when d is large.
        row_bytes = max(4 * n, 8 * min(n, 2 * k), 4 * k * d)
        chunk = max(1, self.max_chunk_bytes // row_bytes)
        db_sq = database.square().sum(dim=1)
        # Rounding error of the expanded form per unit of squared norm, a float32 epsilon for each of its terms.
        slack = 2 * (d + 2) * torch.finfo(torch.float32).eps
        dist_parts: list[Tensor] = []
        idx_parts: list[Tensor] = []
        with torch.no_grad():
            for start in range(0, queries.shape[0], chunk):
                block = queries[start : start + chunk]
                block_sq = block.square().sum(dim=1, keepdim=True)
                # Norms added in place: `addmm` would expand them into a second (chunk, n) block.
                sq = torch.mm(block, database.T).mul_(-2.0).add_(db_sq).add_(block_sq)
                # Even centred, the expanded form errs by up to `slack` times the two squared norms (a point's
                # distance to itself is not 0), enough to misorder near duplicates. The candidates, ranked exactly
                # from the differences, are the 2k nearest by the expanded form, and any other row whose expanded
                # distance, less its own error, could still be under the k-th smallest upper bound.
                width = min(n, 2 * k)
                near, candidates = torch.topk(sq, width, dim=1, largest=False, sorted=True)
                limit = (
                    (near + slack * (block_sq + db_sq[candidates])).kthvalue(k, dim=1, keepdim=True).values
                )
                # A row outside them has an expanded distance of at least the last candidate's: it can be under
                # the limit only if its squared norm reaches `reach`. A few such rows (points far out) join every
                # query's candidates; many call for the full comparison, which keeps at most `_MAX_CANDIDATES`
                # (more are a pile of points within rounding of each other, any of which is as near).
                reach = (near[:, -1:] - limit) / slack - block_sq
                suspects = torch.nonzero(db_sq >= reach.min()).flatten() if width < n else db_sq[:0].long()
                lower = None
                if 0 < len(suspects) <= width:
                    candidates = torch.cat([candidates, suspects.expand(len(block), -1)], dim=1)
                    width = candidates.shape[1]
                elif len(suspects) > width:
                    lower = sq.sub_(block_sq * slack).sub_(db_sq * slack)  # in place, as above
                    # Counted a slice of rows at a time: a sum over the whole block's mask converts it to int64.
                    within = max(
                        int((lower[i : i + 1024] <= limit[i : i + 1024]).sum(dim=1).max())
                        for i in range(0, len(lower), 1024)
                    )
                    width = max(k, min(_MAX_CANDIDATES, within))
                # The exact ranking gathers (rows, width, d) differences, and the full comparison's candidates
                # are (rows, width) values and indices: as many rows at a time as the budget allows.
                rows = max(1, self.max_chunk_bytes // (4 * width * (max(d, 1) + 6)))
                for first in range(0, len(block), rows):
                    part = slice(first, first + rows)
                    if lower is not None:
                        mine = torch.topk(lower[part], width, dim=1, largest=False, sorted=False).indices
                    else:
                        mine = candidates[part]
                    distances, idx = _exact_sorted(database, block[part], mine)
                    dist_parts.append(distances[:, :k].contiguous())  # not the (rows, width) storage
                    idx_parts.append(idx[:, :k].contiguous())
                del sq, lower  # before the next block's is allocated
        if not dist_parts:
            empty = queries.new_empty((0, k))
            return empty, empty.to(torch.int64)
        return torch.cat(dist_parts), torch.cat(idx_parts)


class FaissKnn:
    """Exact kNN with faiss flat L2 indexes.

    CPU tensors (and CUDA tensors when faiss has no GPU support) go through ``faiss.IndexFlatL2``; CUDA
    tensors use ``faiss.GpuIndexFlatL2`` on the same device when ``faiss.get_num_gpus() > 0``.

    Raises:
        ImportError: If faiss is not installed.
    """

    name = "faiss"

    def __init__(self) -> None:
        self._faiss = _require_faiss()

    def search(self, database: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """See :meth:`KnnBackend.search`."""
        database, queries = _prepare(database, queries, k)
        d = database.shape[1]
        device = queries.device
        if device.type == "cuda" and _faiss_num_gpus() > 0 and k <= _FAISS_GPU_MAX_K:
            config = self._faiss.GpuIndexFlatConfig()
            config.device = device.index if device.index is not None else torch.cuda.current_device()
            index = self._faiss.GpuIndexFlatL2(_gpu_resources(), d, config)
        else:
            index = self._faiss.IndexFlatL2(d)
        index.add(_to_numpy(database))
        _, idx = index.search(_to_numpy(queries), k)
        indices = torch.from_numpy(idx.astype(np.int64, copy=False)).to(device)
        # faiss also uses the expanded form and its cancellation noise: the distances are recomputed from the
        # differences, as TorchKnn does, in blocks of the same size.
        chunk = max(1, 64 * 2**20 // (4 * k * d))
        with torch.no_grad():
            parts = [
                _exact_sorted(database, queries[start : start + chunk], indices[start : start + chunk])
                for start in range(0, queries.shape[0], chunk)
            ]
        if not parts:
            return queries.new_empty((0, k)), indices
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _exact_sorted(database: Tensor, queries: Tensor, neighbours: Tensor) -> tuple[Tensor, Tensor]:
    """Distances of ``queries`` to their ``neighbours`` rows of ``database`` from the differences, ascending; equally
    near rows in the order of their indices (the first of them first, as faiss and the dense path take), and a row
    given twice last the second time."""
    neighbours = neighbours.sort(dim=1).values
    # One (rows, width, d) block, the differences squared in place.
    squared = database[neighbours].sub_(queries.unsqueeze(1)).square_().sum(dim=2)
    squared[:, 1:].masked_fill_(neighbours[:, 1:] == neighbours[:, :-1], math.inf)
    squared, order = torch.sort(squared, dim=1, stable=True)
    return squared.sqrt_(), torch.gather(neighbours, 1, order)


def _to_numpy(tensor: Tensor) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.ascontiguousarray(tensor.cpu().numpy(), dtype=np.float32)


@functools.cache
def _backend_instance(name: str) -> KnnBackend:
    return FaissKnn() if name == "faiss" else TorchKnn()


def get_backend(name: str, *, device: torch.device | str, pool_size: int) -> KnnBackend:
    """Return the (cached) kNN backend called ``name``.

    Args:
        name: ``"torch"``, ``"faiss"`` or ``"auto"``. ``"auto"`` picks faiss when it is installed, the pool
            has at least :data:`AUTO_FAISS_MIN_POOL` points and faiss can run on ``device`` (CPU, or CUDA
            with a GPU-enabled faiss build); otherwise torch.
        device: Device the features live on.
        pool_size: Number of points that will be searched (database rows).

    Returns:
        The backend; repeated calls resolving to the same backend return the same object.

    Raises:
        ValueError: If ``name`` is not one of :data:`BACKEND_NAMES`.
        ImportError: If ``name == "faiss"`` and faiss is not installed.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"Unknown kNN backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    # faiss_available() rather than _require_faiss() so a missing install can be simulated in tests.
    if name == "faiss" and not faiss_available():
        raise ImportError(_FAISS_MISSING)
    if name == "auto":
        device = torch.device(device)
        faiss_fits = faiss_available() and pool_size >= AUTO_FAISS_MIN_POOL
        faiss_runs_here = device.type == "cpu" or _faiss_num_gpus() > 0
        name = "faiss" if faiss_fits and faiss_runs_here else "torch"
    return _backend_instance(name)


def knn_graph(features: Tensor, k: int, backend: KnnBackend) -> tuple[Tensor, Tensor]:
    """Build the kNN graph of a pool: each point's ``k`` nearest points, itself included.

    Row ``i`` is the covered point ``i``; its entries are the candidates that can cover it, closest first.
    For distinct points the first entry is the point itself at distance 0. Large pools on the CPU (at least
    :data:`CELL_SEARCH_MIN_POOL` points for the backend) are searched cell by cell, each cell among the cells
    that can hold its points' neighbours: the same graph, up to the order of neighbours at equal distances.

    Args:
        features: ``(r, d)`` floating tensor of the pool's points.
        k: Neighbours per point (self included), ``1 <= k <= r``.
        backend: Search backend, e.g. from :func:`get_backend`.

    Returns:
        ``(distances, indices)``: ``(r, k)`` float32 Euclidean distances, ascending per row, and ``(r, k)``
        int64 positions into ``features``; both on ``features``' device.

    Raises:
        ValueError: If ``k`` is outside ``[1, r]`` or ``features`` is not 2-D.
        TypeError: If ``features`` is not a floating tensor or ``k`` is not an int.
    """
    # Checked here too so the message speaks of the pool rather than of a search database.
    if isinstance(features, Tensor) and features.dim() == 2 and isinstance(k, int):
        r = features.shape[0]
        if not 1 <= k <= r:
            raise ValueError(f"knn_graph: k must satisfy 1 <= k <= r = {r} (pool size), got k={k}")
    cells_from = CELL_SEARCH_MIN_POOL.get(backend.name)
    if (
        isinstance(features, Tensor)
        and features.device.type == "cpu"
        and cells_from
        and len(features) >= cells_from
    ):
        return _cell_search(features, k, backend)
    return backend.search(features, features, k)


@_float32_products()
def _cell_search(features: Tensor, k: int, backend: KnnBackend) -> tuple[Tensor, Tensor]:
    """The graph of one brute-force search of the pool, from one small search of ``backend`` per cell.

    The pool is split into cells around k-means centroids ``mu_c``, each with its radius ``R_c`` (the largest
    distance of a member to its centroid). No point of cell ``c`` is closer to a query ``q`` than
    ``|q - mu_c| - R_c``, so the members of a cell are searched only among the cells for which that bound, for
    one of them, does not exceed an upper bound on its ``k``-th distance (its ``k``-th distance within its own
    cell). The result is exact; neighbours at exactly equal distances may come in another order than one search
    of the whole pool gives them. Where the cells prune less than half of the pairs (points spread evenly in
    many dimensions), the pool is searched at once instead.
    """
    points, _ = _prepare(features, features, k)
    n, d = points.shape
    centroids, owner, radius = _cells(points, max(1, round(n / _CELL_POINTS)))
    count = len(centroids)
    sizes = torch.bincount(owner, minlength=count)
    starts = sizes.cumsum(0) - sizes
    by_cell = torch.argsort(owner, stable=True)
    members = [by_cell[start : start + size] for start, size in zip(starts.tolist(), sizes.tolist())]
    # The expansion |a|^2 + |b|^2 - 2ab of a squared distance is off by less than (d + 2) eps (|a| + |b|)^2;
    # every comparison allows this much (the points are centred: every norm is at most the largest).
    rounding = 4 * (d + 2) * torch.finfo(torch.float32).eps * float(points.square().sum(dim=1).max())
    needed: list[Tensor] = [torch.empty(0, dtype=torch.int64)] * count  # each cell's candidate cells
    pairs = searched = 0.0
    for cell in torch.randperm(count, generator=torch.Generator().manual_seed(0)).tolist():
        queries = members[cell]
        # Each point's k-th squared distance within its own cell bounds its k-th distance in the pool (a cell
        # with fewer than k points borrows the nearest cells').
        around = queries
        if len(queries) < k:
            near = torch.argsort(torch.linalg.vector_norm(centroids - centroids[cell], dim=1))
            enough = int(torch.searchsorted(sizes[near].cumsum(0), k)) + 1
            around = torch.cat([members[c] for c in near[:enough].tolist()])
        block = points[queries]
        reach = _squared_distances(block, points[around]).kthvalue(k, dim=1, keepdim=True).values
        reach = reach.add_(rounding).sqrt_()
        # Cell c is needed when |q - mu_c| - R_c <= reach_q for a query q, i.e. |q - mu_c|^2 <= (reach_q + R_c)^2.
        bound = (reach + radius).square_().add_(rounding)
        needed[cell] = torch.nonzero((_squared_distances(block, centroids) <= bound).any(dim=0)).flatten()
        pairs += len(queries) * float(sizes[needed[cell]].sum())
        searched += len(queries)
        # The cells come in random order: a tenth of the points tell whether pruning pays.
        if searched >= n / 10 and pairs > searched * n / 2:
            return backend.search(features, features, k)
    distances = torch.empty(n, k, dtype=torch.float32)
    indices = torch.empty(n, k, dtype=torch.int64)
    for cell, queries in enumerate(members):
        candidates = torch.cat([members[c] for c in needed[cell].tolist()])
        dist, idx = backend.search(points[candidates], points[queries], k)
        distances[queries] = dist.cpu()
        indices[queries] = candidates[idx.cpu()]
    return distances.to(features.device), indices.to(features.device)


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``(len(a), len(b))`` squared Euclidean distances by the expansion (rounded; see :func:`_cell_search`)."""
    return torch.addmm(b.square().sum(dim=1), a, b.T, alpha=-2.0).add_(a.square().sum(dim=1, keepdim=True))


def _cells(points: Tensor, count: int, steps: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Centroids ``(c, d)`` of a few k-means steps from a fixed random start, each point's cell ``(n,)`` and each
    cell's radius ``(c,)``; cells left empty are dropped."""
    generator = torch.Generator().manual_seed(0)
    centroids = points[torch.randperm(len(points), generator=generator)[:count]]
    rows = max(1, 2**22 // count)  # distance blocks of at most 16 MB
    for step in range(steps + 1):
        owner = torch.cat(
            [torch.cdist(chunk, centroids).argmin(dim=1) for chunk in torch.split(points, rows)]
        )
        sizes = torch.bincount(owner, minlength=len(centroids))
        kept = sizes > 0
        if step == steps:
            owner = (torch.cumsum(kept, 0) - 1)[owner]
            centroids = centroids[kept]
            break
        sums = torch.zeros_like(centroids).index_add_(0, owner, points)
        centroids = sums[kept] / sizes[kept].unsqueeze(1).to(points.dtype)
    # The radii from the differences themselves: the bounds of the search rely on them.
    spread = torch.linalg.vector_norm(points - centroids[owner], dim=1)
    radius = torch.zeros(len(centroids), dtype=points.dtype).scatter_reduce_(0, owner, spread, "amax")
    return centroids, owner, radius
