"""Benchmark CREST's facility-location selection against apricot-select and a plain torch greedy.

Run with ``python benchmarks/selection.py`` (about two minutes) or ``--quick`` (under a minute). It prints
markdown tables; it never asserts on time. Three scenarios:

1. one mini-batch coreset: 128 picks from 600 gradient proxies (softmax - onehot, 10 classes), per class;
2. ten such coresets in one batched call, on uniform random pools (class sizes vary) and on class-stratified
   pools, the random subsets CREST draws;
3. a large pool (60,000 proxies, no labels, 1,000 picks) on a ``knn=32`` graph, each method in a fresh
   subprocess so that its peak memory can be read (``VmHWM``, reset after the imports); plus the k-medoid
   quality of ``knn=32`` against the dense greedy on a 4,000-point pool.

The proxies come from a tiny CNN trained briefly on Fashion-MNIST when its idx files are found
(``--fashion-mnist-dir``, unpacked or gzipped; by default ``data/FashionMNIST/raw``, where
``scripts/fetch-fashion-mnist data`` puts them), otherwise from synthetic clustered logits.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_crest.selection import class_budgets, facility_location, gradient_proxy
from lightning_crest.selection._facility_location import _block_size, _cluster_sizes, _dense_greedy

# Where `scripts/fetch-fashion-mnist data` puts the idx files (and torchvision looks for them).
DEFAULT_FASHION_MNIST_DIR = Path("data/FashionMNIST/raw")
NUM_CLASSES = 10
POOL_SIZE = 600
BUDGET = 128
NUM_POOLS = 10
KNN = 32
LARGE_BUDGET = 1000
QUALITY_POOL, QUALITY_BUDGET = 4000, 400
APRICOT_OPTIMIZERS = ("naive", "lazy", "two-stage")

# --- gradient proxies -------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray[Any, Any]:
    """Read an idx file (the MNIST format): magic with the number of dimensions, big-endian sizes, uint8 data."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(directory: Path) -> tuple[Tensor, Tensor] | None:
    found = [
        next((path for path in (directory / name, directory / f"{name}.gz") if path.is_file()), None)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    ]
    images, labels = found
    if images is None or labels is None:
        return None
    x = torch.from_numpy(_read_idx(images).astype(np.float32) / 255.0).unsqueeze(1)
    return (x - 0.286) / 0.353, torch.from_numpy(_read_idx(labels).astype(np.int64))


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, NUM_CLASSES),
    )


def cnn_proxies(images: Tensor, labels: Tensor, steps: int, seed: int) -> Tensor:
    """Train a tiny CNN for ``steps`` Adam steps, return the proxies of every training example."""
    torch.manual_seed(seed)
    model = _tiny_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in images.split(4096)])
    accuracy = float((logits.argmax(1) == labels).float().mean())
    print(f"Tiny CNN after {steps} steps: training accuracy {accuracy:.3f}.")
    return gradient_proxy(logits, labels)


def synthetic_proxies(count: int, seed: int) -> tuple[Tensor, Tensor]:
    """Proxies of clustered synthetic logits: a few confusion modes per class, partly confident."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=gen)
    modes = torch.randn(NUM_CLASSES, 4, NUM_CLASSES, generator=gen) * 2.0
    mode = torch.randint(0, 4, (count,), generator=gen)
    confidence = 4.0 * torch.rand(count, 1, generator=gen)
    logits = modes[labels, mode] + confidence * nn.functional.one_hot(labels, NUM_CLASSES)
    logits = logits + 0.5 * torch.randn(count, NUM_CLASSES, generator=gen)
    return gradient_proxy(logits, labels), labels


def load_proxies(directory: Path, steps: int, seed: int) -> tuple[Tensor, Tensor]:
    data = _fashion_mnist(directory)
    if data is None:
        print(f"Note: no Fashion-MNIST idx files in {directory}; using synthetic clustered proxies instead.")
        return synthetic_proxies(60_000, seed)
    images, labels = data
    return cnn_proxies(images, labels, steps, seed), labels


# --- timing and objectives --------------------------------------------------------------------------------------


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds of each function over ``runs`` rounds; every round runs each, in a rotated order.

    Timing the methods side by side, not one after the other, keeps a busy spell on a shared machine from
    landing on one method only: the ratios between methods are what the tables compare. In each round a method
    runs once untimed before its timed run, so that it does not pay for the switch from the previous method
    (caches, and the thread pools of torch and numba waiting on each other).
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(runs):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            fns[name]()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def block_objective(sim: np.ndarray[Any, Any], picks: Sequence[int]) -> float:
    return float(sim[:, list(picks)].max(axis=1).sum())


@dataclass
class Pool:
    """One labelled pool with its per-class similarity ``D - dist`` precomputed in float32 and float64."""

    features: Tensor
    labels: Tensor
    members: list[Tensor]
    sims32: list[Tensor]
    sims64: list[np.ndarray[Any, Any]]
    budgets: list[int]

    @classmethod
    def build(cls, features: Tensor, labels: Tensor, budget: int) -> Pool:
        counts = torch.bincount(labels, minlength=NUM_CLASSES)
        budgets = class_budgets(counts, budget).tolist()
        members = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES) if budgets[c] > 0]
        sims64 = []
        for idx in members:
            dist = torch.cdist(features[idx].double(), features[idx].double())
            sims64.append((dist.max() - dist).numpy())
        sims32 = [torch.from_numpy(s).float() for s in sims64]
        return cls(features, labels, members, sims32, sims64, [b for b in budgets if b > 0])

    def objective_of_positions(self, indices: Tensor) -> float:
        """Sum over classes of the objective of pool positions ``indices``."""
        chosen = set(indices.tolist())
        total = 0.0
        for idx, sim in zip(self.members, self.sims64):
            slots = [s for s, i in enumerate(idx.tolist()) if i in chosen]
            total += block_objective(sim, slots)
        return total


@functools.cache
def apricot_selection() -> type | None:
    """apricot's FacilityLocationSelection with its numba kernel factories memoised (compiled once)."""
    try:
        from apricot.functions import facilityLocation
    except ImportError:
        return None
    for name in ("calculate_gains", "calculate_gains_sparse", "calculate_gains_sieve"):
        kernel = getattr(facilityLocation, name)
        if not hasattr(kernel, "cache_info"):
            setattr(facilityLocation, name, functools.cache(kernel))
    return facilityLocation.FacilityLocationSelection  # type: ignore[no-any-return]


def apricot_name(optimizer: str) -> str:
    return f"apricot {optimizer} (precomputed, per class)"


def apricot_picks(pool: Pool, optimizer: str) -> list[list[int]]:
    selection = apricot_selection()
    assert selection is not None
    return [
        selection(b, metric="precomputed", optimizer=optimizer).fit(sim).ranking.tolist()
        for sim, b in zip(pool.sims64, pool.budgets)
    ]


def torch_naive_picks(pool: Pool) -> list[list[int]]:
    """Plain per-class greedy: recompute every gain with one clamp-and-sum, pick the argmax."""
    result = []
    for sim, budget in zip(pool.sims32, pool.budgets):
        coverage = torch.zeros(len(sim))
        picked: list[int] = []
        for _ in range(budget):
            gains = (sim - coverage.unsqueeze(1)).clamp_(min=0).sum(0)
            gains[picked] = -torch.inf
            best = int(gains.argmax())
            picked.append(best)
            coverage = torch.maximum(coverage, sim[:, best])
        result.append(picked)
    return result


def padded_blocks(pools: Sequence[Pool]) -> tuple[Tensor, Tensor, Tensor]:
    """The float32 class similarities of ``pools`` as one batch of zero-padded blocks, with budgets, padded to the
    size the engine pads its own blocks to."""
    sims = [sim for pool in pools for sim in pool.sims32]
    size = _block_size(max(len(sim) for sim in sims))
    blocks = torch.zeros(len(sims), size, size)
    valid = torch.zeros(len(sims), size, dtype=torch.bool)
    for b, sim in enumerate(sims):
        blocks[b, : len(sim), : len(sim)] = sim
        valid[b, : len(sim)] = True
    return blocks, valid, torch.tensor([b for pool in pools for b in pool.budgets])


def ours_greedy(blocks: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The engine's greedy and cluster sizes on precomputed blocks: picks and weights, as the engine returns."""
    picks, gains = _dense_greedy(*blocks)
    return picks, _cluster_sizes(blocks[0], blocks[1], picks, gains)


def ours_greedy_picks(blocks: tuple[Tensor, Tensor, Tensor]) -> list[list[int]]:
    picks, _ = _dense_greedy(*blocks)
    return [row[:b].tolist() for row, b in zip(picks, blocks[2].tolist())]


def class_objective(pool: Pool, picks: list[list[int]]) -> float:
    return sum(block_objective(sim, p) for sim, p in zip(pool.sims64, picks))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- scenarios 1 and 2 ------------------------------------------------------------------------------------------


def small_pools(proxies: Tensor, labels: Tensor, seed: int, stratified: bool = False) -> list[Pool]:
    """Ten random pools of 600 proxies: uniform draws (class sizes vary), or class-stratified ones as CREST draws
    its random subsets (class sizes in proportion to the data's: 60 of each class on Fashion-MNIST)."""
    gen = torch.Generator().manual_seed(seed + 1)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)]
    quotas = class_budgets(torch.bincount(labels, minlength=NUM_CLASSES), POOL_SIZE).tolist()
    pools = []
    for _ in range(NUM_POOLS):
        if stratified:
            idx = torch.cat(
                [
                    members[torch.randperm(len(members), generator=gen)[:quota]]
                    for members, quota in zip(by_class, quotas, strict=True)
                ]
            )
        else:
            idx = torch.randperm(len(proxies), generator=gen)[:POOL_SIZE]
        pools.append(Pool.build(proxies[idx].contiguous(), labels[idx].contiguous(), BUDGET))
    return pools


def scenario_one(pools: list[Pool], runs: int) -> dict[str, float]:
    """Ten pools, one coreset at a time; returns ms per coreset per method (for the batched scenario)."""
    blocks = [padded_blocks([pool]) for pool in pools]
    methods: dict[str, tuple[Callable[[Pool, int], object], Callable[[Pool, int], float]]] = {
        "ours end-to-end (features -> picks)": (
            lambda pool, _: facility_location(pool.features, BUDGET, pool.labels),
            lambda pool, _: pool.objective_of_positions(
                facility_location(pool.features, BUDGET, pool.labels).indices
            ),
        ),
        "ours greedy only (precomputed similarity)": (
            lambda _, i: ours_greedy(blocks[i]),
            lambda pool, i: class_objective(pool, ours_greedy_picks(blocks[i])),
        ),
    }
    if apricot_selection() is not None:
        for optimizer in APRICOT_OPTIMIZERS:
            methods[apricot_name(optimizer)] = (
                functools.partial(lambda opt, pool, _: apricot_picks(pool, opt), optimizer),
                functools.partial(
                    lambda opt, pool, _: class_objective(pool, apricot_picks(pool, opt)), optimizer
                ),
            )
    methods["plain torch naive greedy (per class)"] = (
        lambda pool, _: torch_naive_picks(pool),
        lambda pool, _: class_objective(pool, torch_naive_picks(pool)),
    )

    def all_pools(select: Callable[[Pool, int], object]) -> Callable[[], None]:
        def run() -> None:
            for i, pool in enumerate(pools):
                select(pool, i)

        return run

    seconds = interleaved_medians({name: all_pools(select) for name, (select, _) in methods.items()}, runs)
    timings = {name: 1e3 * value / len(pools) for name, value in seconds.items()}
    objectives = {
        name: statistics.fmean(objective(pool, i) for i, pool in enumerate(pools))
        for name, (_, objective) in methods.items()
    }

    reference = objectives["ours end-to-end (features -> picks)"]
    rows = [
        [name, f"{timings[name]:.3f}", f"{objectives[name]:.4f}", f"{objectives[name] / reference:.6f}"]
        for name in methods
    ]
    print(f"\n### 1. One coreset: m = {BUDGET} from r = {POOL_SIZE} proxies (d = {NUM_CLASSES}), per class\n")
    print(
        f"Mean over {len(pools)} pools, each timed one coreset per call; median of {runs} rounds, each round "
        "running every method once (interleaved).\n"
    )
    print(markdown_table(["method", "ms per coreset", "objective (sum over classes)", "ratio to ours"], rows))
    apricot = {k: v for k, v in timings.items() if k.startswith("apricot")}
    if apricot:
        fastest = min(apricot, key=apricot.__getitem__)
        speedup = apricot[fastest] / timings["ours end-to-end (features -> picks)"]
        print(f"\nOurs end-to-end is {speedup:.2f}x faster than the fastest apricot optimizer ({fastest}).")
    return timings


def scenario_two(pools: list[Pool], runs: int, single: dict[str, float], title: str) -> None:
    """Ten coresets per call, end to end and on the precomputed similarity that apricot is given."""
    features = torch.stack([pool.features for pool in pools])
    labels = torch.stack([pool.labels for pool in pools])
    blocks = padded_blocks(pools)
    batched = facility_location(features, BUDGET, labels)
    objective = statistics.fmean(
        pool.objective_of_positions(batched.indices[p]) for p, pool in enumerate(pools)
    )
    greedy_picks = ours_greedy_picks(blocks)
    per_pool = np.cumsum([0] + [len(pool.budgets) for pool in pools])
    greedy_objective = statistics.fmean(
        class_objective(pool, greedy_picks[a:b]) for pool, a, b in zip(pools, per_pool, per_pool[1:])
    )
    apricot = {opt: single[apricot_name(opt)] for opt in APRICOT_OPTIMIZERS if apricot_name(opt) in single}
    fastest = min(apricot, key=apricot.__getitem__) if apricot else None
    fns: dict[str, Callable[[], object]] = {
        "ours batched end-to-end (features -> picks)": lambda: facility_location(features, BUDGET, labels),
        "ours batched greedy only (precomputed similarity)": lambda: ours_greedy(blocks),
        "ours one coreset per call (end-to-end)": lambda: [
            facility_location(pool.features, BUDGET, pool.labels) for pool in pools
        ],
    }
    if fastest is not None:
        fns[f"{apricot_name(fastest)}, one per call"] = lambda: [
            apricot_picks(pool, fastest) for pool in pools
        ]
    # Timed again here, side by side, so that the speedups compare runs made under the same load.
    timings = {name: 1e3 * value / len(pools) for name, value in interleaved_medians(fns, runs).items()}
    objectives = {
        "ours batched end-to-end (features -> picks)": f"{objective:.4f}",
        "ours batched greedy only (precomputed similarity)": f"{greedy_objective:.4f}",
    }
    if fastest is not None:
        apricot_objective = statistics.fmean(
            class_objective(pool, apricot_picks(pool, fastest)) for pool in pools
        )
        objectives[f"{apricot_name(fastest)}, one per call"] = f"{apricot_objective:.4f}"
    reference = timings[f"{apricot_name(fastest)}, one per call"] if fastest is not None else None
    rows = [
        [
            name,
            f"{ms:.3f}",
            objectives.get(name, ""),
            f"{reference / ms:.2f}" if reference is not None else "",
        ]
        for name, ms in timings.items()
    ]
    shape = f"features {tuple(features.shape)}, labels {tuple(labels.shape)}"
    print(f"\n### {title}: P = {len(pools)} coresets in one call ({shape})\n")
    print(
        f"Median of {runs} interleaved rounds. The greedy-only row gets the per-class similarity blocks of all "
        "ten pools in one padded float32 batch (apricot gets the same similarity, per class, in float64); it "
        "includes the cluster-size weights, which apricot does not compute. The apricot optimizer is the fastest "
        "of scenario 1; the last column is its time divided by the row's.\n"
    )
    print(markdown_table(["method", "ms per coreset", "mean objective", "speedup over apricot"], rows))


# --- scenario 3: large pool in subprocesses ---------------------------------------------------------------------


def _peak_rss_bytes(reset: bool = False) -> int:
    """Peak resident memory of this process.

    Linux: ``VmHWM`` of ``/proc/self/status``, reset on request through ``/proc/self/clear_refs``. Not
    ``getrusage``: its ``ru_maxrss`` starts from the parent's peak after a fork, which hides a child's growth
    whenever the parent (here, holding the dataset) was larger.
    """
    status = Path("/proc/self/status")
    if status.exists():
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _apricot_knn(features: Tensor, budget: int, k: int) -> list[int]:
    """apricot's lazy greedy on a scipy sparse similarity ``bound - dist`` built from a faiss kNN graph."""
    from scipy.sparse import csr_matrix

    from lightning_crest.selection.knn import get_backend, knn_graph

    dist, neighbours = knn_graph(features, k, get_backend("faiss", device="cpu", pool_size=len(features)))
    bound = 2 * float((features - features.mean(0)).norm(dim=1).max())
    n = len(features)
    # apricot reads row j as the points that candidate j covers: the transpose of our kNN rows.
    covered = np.repeat(np.arange(n, dtype=np.int32), k)
    sim = csr_matrix(
        ((bound - dist.double()).flatten().numpy(), (neighbours.flatten().numpy().astype(np.int32), covered)),
        shape=(n, n),
    )
    selection = apricot_selection()
    assert selection is not None
    return selection(budget, metric="precomputed", optimizer="lazy").fit(sim).ranking.tolist()  # type: ignore[no-any-return]


def _large_method(name: str) -> Callable[[Tensor, int], list[int]]:
    if name == "apricot":
        return lambda features, budget: _apricot_knn(features, budget, KNN)
    return lambda features, budget: facility_location(
        features, budget, knn=KNN, backend=name
    ).indices.tolist()  # type: ignore[arg-type]


def child_main(method: str, data: Path, runs: int) -> None:
    """Subprocess body: warm up on a small pool, then time the large one; print JSON on the last line."""
    features = torch.from_numpy(np.load(data))
    select = _large_method(method)
    select(features[:2000].contiguous(), 50)  # imports, numba compilation, thread pools
    baseline = _peak_rss_bytes(reset=True)
    times, picks = [], []
    for _ in range(runs):
        start = time.perf_counter()
        picks = select(features, LARGE_BUDGET)
        times.append(time.perf_counter() - start)
    peak = _peak_rss_bytes() - baseline
    print(json.dumps({"seconds": statistics.median(times), "peak_bytes": peak, "picks": picks}))


def medoid_cost(features: Tensor, picks: Sequence[int]) -> float:
    chosen = features[list(picks)].double()
    return sum(
        float(torch.cdist(chunk.double(), chosen).min(dim=1).values.sum()) for chunk in features.split(8192)
    )


def scenario_three(proxies: Tensor, size: int, runs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 2)
    large = proxies[torch.randperm(len(proxies), generator=gen)[:size]].contiguous()
    methods = ["torch", "faiss", "auto"]
    if apricot_selection() is not None:
        methods.append("apricot")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "large.npy"
        np.save(data, large.numpy())
        for method in methods:
            command = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--child-data",
                str(data),
                "--runs",
                str(runs),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                rows.append([method, "failed", done.stderr.strip().splitlines()[-1], "", ""])
                continue
            report = json.loads(done.stdout.strip().splitlines()[-1])
            label = (
                "apricot lazy on a faiss kNN graph"
                if method == "apricot"
                else f"ours knn={KNN}, backend={method}"
            )
            rows.append(
                [
                    label,
                    f"{report['seconds']:.2f}",
                    f"{report['peak_bytes'] / 2**20:.0f}",
                    f"{medoid_cost(large, report['picks']):.1f}",
                ]
            )
    print(
        f"\n### 3. Large pool: {LARGE_BUDGET} picks from r = {size} proxies (d = {NUM_CLASSES}, no labels)\n"
    )
    print(
        f"kNN construction included; each method in a fresh subprocess, median of {runs} runs; extra memory = "
        "peak RSS (VmHWM) minus RSS after imports and a small warm-up.\n"
    )
    print(markdown_table(["method", "seconds", "extra peak MiB", "k-medoid cost"], rows))

    quality = proxies[torch.randperm(len(proxies), generator=gen)[:QUALITY_POOL]].contiguous()
    dense = facility_location(quality, QUALITY_BUDGET).indices.tolist()
    sparse = facility_location(quality, QUALITY_BUDGET, knn=KNN).indices.tolist()
    random_picks = torch.randperm(QUALITY_POOL, generator=gen)[:QUALITY_BUDGET].tolist()
    dense_cost = medoid_cost(quality, dense)
    quality_rows = [
        [name, f"{cost:.2f}", f"{cost / dense_cost:.4f}"]
        for name, cost in (
            ("dense exact greedy", dense_cost),
            (f"knn={KNN} greedy", medoid_cost(quality, sparse)),
            ("random picks", medoid_cost(quality, random_picks)),
        )
    ]
    print(
        f"\nk-medoid cost sum_i min_(j in S) ||f_i - f_j|| of {QUALITY_BUDGET} picks from {QUALITY_POOL} proxies:\n"
    )
    print(markdown_table(["picks", "k-medoid cost", "ratio to dense"], quality_rows))


# --- main -------------------------------------------------------------------------------------------------------


def numba_threads() -> str:
    try:
        import numba
    except ImportError:
        return "numba not installed"
    return str(numba.get_num_threads())


def faiss_threads() -> str:
    try:
        import faiss
    except ImportError:
        return "faiss not installed"
    return str(faiss.omp_get_max_threads())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per method (default 11, --quick 5)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs and a 20,000-point large pool")
    parser.add_argument("--fashion-mnist-dir", type=Path, default=DEFAULT_FASHION_MNIST_DIR)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--large-pool", type=int, default=None, help="default 60,000 (--quick 20,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (5 if args.quick else 11)
    if args.child:
        child_main(args.child, args.child_data, runs)
        return

    large_runs = max(1, min(runs, 1 if args.quick else 3))
    large_size = args.large_pool or (20_000 if args.quick else 60_000)
    print("$ " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print(
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"numba threads = {numba_threads()}, faiss threads = {faiss_threads()}, os.cpu_count() = {os.cpu_count()}\n"
    )
    proxies, labels = load_proxies(args.fashion_mnist_dir, args.train_steps, args.seed)
    pools = small_pools(proxies, labels, args.seed)
    single = scenario_one(pools, runs)
    scenario_two(pools, runs, single, "2a. Uniform random pools, class sizes vary")
    stratified = small_pools(proxies, labels, args.seed, stratified=True)
    scenario_two(stratified, runs, single, "2b. Class-stratified pools, as CREST draws its random subsets")
    scenario_three(proxies, min(large_size, len(proxies)), large_runs, args.seed)


if __name__ == "__main__":
    main()
