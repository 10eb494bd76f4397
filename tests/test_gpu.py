"""CREST on CUDA: a fit in each precision against the same fit on CPU, data held on the GPU, resuming, FSDP refused.

Skipped without CUDA. ``benchmarks/gpu_check.py`` times a larger fit.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import LabelledTensors, Recorder, TinyClassifier, blobs, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_resume import EPOCHS, STEPS, crest, run, same_parameters
from torch import Tensor

from lightning_crest import CrestCallback, CrestDataModule
from lightning_crest.selection import facility_location_objective, gradient_proxy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# cuBLAS repeats its results run to run only with a fixed workspace; it reads this when its handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# One draw of four overlapping classes: 1,200 examples to train on, 2,000 held out.
_INPUTS, _TARGETS = blobs(n=3200).tensors
TRAIN = LabelledTensors(_INPUTS[:1200], _TARGETS[:1200])
HELD_OUT = LabelledTensors(_INPUTS[1200:], _TARGETS[1200:])


def accuracy(model: L.LightningModule, data: LabelledTensors) -> float:
    inputs, targets = data.tensors
    model.eval()
    with torch.no_grad():
        logits = model(inputs.to(next(model.parameters()).device))
    return float((logits.argmax(1).cpu() == targets).float().mean())


def fit(accelerator: str, precision: str) -> tuple[Recorder, TinyClassifier]:
    torch.manual_seed(0)
    callback = Recorder(fraction=0.25, random_subset_size=0.1, tau=0.02, seed=0)
    trainer = make_trainer([callback], accelerator=accelerator, precision=precision, max_epochs=4)
    model = TinyClassifier()
    trainer.fit(model, datamodule=CrestDataModule(TRAIN, batch_size=32))
    return callback, model


def first_objective(reference: Recorder, other: Recorder) -> tuple[float, float]:
    """Facility-location objective of both runs' first coresets, on the proxies of ``reference``'s first subset.

    Both runs start from the same weights and draw the same first subset; only their arithmetic differs.
    """
    _, subsets, logits, targets, _, _ = reference.picks[0]
    assert torch.equal(other.picks[0][1], subsets)
    proxies = gradient_proxy(logits[0], targets[0])

    def positions(picked: Tensor) -> Tensor:
        return torch.nonzero(subsets[0].unsqueeze(1) == picked[0].cpu().unsqueeze(0))[:, 0]

    ours, theirs = (positions(run.picks[0][4]) for run in (reference, other))
    return (
        facility_location_objective(proxies, ours, targets[0]),
        facility_location_objective(proxies, theirs, targets[0]),
    )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_a_fit_on_cuda_trains_finite_weighted_coresets_and_learns_as_on_cpu(precision: str) -> None:
    callback, model = fit("cuda", precision)
    assert len(callback.steps("select")) > 1
    assert callback.batches
    assert {x.device.type for x, _ in callback.batches} == {"cuda"}
    for _, weights in callback.batches:
        assert weights.dtype == torch.float32
        assert bool(torch.isfinite(weights).all())
        assert bool((weights > 0).all())
        # Cluster sizes scaled to average 1 (see CrestCallback._pick), not the weight 1 of a random batch.
        assert float(weights.mean()) == pytest.approx(1.0, abs=1e-5)
    assert any(float(weights.std()) > 0.1 for _, weights in callback.batches)
    state = callback._quadratic.state_dict()
    tensors = [v for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]
    assert tensors
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in tensors)
    assert math.isfinite(callback._rho)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

    # The same fit on CPU (bf16 autocast exists there; float16 autocast is compared with 32-bit).
    cpu_precision = "bf16-mixed" if precision == "bf16-mixed" else "32-true"
    on_cpu, cpu_model = fit("cpu", cpu_precision)
    # The first coresets cover the first subset as well as the CPU's do. Measured on CPU, bf16 against 32-bit:
    # ratio 1.0000 at the first three selections, while the best of 20 random picks reached 0.973-0.980.
    cpu_objective, cuda_objective = first_objective(on_cpu, callback)
    assert cuda_objective >= 0.995 * cpu_objective, (cuda_objective, cpu_objective)
    # Held-out accuracy agrees within noise. Chance is 25%; these fits reach about 98.5%.
    cpu_accuracy, cuda_accuracy = accuracy(cpu_model, HELD_OUT), accuracy(model, HELD_OUT)
    assert cpu_accuracy > 0.9
    assert abs(cuda_accuracy - cpu_accuracy) < 0.03, (cuda_accuracy, cpu_accuracy)


@pytest.mark.parametrize("selection", ["crest", "random"])
def test_a_training_set_held_on_the_gpu_trains_with_labels_read_to_the_cpu(selection: str) -> None:
    # Data kept on the GPU (a common speed-up for small sets): its `targets` are CUDA tensors, and the random
    # draws index CPU tensors with the labels.
    inputs, targets = TRAIN.tensors
    dm = CrestDataModule(LabelledTensors(inputs.cuda(), targets.cuda()), batch_size=32)
    assert dm.labels.device.type == "cpu"
    assert torch.equal(dm.labels, targets)
    callback = CrestCallback(fraction=0.25, random_subset_size=0.1, selection=selection)
    model = TinyClassifier()
    make_trainer([callback], accelerator="cuda", max_epochs=2).fit(model, datamodule=dm)
    assert callback.statistics["selections"] >= 2
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_resume_on_cuda_gives_the_same_selections_and_parameters(tmp_path: Path) -> None:
    # As the CPU test in test_resume, on CUDA with deterministic kernels: any operation without a deterministic
    # CUDA kernel warns, and the warnings are reported if the runs differ.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
            full = crest()
            trainer, reference = run(full, extra=[steps], enable_checkpointing=True, accelerator="cuda")
            assert trainer.global_step == EPOCHS * STEPS
            assert len(full.selections) > 3
            start = torch.load(tmp_path / "step=12.ckpt", weights_only=True)["global_step"]
            resumed = crest()
            trainer, model = run(resumed, ckpt_path=str(tmp_path / "step=12.ckpt"), accelerator="cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    nondeterministic = sorted({str(w.message)[:120] for w in caught if "deterministic" in str(w.message)})
    assert trainer.global_step == EPOCHS * STEPS
    assert resumed.trained == [t for t in full.trained if t[0] > start], nondeterministic
    assert resumed.selections == [s for s in full.selections if s[0] > start], nondeterministic
    assert same_parameters(model, reference), nondeterministic


def test_fsdp_is_refused_in_setup() -> None:
    trainer = make_trainer([CrestCallback()], accelerator="cuda", devices=1, strategy="fsdp", max_epochs=1)
    try:
        with pytest.raises(ValueError, match="does not support FSDPStrategy"):
            trainer.fit(TinyClassifier(), datamodule=CrestDataModule(blobs(), batch_size=32))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class CudaAugmented(TinyClassifier):
    """Adds noise from the CUDA generator to every training batch on the device (a GPU augmentation)."""

    def on_after_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        if not self.trainer.training:
            return batch
        inputs, *rest = batch  # type: ignore[misc]
        noise = torch.randn(inputs.shape, device=inputs.device)
        return [inputs + 0.5 * noise, *rest]


def test_checks_see_the_same_views_from_a_random_hook_on_the_gpu() -> None:
    # The check sample's hooks run with the CUDA generator seeded too: with a zero learning rate the model predicts
    # L0 exactly, so rho is 0 only if L0 and every check see the same draw of the noise.
    torch.manual_seed(0)
    callback = Recorder(random_subset_size=0.1, check_size=16, tau=1e9)
    trainer = make_trainer([callback], accelerator="cuda", max_epochs=1)
    trainer.fit(CudaAugmented(lr=0.0), datamodule=CrestDataModule(TRAIN, batch_size=32))
    assert callback.steps("check")
    assert callback._rho == 0.0
