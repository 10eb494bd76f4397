"""CREST against random mini-batches where the batch holds fewer picks than there are classes.

Fashion-MNIST (10 classes) in batches of ``--batch`` (8 by default, so a coreset cannot hold every class), the
benchmark's small CNN, SGD momentum 0.9 with the learning rate x0.1 at 60% and 85% of the epochs, a 10% budget
and random subsets of ``--subset`` examples. Two training sets: ``balanced`` (``--per-class`` images of each
class) and ``longtail`` (the same for classes 0-4, 3% of it for classes 5-9). Prints one row per run (test
accuracy, selections, the tail classes' share of the training weight against their share of the data) and the
means; it never asserts on time or accuracy.

With ``--drop-interval T2`` CREST excludes learned examples every ``T2`` epochs (the callback's default, 20, never
does in 10 epochs), and the script also prints, for every CREST run, each class's share of the pool that random
subsets are drawn from, divided by its share of the training set, after every exclusion that shrank the pool (read
from the callback's public ``pool`` mask at the end of each epoch). ``--sets`` and ``--methods`` restrict the runs.

    python benchmarks/many_classes.py [--data-dir data] [--seeds 3] [--epochs 10]
    python benchmarks/many_classes.py --sets longtail --methods crest --drop-interval 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lightning_crest import CrestCallback, CrestDataModule, weighted_cross_entropy
from lightning_crest.benchmark.data import InMemoryVisionDataset, load_dataset
from lightning_crest.benchmark.models import SmallCNN

TAIL = (5, 6, 7, 8, 9)


def training_set(train: Any, variant: str, per_class: int, seed: int = 0) -> InMemoryVisionDataset:
    """``per_class`` images of each class (3% of that for the tail classes of ``longtail``), shuffled."""
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for cls in range(10):
        members = torch.nonzero(train.targets == cls).flatten()
        size = max(1, per_class * 3 // 100) if variant == "longtail" and cls in TAIL else per_class
        keep.append(members[torch.randperm(len(members), generator=generator)[:size]])
    chosen = torch.cat(keep)
    chosen = chosen[torch.randperm(len(chosen), generator=generator)]
    return InMemoryVisionDataset(train.data[chosen], train.targets[chosen])


class Model(L.LightningModule):
    """The small CNN; keeps the total training weight each class received."""

    def __init__(self, lr: float, epochs: int) -> None:
        super().__init__()
        self.net = SmallCNN()
        self.lr, self.epochs = lr, epochs
        self.weight_by_class = torch.zeros(10, dtype=torch.float64)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets, weights = batch
        self.weight_by_class.index_add_(0, targets.cpu(), weights.detach().double().cpu())
        return weighted_cross_entropy(self(inputs), targets, weights)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        milestones = [int(0.6 * self.epochs), int(0.85 * self.epochs)]
        return {
            "optimizer": optimizer,
            "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones),
        }


class PoolRecorder(L.Callback):
    """Each class's count in CREST's pool at the end of every epoch in which the pool changed."""

    def __init__(self, crest: CrestCallback) -> None:
        self.crest = crest
        self.counts: list[tuple[int, torch.Tensor]] = []  # (epoch, per-class counts)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule  # type: ignore[attr-defined]
        labels = dm.train_dataset.targets
        counts = torch.bincount(labels[self.crest.pool], minlength=10)
        if not self.counts or not torch.equal(counts, self.counts[-1][1]):
            self.counts.append((trainer.current_epoch, counts))


def run(
    train: InMemoryVisionDataset, test: Any, method: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model = Model(args.lr, args.epochs)
    drop = {} if args.drop_interval is None else {"drop_interval": args.drop_interval}
    callback = CrestCallback(fraction=0.1, random_subset_size=args.subset, selection=method, **drop)
    recorder = PoolRecorder(callback)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback, recorder],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=CrestDataModule(train, batch_size=args.batch, eval_batch_size=256))
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(test.data[i : i + 1000]).argmax(1) for i in range(0, len(test), 1000)])
    frequency = torch.bincount(train.targets, minlength=10).double()
    tail = list(TAIL)
    return {
        "accuracy": 100 * float((predictions == test.targets).float().mean()),
        "selections": int(callback.statistics["selections"]),
        "tail_weight": float(model.weight_by_class[tail].sum() / model.weight_by_class.sum()),
        "tail_data": float(frequency[tail].sum() / frequency.sum()),
        # Each class's share of the pool over its share of the training set, after each change of the pool.
        "pool_shares": [
            (epoch, int(counts.sum()), (counts / counts.sum() / (frequency / frequency.sum())).tolist())
            for epoch, counts in recorder.counts
        ],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--subset", type=int, default=100, help="random subset size r")
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--drop-interval", type=int, default=None, help="CREST's drop_interval; default: the callback's (20)"
    )
    parser.add_argument(
        "--sets", nargs="+", choices=("balanced", "longtail"), default=["balanced", "longtail"]
    )
    parser.add_argument("--methods", nargs="+", choices=("crest", "random"), default=["crest", "random"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    full, test, _ = load_dataset("fashion-mnist", args.data_dir)
    drop = "" if args.drop_interval is None else f", drop_interval {args.drop_interval}"
    print(
        f"batch {args.batch}, r = {args.subset}, {args.epochs} epochs at 10%{drop}, seeds 0-{args.seeds - 1}\n"
    )
    print("| set | method | seed | test acc (%) | selections | tail share of weight | tail share of data |")
    print("|---|---|---|---|---|---|---|")
    summary, pools = [], []
    for variant in args.sets:
        train = training_set(full, variant, args.per_class)
        for method in args.methods:
            runs = [run(train, test, method, seed, args) for seed in range(args.seeds)]
            for seed, r in enumerate(runs):
                selections = r["selections"] if method == "crest" else "-"
                print(
                    f"| {variant} | {method} | {seed} | {r['accuracy']:.2f} | {selections} | "
                    f"{r['tail_weight']:.4f} | {r['tail_data']:.4f} |",
                    flush=True,
                )
                if method == "crest":
                    pools += [(variant, seed, *change) for change in r["pool_shares"][1:]]
            accuracies = [r["accuracy"] for r in runs]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            summary.append(f"| {variant} | {method} | {statistics.mean(accuracies):.2f} ± {spread:.2f} |")
    print("\n| set | method | test acc (%), mean ± sd |\n|---|---|---|")
    print("\n".join(summary))
    if pools:
        print(
            "\nEach class's share of CREST's pool / its share of the training set, at the end of each epoch whose "
            "exclusion shrank the pool (epochs from 0):\n"
        )
        print("| set | seed | epoch | pool size | " + " | ".join(f"class {c}" for c in range(10)) + " |")
        print("|---|---|---|---|" + "---|" * 10)
        for variant, seed, epoch, size, ratios in pools:
            print(
                f"| {variant} | {seed} | {epoch} | {size} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |"
            )


if __name__ == "__main__":
    main()
