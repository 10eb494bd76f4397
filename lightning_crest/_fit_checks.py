"""CrestCallback's refusals of, and warnings about, Trainer and data-module settings it cannot train under (each
names the setting and the fix)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    GradientAccumulationScheduler,
    LearningRateFinder,
)
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_crest.datamodule import CrestDataModule
from lightning_crest.sampler import MAX_READ_AHEAD, CoresetSampler

_UNSUPPORTED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def crest_data_module(trainer: L.Trainer) -> CrestDataModule:
    """The Trainer's data module, which must be a :class:`CrestDataModule`."""
    dm = getattr(trainer, "datamodule", None)
    if not isinstance(dm, CrestDataModule):
        raise TypeError(
            "CrestCallback needs its batches from a CrestDataModule: call "
            f"trainer.fit(model, datamodule=CrestDataModule(train_set, ...)); got datamodule={type(dm).__name__}."
        )
    return dm


def check_trainer(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Refuse gradient accumulation, the tuners, ``overfit_batches``, manual optimization and sharded strategies."""
    check_accumulation(trainer)
    for other in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(other, (LearningRateFinder, BatchSizeFinder)):
            tuner = "lr_find" if isinstance(other, LearningRateFinder) else "scale_batch_size"
            raise ValueError(
                f"{type(other).__name__} (which Tuner.{tuner} adds too) runs its search steps without the other "
                "callbacks: CREST would neither check nor re-select, and the search would train on one "
                "selection's coresets. Tune in a run without CrestCallback (the data module then serves full "
                "shuffled epochs) and set the value found on the module or the data module."
            )
    overfit = getattr(trainer, "overfit_batches", 0)  # set by the Trainer, not declared
    if overfit > 0:
        raise ValueError(
            f"`overfit_batches`={overfit} replaces the coreset sampler with the first batches "
            "of the training set, so CREST would select nothing. Remove CrestCallback to overfit a few batches."
        )
    if not pl_module.automatic_optimization:
        raise ValueError(
            "CrestCallback supports automatic optimization with one optimizer only: it measures one optimizer "
            "step per batch. Set `self.automatic_optimization = True` in the LightningModule and return a single "
            "optimizer from `configure_optimizers`."
        )
    if isinstance(trainer.strategy, _UNSUPPORTED_STRATEGIES):
        raise ValueError(
            f"CrestCallback does not support {type(trainer.strategy).__name__} (sharded parameters "
            "break its quadratic model); use 'ddp', 'ddp_spawn' or 'ddp_notebook'."
        )


def check_data_module(dm: CrestDataModule, n: int, world_size: int) -> None:
    """Refuse a training set smaller than one global batch, and more read-ahead than the plan keeps."""
    global_batch = dm.batch_size * world_size
    if n < global_batch:
        raise ValueError(
            f"The training set has {n} examples, fewer than one global batch of {global_batch} "
            f"(batch_size={dm.batch_size} x {world_size} processes); lower the data module's "
            "`batch_size`."
        )
    # Workers' batches plus the one Lightning fetches ahead: a new loader must be given them back in order.
    ahead = dm.num_workers * (dm.prefetch_factor or 2) + 1
    if dm.num_workers > 0 and ahead > MAX_READ_AHEAD:
        raise ValueError(
            f"CrestDataModule(num_workers={dm.num_workers}, prefetch_factor={dm.prefetch_factor}) reads "
            f"{ahead} batches ahead of training, more than the {MAX_READ_AHEAD} that CREST keeps to serve again "
            "when a loader is rebuilt; lower `prefetch_factor` or `num_workers`."
        )


def check_proxy_dtype(proxy_dtype: torch.dtype | None, trainer: L.Trainer) -> None:
    """Refuse a ``proxy_dtype`` that autocast cannot apply on the Trainer's device and precision."""
    if proxy_dtype is None:
        return
    # Lightning moves the module to its device after `setup`: the strategy knows where it will train.
    device_type = trainer.strategy.root_device.type
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(
            f"`proxy_dtype`={proxy_dtype} needs autocast, which torch does not offer on "
            f"{device_type!r} devices; pass proxy_dtype=None."
        )
    if str(trainer.precision).startswith("64"):
        raise ValueError(
            f"`proxy_dtype`={proxy_dtype} has no effect under precision={trainer.precision!r}: autocast "
            "leaves float64 untouched. Pass proxy_dtype=None."
        )


def check_epoch_settings(trainer: L.Trainer, steps_per_epoch: int, fraction: float) -> None:
    """Warn about step limits that miscount CREST's short epochs, and refuse a validation interval longer than one."""
    if trainer.max_steps != -1 and trainer.max_epochs in (None, -1):
        rank_zero_warn(
            f"`max_steps`={trainer.max_steps} without `max_epochs` trains that many coreset steps, over epochs "
            f"of {steps_per_epoch} steps ({fraction} of a full epoch): if it is the step count of full "
            "training, the run costs as much as full training. Set `max_epochs` to full training's epochs, "
            f"or `max_steps` to {fraction} of its steps."
        )
    interval = trainer.val_check_interval
    if (
        isinstance(interval, int)
        and trainer.check_val_every_n_epoch is not None
        and interval > steps_per_epoch
    ):
        raise ValueError(
            f"`val_check_interval`={interval} steps is longer than CREST's epochs of {steps_per_epoch} steps "
            f"({fraction} of a full epoch). Lower it, or pass `check_val_every_n_epoch=None` to count the "
            "steps across epochs."
        )
    limit = trainer.limit_train_batches
    if (
        limit is not None
        and not getattr(trainer, "fast_dev_run", False)  # set by the Trainer, not declared
        # 0 turns training off (validation only), which cuts nothing short.
        and limit > 0
        and (limit < steps_per_epoch if isinstance(limit, int) else limit < 1.0)
    ):
        rank_zero_warn(
            f"`limit_train_batches`={limit} cuts CREST's epochs of ceil(fraction * n / batch) steps short: the run "
            "trains fewer backprops than `fraction` of full training. Lower `fraction` or `max_epochs` instead."
        )


def check_loader(trainer: L.Trainer, dm: CrestDataModule) -> None:
    """Refuse a training loader that does not read the plan: it would train on other batches, unbudgeted."""
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, CoresetSampler) and sampler.plan is None:
        assert loader is not None
        raise RuntimeError(
            f"The training loader was built before CrestCallback's setup planned its epochs, so it serves full "
            f"epochs of {len(loader)} batches: the data module's own `setup`, or a callback's listed before "
            "CrestCallback, read `trainer.estimated_stepping_batches` or `trainer.train_dataloader` (and any "
            "schedule sized from it counted full epochs). List CrestCallback first in `Trainer(callbacks=[...])`, "
            "and read them in the LightningModule's `configure_optimizers`, not in the data module's `setup`."
        )
    if not (isinstance(sampler, CoresetSampler) and sampler.plan is dm.plan):
        raise TypeError(
            f"The training loader of {type(dm).__name__} does not read CREST's coresets (its sampler is "
            f"{type(sampler).__name__}): the run would train on other batches, without the budget. Keep "
            "CrestDataModule's `train_dataloader` (pass a `collate_fn` to it for custom batching)."
        )
    if getattr(loader, "batch_size", None) != sampler.batch_size:
        # A loader rebuilt around the sampler (for a `worker_init_fn`, say) with a batch size of its own.
        raise ValueError(
            f"The training loader of {type(dm).__name__} batches {getattr(loader, 'batch_size', None)!r} examples "
            f"per step, but CREST's coresets give each process {sampler.batch_size} (`batch_size`): every step "
            "would train part of a coreset, or several. Build the loader around the sampler with "
            "`batch_size=datamodule.batch_size`."
        )


def check_accumulation_schedule(trainer: L.Trainer) -> None:
    """Refuse a ``GradientAccumulationScheduler`` that will raise the accumulation in this fit's epochs, before
    its first step (:func:`check_accumulation`, at every step, refuses it anyway when it does: this saves the epochs
    before).

    Under ``max_steps`` the epochs are counted as if the fit started at an epoch's first step: never more than it
    runs (a fit resumed inside an epoch may reach one more, where the schedule is refused when it applies).
    """
    start, ends = trainer.current_epoch, []  # after a restore: the epoch it resumes
    if trainer.max_epochs not in (None, -1):
        ends.append(trainer.max_epochs)
    length = trainer.num_training_batches
    if trainer.max_steps != -1 and 0 < length < math.inf:
        steps = max(0, trainer.max_steps - trainer.global_step)
        ends.append(start + math.ceil(steps / length))
    end = min(ends, default=math.inf)
    for other in trainer.callbacks:  # type: ignore[attr-defined]
        if not isinstance(other, GradientAccumulationScheduler):
            continue
        epochs = sorted(other.scheduling)
        for first, last in zip(epochs, [*epochs[1:], math.inf]):  # each factor holds until the next
            factor = other.scheduling[first]
            if factor != 1 and first < end and last > start:
                raise ValueError(
                    f"CrestCallback trains one weighted coreset per optimizer step; the "
                    f"GradientAccumulationScheduler sets `accumulate_grad_batches`={factor} from epoch "
                    f"{max(first, start)}, which would merge coresets. Remove it, and raise the batch size "
                    "instead."
                )


def check_accumulation(trainer: L.Trainer) -> None:
    """Refuse gradient accumulation, which would merge coresets."""
    # An epoch without backward passes merges no coresets, whatever the accumulation (SWA raises it to the epoch).
    if trainer.accumulate_grad_batches != 1 and not without_backward(trainer):
        raise ValueError(
            f"CrestCallback trains one weighted coreset per optimizer step; `accumulate_grad_batches`="
            f"{trainer.accumulate_grad_batches} would merge coresets. Raise the batch size instead."
        )


def without_backward(trainer: L.Trainer) -> bool:
    """An epoch without backward passes, such as StochasticWeightAveraging's pass that recomputes the BatchNorm
    statistics of the averaged weights (Lightning's flag, read defensively)."""
    return bool(getattr(trainer.fit_loop, "_skip_backward", False))


def add_batch_notes(exception: BaseException, *, probed_tuple_weights: bool) -> None:
    """Explain two errors that a training step raises when it handles CREST's weighted batches as it should not:
    unpacking two values, and changing in place the weights that ``probed_tuple_weights`` made require grad."""
    if (
        isinstance(exception, ValueError)
        and "too many values to unpack (expected 2" in str(exception)  # ", got 3)" from Python 3.14
        and hasattr(exception, "add_note")  # Python 3.11+
    ):
        exception.add_note(
            "CrestDataModule's training batches are (inputs, targets, weights): unpack "
            "`inputs, targets, weights = batch` in `training_step` (and in batch hooks that unpack them) and weight "
            "each example's loss, as `weighted_cross_entropy(logits, targets, weights)` does."
        )
    if (
        probed_tuple_weights
        and "leaf Variable that requires grad" in str(exception)
        and hasattr(exception, "add_note")  # Python 3.11+
    ):
        exception.add_note(
            "CrestCallback made the first batch's weights require grad, to check that the loss uses them; the "
            "batch is a tuple (as a batch-transfer hook returned it), so they could not be given as a copy and "
            "an in-place change to them fails. Change them out of place in the step "
            "(`weights = weights / weights.mean()`), or return a list from the hook."
        )


def is_weighted_batch(batch: Any) -> bool:
    """Whether ``batch`` has the ``(inputs, targets, weights)`` form that CrestDataModule serves."""
    return isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[2], Tensor)


def check_transferred(batch: Any, given: Tensor) -> None:
    """Refuse what the batch-transfer hooks returned for a batch of targets ``given`` (on the CPU) unless it is an
    ``(inputs, targets, weights)`` batch with those targets, in their order."""
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 3
        and isinstance(batch[1], Tensor)
        and torch.equal(batch[1].cpu(), given)
    ):
        return
    sequence = isinstance(batch, (tuple, list))
    got = type(batch).__name__ + (f" of length {len(batch)}" if sequence else "")
    if sequence and len(batch) == 3:
        got += " whose targets are not the ones given, in their order"
    raise TypeError(
        "CREST scores its examples as training batches, through the batch-transfer hooks "
        "(`on_before_batch_transfer`, `transfer_batch_to_device`, `on_after_batch_transfer`), which must "
        "return an (inputs, targets, weights) batch with the targets they got, in their order; got "
        f"{got}. Keep that structure and order in the hooks (return the transformed inputs as the first "
        "item): each row must stay paired with the example CREST picked."
    )


def check_logits(logits: object, count: int, num_classes: int) -> None:
    """Refuse what ``compute_logits`` returned for ``count`` examples unless it is ``(count, C)`` class logits with
    ``C`` at least 2 and at least ``num_classes``."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or len(logits) != count:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"`compute_logits` must return class logits of shape ({count}, num_classes) for a batch "
            f"of {count} examples, got {shape}. Override CrestCallback.compute_logits if the "
            "module's forward returns something else."
        )
    if logits.shape[1] == 1:
        raise ValueError(
            "`compute_logits` returned 1 logit per example: CREST's gradient proxies are those of softmax "
            "cross-entropy, which is constant over a single logit. Give a binary classifier two logits (one per "
            "class) and a cross-entropy loss."
        )
    if logits.shape[1] < num_classes:
        raise ValueError(
            f"`compute_logits` returned {logits.shape[1]} logits per example but the training set has "
            f"{num_classes} classes (its labels, class indices from 0, go up to {num_classes - 1}). "
            "Return one logit per class, or number the classes from 0."
        )


def warn_on_probabilities(logits: Tensor) -> None:
    """Warn when ``compute_logits`` returned probabilities (every row in [0, 1], summing to 1) instead of logits."""
    with torch.no_grad():
        rows = logits.detach().float()
        # Within the rounding of the dtype they came in (a bf16 softmax sums to 1 within about 1e-2), and
        # of a float32 softmax over many classes.
        eps = torch.finfo(logits.dtype).eps if logits.is_floating_point() else 0.0
        tolerance = 8 * (eps + torch.finfo(torch.float32).eps * math.sqrt(rows.shape[1]))
        probabilities = len(rows) > 1 and bool(
            (rows >= 0).all() and (rows <= 1).all() and ((rows.sum(1) - 1).abs() <= tolerance).all()
        )
    if probabilities:
        rank_zero_warn(
            "`compute_logits` returned probabilities (every row in [0, 1], summing to 1), but CREST applies "
            "softmax to what it returns, as cross-entropy does to logits: its gradient proxies and losses "
            "would describe another model. Return the logits from `forward` (before softmax), or override "
            "CrestCallback.compute_logits to return them (or their log)."
        )


def check_losses(losses: object, targets: Tensor, logits: Tensor) -> None:
    """Refuse what ``per_example_loss`` returned unless it is one loss per target, of the targets' shape, finite
    where the logits are and not negative."""
    if not isinstance(losses, Tensor) or losses.shape != targets.shape:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"`per_example_loss` must return one loss per example, shape ({len(targets)},) for a batch of "
            f"{len(targets)}, got {shape}. Return the loss unreduced and flattened per example "
            "(reduction='none')."
        )
    if losses.numel() == 0:
        return
    with torch.no_grad():
        # One read from the device for the three values.
        finite_losses, finite_logits, lowest = torch.stack(
            [torch.isfinite(losses).all(), torch.isfinite(logits).all(), losses.min()]
        ).tolist()
        # Non-finite logits are the model's (training diverged), reported where they are used.
        if finite_logits and not finite_losses:
            raise ValueError(
                "`per_example_loss` returned non-finite losses for finite logits: the loss function, not "
                "training, is at fault. Return a finite loss per example."
            )
        if lowest < -1e-6:
            raise ValueError(
                f"`per_example_loss` returned a negative loss ({lowest:.4g}): CREST's check is relative to the "
                "loss, and an example counts as learned when its losses stay at or under `drop_threshold`. "
                "Return a non-negative loss per example (cross-entropy, say)."
            )
