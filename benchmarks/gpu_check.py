"""One CREST fit on CUDA, with selection timed on pools like its own: selection time per coreset, step time.

Usage: ``python benchmarks/gpu_check.py [--n 20000] [--epochs 10] [--strategy ddp] [--devices N] [--fit-knn K]``.
Synthetic CIFAR-sized data, so it needs no download. It prints one table and exits non-zero if CUDA is missing.
Selection is timed per coreset on pools the size of the fit's (dense, one and ten pools per call, and with the
torch kNN backend) and on one large pool (kNN). The fit selects densely unless ``--fit-knn`` is given: on pools
of a few hundred the kNN greedy's step-by-step loop costs far more than the dense one. faiss-GPU is used only
where faiss reports GPUs. ``--strategy ddp`` runs the fit under Lightning's DDP, on CUDA with nccl (the
table names the process group's backend). ``--device cpu`` runs the same code on CPU (the test suite does, on
small sizes, so that the script is known to work before a GPU is at hand).
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import TensorDataset

from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.benchmark.models import build_model
from lightning_crest.benchmark.module import Classifier
from lightning_crest.selection import facility_location
from lightning_crest.selection.knn import faiss_available


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Backend(L.Callback):
    """Records the process group's backend (nccl, gloo) while the fit runs; ``-`` without one."""

    name = "-"

    def on_train_start(self, *args: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.name = str(torch.distributed.get_backend())


class StepTimer(L.Callback):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--knn", type=int, default=32, help="neighbours of the kNN selections")
    parser.add_argument(
        "--fit-knn", type=int, default=None, help="the fit's CrestCallback(knn=...); default dense"
    )
    parser.add_argument("--large", type=int, default=60_000, help="pool size of the kNN selection")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    warnings.filterwarnings("ignore")
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 10, (args.n,), generator=gen)
    inputs = torch.randn(args.n, 3, 32, 32, generator=gen) * 0.5 + targets.view(-1, 1, 1, 1) * 0.1
    train = TensorDataset(inputs, targets)
    train.targets = targets  # type: ignore[attr-defined]

    device = torch.device(args.device)
    crest = CrestCallback(fraction=0.1, random_subset_size=0.03, knn=args.fit_knn, backend="torch")
    batch = 128 * args.devices  # the fit's global batch: the size of its coresets
    pool = crest._subset_size(args.n, batch)  # and of its random subsets
    picks = min(batch, pool)
    proxies = torch.randn(10, pool, 10, device=device).softmax(-1)
    labels = torch.randint(0, 10, (10, pool), device=device)

    def per_coreset_ms(pools: int, repeats: int, **options: Any) -> float:
        """The fit picks one coreset per call (lazily, when its subset is first trained); several in a call run as
        one batched greedy on the dense path."""

        def select() -> None:
            facility_location(proxies[:pools], picks, labels[:pools], **options)

        select()  # first-call setup, untimed
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            select()
        synchronize(device)
        return (time.perf_counter() - start) / repeats / pools * 1000

    dense_one_ms, dense_ten_ms = per_coreset_ms(1, 20), per_coreset_ms(10, 20)
    sparse_ms = per_coreset_ms(1, 5, knn=args.knn, backend="torch")
    large = torch.randn(args.large, 10, device=device)
    facility_location(large[:5000], 100, knn=args.knn, backend="torch")  # first-call setup, untimed
    synchronize(device)
    start = time.perf_counter()
    facility_location(large, 1000, knn=args.knn, backend="torch")
    synchronize(device)
    knn_s = time.perf_counter() - start

    timer, backend = StepTimer(device), Backend()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=args.epochs,
        callbacks=[timer, crest, backend],  # the timer ends before CREST's checks and selections run
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Classifier(build_model("resnet20", 10, 3), 10, lr=0.1)
    start = time.perf_counter()
    trainer.fit(model, datamodule=CrestDataModule(train, batch_size=128))
    wall = time.perf_counter() - start
    if not trainer.is_global_zero:
        return
    metrics = trainer.callback_metrics
    selections = int(metrics["crest/selections"])
    rows = [
        ("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        ("strategy, processes, process group", f"{args.strategy}, {trainer.world_size}, {backend.name}"),
        ("fit's selection", "dense" if args.fit_knn is None else f"knn={args.fit_knn}, torch"),
        ("faiss reports GPUs", str(faiss_available() and __import__("faiss").get_num_gpus() > 0)),
        (
            f"dense selection, ms per coreset (m={picks} of r={pool}), one pool per call",
            f"{dense_one_ms:.3f}",
        ),
        (
            f"dense selection, ms per coreset (m={picks} of r={pool}), ten pools per call",
            f"{dense_ten_ms:.3f}",
        ),
        (
            f"kNN selection, ms per coreset (m={picks} of r={pool}, knn={args.knn}), one pool per call",
            f"{sparse_ms:.3f}",
        ),
        (f"kNN selection, 1000 of {args.large}, knn={args.knn}, s", f"{knn_s:.2f}"),
        ("fit wall time, s", f"{wall:.1f}"),
        ("median step time, ms", f"{1000 * sorted(timer.times)[len(timer.times) // 2]:.2f}"),
        ("selections", str(selections)),
        ("CREST selection time, s", f"{float(metrics['crest/selection_time']):.2f}"),
        ("CREST overhead", f"{float(metrics['crest/overhead']):.1%}"),
        *((f"CREST {part} time, s", f"{seconds:.2f}") for part, seconds in crest.timings.items()),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
