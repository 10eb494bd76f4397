"""How often CREST re-selects on a task the model fits almost perfectly, and what ``tau`` trades.

A GRU text classifier (``nn.Embedding(V, 16)``, ``nn.GRU(16, 32)``, ``nn.Linear(32, 2)``) trained with Adam (lr
``--lr``) through Lightning on a synthetic task: sequences of ``--length`` tokens drawn uniformly from ``1..V-1``,
and the label says whether token 1 occurs (in half of the ``--size`` training sequences, at a random position).
``--epochs`` epochs at 10% in batches of ``--batch``: with the defaults 2,400 sequences, 6 steps per epoch, 60
steps. Random subsets of ``--subset`` examples, checks on all of them (the default ``check_size``), the other
arguments the callback's defaults, the Hessian probes (a double backward through the GRU) included.

For every ``tau`` and seed it prints the selections, the checks and how many failed, the largest and the median
``rho`` over the checks and its median over each third of the steps, the anchor loss ``L0`` of the last check
(the check sample's loss at its selection), CREST's share of the fit's wall time (``statistics["overhead"]``)
and its parts (``timings``), the loss on the whole training set at the end and the accuracy on ``--size`` fresh
sequences; then random mini-batches at the same budget. It never asserts on time or accuracy. The checks are
counted, and ``rho`` and ``L0`` read at each one, by overriding the callback's private ``_check`` (as
``check_trace.py`` does); ``statistics`` holds only the last ``rho``.

    python benchmarks/easy_task.py [--taus 0.05 0.2 0.5 2] [--seeds 3] [--epochs 10]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_crest import CrestCallback, CrestDataModule, weighted_cross_entropy

VOCAB = 50
MARKER = 1  # the token whose presence is the label


class Sequences(Dataset[tuple[Tensor, int]]):
    """``size`` token sequences; label 1 where :data:`MARKER` occurs (half of them)."""

    def __init__(self, size: int, length: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(MARKER + 1, VOCAB, (size, length), generator=generator)
        self.targets = (torch.rand(size, generator=generator) < 0.5).long()
        positive = torch.nonzero(self.targets).flatten()
        where = torch.randint(length, (len(positive),), generator=generator)
        self.tokens[positive, where] = MARKER

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.tokens[index], int(self.targets[index])


class Model(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.gru = nn.GRU(16, 32, batch_first=True)
        self.head = nn.Linear(32, 2)
        self.lr = lr

    def forward(self, tokens: Tensor) -> Tensor:
        _, last = self.gru(self.embed(tokens))
        return self.head(last[-1])  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, targets, weights = batch
        return weighted_cross_entropy(self(tokens), targets, weights)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class CountingCallback(CrestCallback):
    """Keeps ``rho``, ``L0`` and the verdict of every check (private hook, as in ``check_trace.py``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checks: list[tuple[int, float, float, bool]] = []  # (step, rho, L0, failed)

    def _check(self) -> bool:
        failed = super()._check()
        assert self._trainer is not None
        anchor = self._quadratic.anchor_loss
        self.checks.append(
            (self._trainer.global_step, self._rho, math.nan if anchor is None else anchor, failed)
        )
        return failed


def run(
    train: Sequences, held_out: Sequences, method: str, tau: float, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model = Model(args.lr)
    callback = CountingCallback(fraction=0.1, random_subset_size=args.subset, tau=tau, selection=method)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=CrestDataModule(train, batch_size=args.batch, eval_batch_size=500))
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(train.tokens), train.targets))
        accuracy = 100 * float((model(held_out.tokens).argmax(1) == held_out.targets).float().mean())
    rho = [r for _, r, _, _ in callback.checks]
    steps = trainer.global_step
    thirds = [
        [r for step, r, _, _ in callback.checks if k * steps < 3 * step <= (k + 1) * steps] for k in range(3)
    ]
    return {
        "steps": trainer.global_step,
        "selections": int(callback.statistics["selections"]),
        "checks": len(rho),
        "failed": sum(f for *_, f in callback.checks),
        "rho_max": max(rho, default=float("nan")),
        "rho_median": statistics.median(rho) if rho else float("nan"),
        "rho_thirds": " / ".join(f"{statistics.median(t):.2f}" if t else "-" for t in thirds),
        "last_L0": callback.checks[-1][2] if rho else float("nan"),
        "overhead": callback.statistics["overhead"],
        "timings": callback.timings,
        "seconds": seconds,
        "loss": loss,
        "accuracy": accuracy,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.2, 0.5, 2.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--size", type=int, default=2400, help="training sequences (and held-out ones)")
    parser.add_argument("--length", type=int, default=20, help="tokens per sequence")
    parser.add_argument("--subset", type=int, default=160, help="random subset size r")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    train = Sequences(args.size, args.length, seed=1000)
    held_out = Sequences(args.size, args.length, seed=2000)
    print(
        f"{args.size} sequences of {args.length} tokens, batch {args.batch}, r = {args.subset}, "
        f"{args.epochs} epochs at 10%, Adam lr {args.lr}, seeds 0-{args.seeds - 1}\n"
    )
    print(
        "| tau | selections | checks (failed) | max rho | median rho | median rho by third of the steps | "
        "L0 at last check | seed | steps | overhead | proxies / greedy / hessian / checks (s) | fit (s) | "
        "final train loss | held-out acc (%) |"
    )
    print("|" + "---|" * 14)
    summary = []
    for tau in [*args.taus, None]:
        method = "random" if tau is None else "crest"
        runs = []
        for seed in range(args.seeds):
            r = run(train, held_out, method, 0.05 if tau is None else tau, seed, args)
            runs.append(r)
            t = r["timings"]
            if tau is None:
                own = "| random | - | - | - | - | - | - "
            else:
                own = (
                    f"| {tau} | {r['selections']} | {r['checks']} ({r['failed']}) | {r['rho_max']:.3f} | "
                    f"{r['rho_median']:.3f} | {r['rho_thirds']} | {r['last_L0']:.4f} "
                )
            print(
                f"{own}| {seed} | {r['steps']} | {100 * r['overhead']:.0f}% | {t['proxies']:.2f} / "
                f"{t['greedy']:.2f} / {t['hessian']:.2f} / {t['checks']:.2f} | {r['seconds']:.1f} | "
                f"{r['loss']:.4f} | {r['accuracy']:.1f} |",
                flush=True,
            )

        def mean(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return float(statistics.mean(r[key] for r in runs))

        label = "random" if tau is None else f"crest, tau {tau}"
        selections = "-" if tau is None else f"{mean('selections'):.1f}"
        summary.append(
            f"| {label} | {selections} | {100 * mean('overhead'):.0f}% | {mean('seconds'):.1f} | "
            f"{mean('loss'):.4f} | {mean('accuracy'):.1f} |"
        )
    print("\n| method | selections | overhead | fit (s) | final train loss | held-out acc (%) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
