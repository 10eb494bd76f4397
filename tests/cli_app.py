"""A minimal LightningCLI application: the CREST callback is added and configured from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyClassifier, blobs

from lightning_crest import CrestCallback, CrestDataModule


class BlobsDataModule(CrestDataModule):
    def __init__(self, n: int = 1200, batch_size: int = 32) -> None:
        super().__init__(blobs(n=n), batch_size=batch_size)


if __name__ == "__main__":
    cli = LightningCLI(
        TinyClassifier, BlobsDataModule, trainer_defaults={"logger": False, "enable_checkpointing": False}
    )
    crest = next(c for c in cli.trainer.callbacks if isinstance(c, CrestCallback))  # type: ignore[attr-defined]
    print(
        f"CREST fraction={crest.fraction} tau={crest.tau} proxy_dtype={crest.proxy_dtype} "
        f"random_subset_size={crest.random_subset_size!r} steps={cli.trainer.global_step}"
    )
