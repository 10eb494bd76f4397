"""What a fresh coreset costs against a training step: the ratio behind CREST's overhead on the benchmark.

Times, on the benchmark's Fashion-MNIST data and small CNN, in each memory layout: a training step (a batch of
``--batch`` read by index, forward, weighted loss, backward, SGD step with momentum), and the forward pass over a
random subset of ``--subset`` examples that each fresh coreset needs for its gradient proxies (read by index, eval
mode, no gradients, in eval batches of ``--batch``, as ``CrestCallback`` scores it). Medians of interleaved
rounds; it never asserts on time.

    python benchmarks/step_cost.py [--data-dir data] [--rounds 41]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from lightning_crest import CrestDataModule, weighted_cross_entropy
from lightning_crest.benchmark.data import load_dataset
from lightning_crest.benchmark.models import SmallCNN

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _costs(
    dm: CrestDataModule, layout: torch.memory_format, batch: int, subset: int, rounds: int
) -> list[float]:
    """Median milliseconds of a training step and of one random subset's forward pass."""
    torch.manual_seed(0)
    model = SmallCNN().to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = len(dm.labels)

    def step() -> None:
        inputs, targets = dm.fetch(torch.randint(n, (batch,)).tolist())
        model.train()
        optimizer.zero_grad()
        logits = model(inputs.contiguous(memory_format=layout))
        weighted_cross_entropy(logits, targets, torch.ones(batch)).backward()
        optimizer.step()

    def proxies() -> None:
        model.eval()
        with torch.no_grad():
            for chunk in torch.randint(n, (subset,)).split(batch):
                inputs, _ = dm.fetch(chunk.tolist())
                model(inputs.contiguous(memory_format=layout))

    work: list[Callable[[], None]] = [step, proxies]
    times: list[list[float]] = [[] for _ in work]
    for _ in range(5):  # warm-up: allocator, oneDNN primitives
        for run in work:
            run()
    for _ in range(rounds):
        for run, spent in zip(work, times):
            start = time.perf_counter()
            run()
            spent.append(1000 * (time.perf_counter() - start))
    return [statistics.median(spent) for spent in times]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--subset", type=int, default=300, help="random subset size r (the benchmark's 0.5%%)"
    )
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args(argv)
    print("$ " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}\n")
    train, _, _ = load_dataset("fashion-mnist", args.data_dir)
    dm = CrestDataModule(train, batch_size=args.batch)
    print(
        f"| layout | training step, {args.batch} examples (ms) | forward over a random subset of {args.subset} "
        "(ms) | ratio |"
    )
    print("|---|---|---|---|")
    for name, layout in LAYOUTS.items():
        step, forward = _costs(dm, layout, args.batch, args.subset, args.rounds)
        print(f"| {name} | {step:.1f} | {forward:.1f} | {forward / step:.2f} |")
    print(f"\nMedians of {args.rounds} interleaved rounds, each layout in turn.")


if __name__ == "__main__":
    main()
