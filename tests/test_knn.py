"""Tests for lightning_crest.selection.knn."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from lightning_crest.selection import knn
from lightning_crest.selection.knn import TorchKnn, get_backend, knn_graph


def _brute_force(database: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    dist = torch.cdist(queries.double(), database.double())
    values, indices = torch.sort(dist, dim=1)
    return values[:, :k].float(), indices[:, :k]


def _faiss_has_gpus() -> bool:
    return knn.faiss_available() and knn._faiss_num_gpus() > 0


def _spread_points(n: int, d: int, seed: int) -> Tensor:
    """Random points on a coarse integer grid, so distinct distances differ by a clear margin."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (n, d), generator=g).float() + 0.01 * torch.rand(n, d, generator=g)


def _assert_same_neighbours(
    got: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor], database: Tensor, queries: Tensor
) -> None:
    (got_d, got_i), (ref_d, ref_i) = got, ref
    assert got_d.shape == ref_d.shape
    assert got_i.shape == ref_i.shape
    torch.testing.assert_close(got_d, ref_d, atol=1e-3, rtol=1e-4)
    assert torch.all(got_d[:, 1:] >= got_d[:, :-1]), "distances must be ascending per row"
    # The returned indices must really be at the returned distances (ties may legitimately swap order).
    actual = (database[got_i] - queries.unsqueeze(1)).norm(dim=2)
    torch.testing.assert_close(actual, got_d, atol=1e-3, rtol=1e-4)
    # Where the k-th and (k+1)-th distances are clearly apart the neighbour *set* is unique.
    k = got_i.shape[1]
    full = torch.cdist(queries.double(), database.double()).sort(dim=1).values
    clear = torch.ones(queries.shape[0], dtype=torch.bool)
    if k < database.shape[0]:
        clear = (full[:, k] - full[:, k - 1]) > 1e-3
    assert clear.sum() > 0
    for row in torch.nonzero(clear).flatten().tolist():
        assert set(got_i[row].tolist()) == set(ref_i[row].tolist())


@pytest.mark.parametrize(
    ("n", "q", "d", "k", "max_chunk_bytes"),
    [
        (50, 20, 3, 5, 256 * 2**20),
        (64, 37, 10, 8, 4 * 64 * 5),  # 5 query rows per chunk: several chunks plus a ragged last one
        (30, 30, 4, 30, 1),  # k == n, one query row per chunk
        (10, 7, 2, 1, 256 * 2**20),
    ],
)
def test_torch_matches_brute_force(n: int, q: int, d: int, k: int, max_chunk_bytes: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k)
    database = torch.randn(n, d, generator=g)
    queries = torch.randn(q, d, generator=g)
    got = TorchKnn(max_chunk_bytes=max_chunk_bytes).search(database, queries, k)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.int64
    _assert_same_neighbours(got, _brute_force(database, queries, k), database, queries)


def test_torch_converts_other_float_dtypes() -> None:
    database = _spread_points(40, 6, seed=1)
    queries = database[:9].clone()
    dist64, idx64 = TorchKnn().search(database.double(), queries.double(), 4)
    dist16, idx16 = TorchKnn().search(database.half(), queries.half(), 4)
    dist32, idx32 = TorchKnn().search(database, queries, 4)
    assert dist64.dtype == dist16.dtype == torch.float32
    assert torch.equal(idx64, idx32)
    torch.testing.assert_close(dist64, dist32)
    assert torch.equal(idx16[:, 0], idx32[:, 0])


def test_torch_handles_empty_queries() -> None:
    dist, idx = TorchKnn().search(torch.randn(5, 3), torch.empty(0, 3), 2)
    assert dist.shape == idx.shape == (0, 2)
    assert dist.dtype == torch.float32
    assert idx.dtype == torch.int64


def test_faiss_matches_torch() -> None:
    pytest.importorskip("faiss")
    database = _spread_points(300, 10, seed=2)
    queries = torch.cat([database[:50], _spread_points(40, 10, seed=3)])
    backend = knn.FaissKnn()
    got = backend.search(database, queries, 16)
    assert backend.name == "faiss"
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.int64
    _assert_same_neighbours(got, TorchKnn().search(database, queries, 16), database, queries)


@pytest.mark.parametrize(
    ("database", "queries", "k", "error", "match"),
    [
        (torch.randn(5, 3), torch.randn(4, 2), 2, ValueError, r"\(5, 3\).*\(4, 2\)"),
        (torch.randn(5), torch.randn(4, 3), 2, ValueError, r"2-D.*\(5,\)"),
        (torch.randn(5, 3), torch.randn(2, 4, 3), 2, ValueError, r"2-D.*\(2, 4, 3\)"),
        (torch.randn(5, 3), torch.randn(4, 3), 6, ValueError, r"k=6"),
        (torch.randn(5, 3), torch.randn(4, 3), 0, ValueError, r"k=0"),
        (torch.randn(5, 3), torch.randn(4, 3), 2.0, TypeError, r"k must be an int"),
        (torch.ones(5, 3, dtype=torch.int64), torch.randn(4, 3), 2, TypeError, r"floating.*int64"),
        ([[0.0, 1.0]], torch.randn(4, 2), 1, TypeError, r"torch\.Tensor.*list"),
    ],
)
def test_search_validation(database: Tensor, queries: Tensor, k: int, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TorchKnn().search(database, queries, k)


def test_search_rejects_mixed_devices() -> None:
    with pytest.raises(ValueError, match=r"cpu.*meta"):
        TorchKnn().search(torch.randn(5, 3), torch.randn(4, 3, device="meta"), 2)


def test_torch_rejects_non_positive_chunk_budget() -> None:
    with pytest.raises(ValueError, match=r"max_chunk_bytes must be positive, got 0"):
        TorchKnn(max_chunk_bytes=0)


@pytest.mark.parametrize("backend_name", ["torch", "faiss"])
def test_knn_graph_self_is_first_neighbour(backend_name: str) -> None:
    if backend_name == "faiss":
        pytest.importorskip("faiss")
    features = _spread_points(120, 10, seed=4)
    backend = get_backend(backend_name, device=torch.device("cpu"), pool_size=120)
    dist, idx = knn_graph(features, 7, backend)
    assert dist.shape == idx.shape == (120, 7)
    assert dist.dtype == torch.float32
    assert idx.dtype == torch.int64
    assert torch.equal(idx[:, 0], torch.arange(120))
    torch.testing.assert_close(dist[:, 0], torch.zeros(120), atol=1e-3, rtol=0)
    assert torch.all(dist[:, 1] > 0.5), "grid points are at least ~1 apart"


@pytest.mark.parametrize("backend_name", ["torch", "faiss"])
def test_knn_graph_far_from_origin(backend_name: str) -> None:
    if backend_name == "faiss":
        pytest.importorskip("faiss")
    # Without centring, ||a||^2 ~ 1e7 here and float32 cancellation in ||a||^2 + ||b||^2 - 2ab would
    # drown the ~4.5 gaps between neighbours.
    features = 1000.0 + torch.randn(200, 10, generator=torch.Generator().manual_seed(5))
    backend = get_backend(backend_name, device=torch.device("cpu"), pool_size=200)
    dist, idx = knn_graph(features, 3, backend)
    assert torch.equal(idx[:, 0], torch.arange(200))
    ref_dist, _ = _brute_force(features, features, 3)
    torch.testing.assert_close(dist, ref_dist, atol=1e-2, rtol=1e-3)
    if backend_name == "torch":
        assert torch.all(dist[:, 0] == 0), "torch recomputes the winners' distances exactly"


@pytest.mark.parametrize("k", [0, -1, 9])
def test_knn_graph_validates_k(k: int) -> None:
    with pytest.raises(ValueError, match=rf"knn_graph: k .* r = 8.*k={k}"):
        knn_graph(torch.randn(8, 3), k, TorchKnn())


def test_knn_graph_k_equals_pool_size() -> None:
    features = _spread_points(12, 3, seed=6)
    dist, idx = knn_graph(features, 12, TorchKnn())
    assert torch.equal(idx.sort(dim=1).values, torch.arange(12).expand(12, 12))
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


@pytest.fixture
def fresh_backend_cache() -> None:
    knn._backend_instance.cache_clear()


def test_get_backend_auto_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-in instances record which backend was chosen without needing faiss itself.
    monkeypatch.setattr(knn, "_backend_instance", lambda name: SimpleNamespace(name=name))
    monkeypatch.setattr(knn, "AUTO_FAISS_MIN_POOL", 100)

    def choice(device: str, pool_size: int, name: str = "auto") -> str:
        return get_backend(name, device=torch.device(device), pool_size=pool_size).name

    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    assert choice("cpu", 10**6) == "torch"

    monkeypatch.setattr(knn, "faiss_available", lambda: True)
    monkeypatch.setattr(knn, "_faiss_num_gpus", lambda: 0)
    assert choice("cpu", 99) == "torch"
    assert choice("cpu", 100) == "faiss"
    assert get_backend("auto", device="cpu", pool_size=100).name == "faiss"
    assert choice("cuda", 10**6) == "torch", "CPU-only faiss must not be picked for CUDA tensors"

    monkeypatch.setattr(knn, "_faiss_num_gpus", lambda: 1)
    assert choice("cuda", 100) == "faiss"
    assert choice("cuda", 99) == "torch"
    assert choice("cuda", 10**6, name="torch") == "torch"


@pytest.mark.usefixtures("fresh_backend_cache")
def test_get_backend_caches_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    torch_backend = get_backend("torch", device=cpu, pool_size=10)
    assert isinstance(torch_backend, TorchKnn)
    assert torch_backend.name == "torch"
    assert get_backend("torch", device=cpu, pool_size=10**6) is torch_backend
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    assert get_backend("auto", device=cpu, pool_size=10**6) is torch_backend


@pytest.mark.usefixtures("fresh_backend_cache")
def test_get_backend_caches_faiss_instance() -> None:
    pytest.importorskip("faiss")
    cpu = torch.device("cpu")
    faiss_backend = get_backend("faiss", device=cpu, pool_size=10)
    assert isinstance(faiss_backend, knn.FaissKnn)
    assert get_backend("faiss", device=cpu, pool_size=10) is faiss_backend
    assert get_backend("auto", device=cpu, pool_size=knn.AUTO_FAISS_MIN_POOL) is faiss_backend


def test_get_backend_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"'annoy'.*auto, torch, faiss"):
        get_backend("annoy", device=torch.device("cpu"), pool_size=10)


def test_get_backend_faiss_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'lightning-crest\[faiss\]'"):
        get_backend("faiss", device=torch.device("cpu"), pool_size=10)


def test_faiss_available_matches_import() -> None:
    try:
        import faiss  # noqa: F401
    except ImportError:
        expected = False
    else:
        expected = True
    assert knn.faiss_available() is expected


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and _faiss_has_gpus()), reason="needs CUDA and a GPU-enabled faiss"
)
def test_faiss_gpu_matches_torch() -> None:
    cuda = torch.device("cuda")
    database = _spread_points(2000, 10, seed=7).to(cuda)
    queries = torch.cat([database[:100], _spread_points(100, 10, seed=8).to(cuda)])
    backend = get_backend("faiss", device=cuda, pool_size=2000)
    got = backend.search(database, queries, 32)
    assert got[0].device.type == got[1].device.type == "cuda"
    assert knn._gpu_resources() is knn._gpu_resources()
    ref = TorchKnn().search(database, queries, 32)
    assert ref[0].device.type == "cuda"
    _assert_same_neighbours(
        (got[0].cpu(), got[1].cpu()), (ref[0].cpu(), ref[1].cpu()), database.cpu(), queries.cpu()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_selection_stays_on_the_device() -> None:
    from lightning_crest.selection import facility_location

    features = _spread_points(500, 10, seed=3).cuda()
    selection = facility_location(features, 20, knn=16, backend="torch")
    assert {field.device.type for field in (selection.indices, selection.weights, selection.gains)} == {
        "cuda"
    }


# --- searching large pools cell by cell ------------------------------------------------------------------------


class _Recording:
    """A backend that records the size of every search it is given."""

    def __init__(self, inner: knn.KnnBackend) -> None:
        self.name = inner.name
        self.inner = inner
        self.searches: list[tuple[int, int]] = []

    def search(self, database: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        self.searches.append((len(database), len(queries)))
        return self.inner.search(database, queries, k)


def _blobs(n: int, d: int, seed: int, blobs: int = 12) -> Tensor:
    """Gaussian blobs of different spreads: cells around them rule most of the pool out."""
    g = torch.Generator().manual_seed(seed)
    centres = 20.0 * torch.randn(blobs, d, generator=g)
    spread = 0.2 + 2.0 * torch.rand(blobs, 1, generator=g)
    which = torch.randint(0, blobs, (n,), generator=g)
    return centres[which] + spread[which] * torch.randn(n, d, generator=g)


def _by_cells(monkeypatch: pytest.MonkeyPatch, points_per_cell: int) -> None:
    monkeypatch.setattr(knn, "CELL_SEARCH_MIN_POOL", {"torch": 1, "faiss": 1})
    monkeypatch.setattr(knn, "_CELL_POINTS", points_per_cell)


@pytest.mark.parametrize("backend_name", ["torch", "faiss"])
@pytest.mark.parametrize(
    ("k", "points_per_cell", "offset", "d"),
    [
        (8, 40, 0.0, 6),
        (25, 15, 0.0, 6),  # most cells hold fewer than k points and borrow their neighbours'
        (8, 40, 1000.0, 6),  # far from the origin
        (1, 40, 0.0, 6),
        (8, 40, 0.0, 2),  # a uniform square: the cells tile it, and many neighbours lie across a border
        (2, 20, 0.0, 2),  # the reach of each cell's search is its points' k-th distance, the second here
    ],
)
def test_cell_search_matches_one_search(
    monkeypatch: pytest.MonkeyPatch, backend_name: str, k: int, points_per_cell: int, offset: float, d: int
) -> None:
    if backend_name == "faiss":
        pytest.importorskip("faiss")
    _by_cells(monkeypatch, points_per_cell)
    g = torch.Generator().manual_seed(10)
    features = offset + (_blobs(1500, d, seed=10) if d > 2 else torch.rand(1500, d, generator=g))
    backend = _Recording(knn._backend_instance(backend_name))
    got = knn_graph(features, k, backend)
    _assert_same_neighbours(got, _brute_force(features, features, k), features, features)
    # One search per cell, each over a small part of the pool.
    cells = round(1500 / points_per_cell)
    assert cells - 3 <= len(backend.searches) <= cells
    assert sum(queries for _, queries in backend.searches) == 1500
    pairs = sum(database * queries for database, queries in backend.searches)
    assert pairs < 0.3 * 1500**2


def test_cell_search_with_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    _by_cells(monkeypatch, 30)
    g = torch.Generator().manual_seed(11)
    # A blob of 300 identical points (confidently learned examples), and points near it.
    features = torch.cat(
        [torch.zeros(300, 4), 0.5 * torch.randn(600, 4, generator=g), _blobs(300, 4, seed=12)]
    )
    dist, idx = knn_graph(features, 10, TorchKnn())
    ref_dist, _ = _brute_force(features, features, 10)
    torch.testing.assert_close(dist, ref_dist, atol=1e-5, rtol=1e-5)
    actual = (features[idx] - features.unsqueeze(1)).norm(dim=2)
    torch.testing.assert_close(actual, dist, atol=1e-5, rtol=1e-5)
    assert torch.all(dist[:300] == 0)


def test_cell_search_searches_at_once_where_cells_do_not_prune(monkeypatch: pytest.MonkeyPatch) -> None:
    _by_cells(monkeypatch, 20)
    # Spread evenly in 32 dimensions, every cell is within reach of every point.
    features = torch.rand(800, 32, generator=torch.Generator().manual_seed(13))
    backend = _Recording(TorchKnn())
    got = knn_graph(features, 5, backend)
    assert backend.searches == [(800, 800)]
    _assert_same_neighbours(got, _brute_force(features, features, 5), features, features)


def test_knn_graph_searches_cell_by_cell_from_the_backends_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "CELL_SEARCH_MIN_POOL", {"torch": 1000})
    monkeypatch.setattr(knn, "_CELL_POINTS", 50)
    features = _blobs(1000, 5, seed=14)
    below = _Recording(TorchKnn())
    knn_graph(features[:999], 4, below)
    assert below.searches == [(999, 999)]
    at = _Recording(TorchKnn())
    knn_graph(features, 4, at)
    assert len(at.searches) > 10
    other = _Recording(TorchKnn())
    other.name = "custom"  # a backend without a threshold is always searched at once
    knn_graph(features, 4, other)
    assert other.searches == [(1000, 1000)]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_every_backend_gives_a_point_distance_zero_to_itself(backend: str) -> None:
    # Far from the origin the expanded form ||a||^2 - 2ab + ||b||^2 cancels badly; the returned
    # distances are the exact ones of the returned neighbours, the point itself at 0, whatever the backend.
    if backend == "faiss" and not knn.faiss_available():
        pytest.skip("faiss is not installed")
    points = torch.randn(
        16384, 10, generator=torch.Generator().manual_seed(0)
    )  # faiss uses BLAS at this size
    points[::2] += 30  # two clusters far apart: centring the data does not bring the norms down
    distances, indices = get_backend(backend, device="cpu", pool_size=len(points)).search(points, points, 8)
    assert torch.equal(distances[:, 0], torch.zeros(len(points)))
    assert bool((distances[:, 1:] >= distances[:, :-1]).all())
    exact = (points[indices].double() - points.unsqueeze(1).double()).norm(dim=2)
    torch.testing.assert_close(distances.double(), exact, rtol=1e-5, atol=1e-5)


def test_cell_search_when_the_last_clustering_step_empties_a_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    # Points piled near the origin: the last k-means step leaves one of the 42 cells (the 32nd) without points.
    _by_cells(monkeypatch, 3)
    g = torch.Generator().manual_seed(114)
    n, d = int(torch.randint(20, 300, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    features = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) ** 2
    assert (n, d) == (126, 2)
    _assert_same_neighbours(
        knn_graph(features, 4, TorchKnn()), _brute_force(features, features, 4), features, features
    )


@pytest.mark.parametrize("max_chunk_bytes", [64 * 2**20, 64])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_torch_ranks_near_duplicates_exactly(k: int, max_chunk_bytes: int) -> None:
    # 20 copies of a point moved by 1e-5: the expanded form's rounding (about 1e-6 of the squared norms) is larger
    # than their squared distances, so only an exact ranking gives each its own row first.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=g)
    points = torch.cat([base, base[0] + 1e-5 * torch.randn(20, 3, generator=g)])
    distances, indices = TorchKnn(max_chunk_bytes).search(points, points, k)
    assert torch.equal(indices[:, 0], torch.arange(len(points)))
    assert torch.equal(distances[:, 0], torch.zeros(len(points)))
    exact = (points[indices] - points.unsqueeze(1)).norm(dim=2)
    torch.testing.assert_close(distances, exact, rtol=1e-6, atol=1e-7)
    brute, _ = _brute_force(points.double(), points.double(), k)
    torch.testing.assert_close(distances, brute, rtol=0, atol=1e-6)
    if knn.faiss_available():
        assert torch.equal(indices, knn.FaissKnn().search(points, points, k)[1])


def test_torch_search_with_a_far_point_and_a_pile_of_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    # A far point widens every query's rounding bound: it joins the candidates, and the search stays exact. A
    # pile of 1,500 copies leaves more rows in doubt than are ranked exactly: any of them is as near.
    g = torch.Generator().manual_seed(1)
    points = torch.cat([torch.randn(300, 4, generator=g), torch.full((1, 4), 1e3)])
    distances, indices = TorchKnn().search(points, points, 3)
    brute, _ = _brute_force(points, points, 3)
    torch.testing.assert_close(distances, brute, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices[:, 0], torch.arange(len(points)))
    assert all(len(set(row)) == 3 for row in indices.tolist())  # the far point is not listed twice
    pile = torch.cat([torch.ones(1500, 4), torch.randn(100, 4, generator=g)])
    distances, indices = TorchKnn().search(pile, pile, 4)
    assert torch.equal(distances[:1500], torch.zeros(1500, 4))
    assert bool((indices[:1500] < 1500).all())
    assert all(len(set(row)) == 4 for row in indices.tolist())
    torch.testing.assert_close(distances[1500:], _brute_force(pile, pile, 4)[0][1500:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("user", ["high", "medium"])
def test_torch_searches_multiply_in_full_float32_whatever_the_matmul_precision(
    user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rounding bounds assume float32 products; "high" (TF32 on CUDA) and "medium" (bf16 in oneDNN on CPU) would
    # void them where the hardware has those units. Inside the searches both settings are full precision, and the
    # user's come back afterwards, after an error too.
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    if not all(hasattr(backend, "fp32_precision") for backend in backends):
        pytest.skip("torch < 2.9 has no per-backend matmul precision")
    monkeypatch.setattr(knn, "CELL_SEARCH_MIN_POOL", {"torch": 64})
    saved = [backend.fp32_precision for backend in backends]
    generic = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(user)
    try:
        users = [backend.fp32_precision for backend in backends]
        assert users != ["ieee", "ieee"]
        seen: list[list[str]] = []

        def spy(product: Callable[..., Tensor]) -> Callable[..., Tensor]:
            def recorded(*args: object, **kwargs: object) -> Tensor:
                seen.append([backend.fp32_precision for backend in backends])
                return product(*args, **kwargs)

            return recorded

        for name in ("mm", "addmm"):
            monkeypatch.setattr(torch, name, spy(getattr(torch, name)))
        points = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
        TorchKnn().search(points, points, 5)
        searched = len(seen)
        knn_graph(points, 5, TorchKnn())  # the cell search, then a search per cell
        assert 0 < searched < len(seen)
        assert all(settings == ["ieee", "ieee"] for settings in seen)
        assert [backend.fp32_precision for backend in backends] == users

        def failing(*args: object, **kwargs: object) -> Tensor:
            raise RuntimeError("out of memory")

        monkeypatch.setattr(torch, "mm", failing)
        with pytest.raises(RuntimeError, match="out of memory"):
            TorchKnn().search(points, points, 5)
        assert [backend.fp32_precision for backend in backends] == users
    finally:
        torch.set_float32_matmul_precision(generic)
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, Tensor):
                self.largest = max(self.largest, leaf.numel() * leaf.element_size())
        return out


def test_torch_search_keeps_every_block_within_its_budget() -> None:
    # The owner search of a selection: every point against the picks, k = 1. The picks lie within rounding of each
    # other seen from the points, far out, so every pick stays in doubt and the full comparison ranks all of them.
    # Its candidates (values and int64 indices for each query) were once taken for the whole distance block at
    # once: twice the budget.
    g = torch.Generator().manual_seed(0)
    picks = 1e-5 * torch.randn(500, 10, generator=g)
    points = 10.0 + torch.randn(2000, 10, generator=g)
    budget = 2**17  # above the inputs (80 kB)
    watch = _LargestOutput()
    with watch:
        distances, indices = TorchKnn(max_chunk_bytes=budget).search(picks, points, 1)
    assert 0 < watch.largest <= budget
    # Many neighbours in one dimension: the first candidates' int64 indices are the largest block (20 queries, so
    # that the result itself, 20 x 500, stays under the budget).
    line = torch.randn(1000, 1, generator=g)
    watch = _LargestOutput()
    with watch:
        TorchKnn(max_chunk_bytes=budget).search(line, line[:20], 500)
    assert 0 < watch.largest <= budget
    exact = (picks[indices] - points.unsqueeze(1)).norm(dim=2)
    brute, _ = _brute_force(picks.double(), points.double(), 1)
    torch.testing.assert_close(distances, exact, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(distances.double(), brute.double(), rtol=1e-6, atol=0)
