"""CrestDataModule: wraps a user's datasets and serves the coreset batches."""

from __future__ import annotations

import numbers
import os
import random
import reprlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Subset, default_collate
from typing_extensions import override

from lightning_crest._checks import check_flag, check_positive_int, check_seed, global_seed
from lightning_crest.distributed import release_process_group
from lightning_crest.sampler import (
    CoresetPlan,
    CoresetSampler,
    WeightedCollate,
    WeightedDataset,
    class_index,
    collated_pair,
)

# An evaluation stage's data: a dataset, a list or tuple of them (one loader each), or None; and its loaders.
EvalDatasets = Dataset[Any] | Sequence[Dataset[Any]] | None
EvalLoaders = DataLoader[Any] | list[DataLoader[Any]]


class CrestDataModule(L.LightningDataModule):
    """Serves a training set as weighted mini-batch coresets chosen by :class:`~lightning_crest.CrestCallback`.

    Training batches are ``(inputs, targets, weights)``: the dataset's collated items plus a ``(B,)`` float32
    tensor of per-example weights (mean 1 within a coreset). Without a ``CrestCallback`` on the Trainer, the module
    serves plain shuffled epochs over the whole training set with weight 1 (full-data training). Validation and
    test batches are the datasets' plain ``(inputs, targets)``.

    A new selection applies from the next batch the loader asks for. With ``num_workers=0`` that is the very next
    step; with workers, the ``prefetch_factor * num_workers`` batches already requested are trained first (the
    callback counts the selection's steps, and checks it, from its own first batch).

    Args:
        train_dataset: Map-style dataset of ``(input, target)`` items with an integer class target. Labels are read
            from its ``targets`` attribute when present (or those of the datasets under a ``Subset``, such as
            ``random_split`` returns, or a ``ConcatDataset``, when its items agree with them), else in one pass over
            the data (announced by a warning above 10,000 items).
        val_dataset: Optional validation set, served by ``val_dataloader``; a list or tuple of datasets is served
            as one loader each (Lightning passes ``dataloader_idx`` to the step), as
            ``LightningDataModule.from_datasets`` does.
        test_dataset: Optional test set (or list of them), served by ``test_dataloader``.
        batch_size: Examples per process and training step (one mini-batch coreset per step).
        num_workers: Data loader worker processes.
        eval_batch_size: Batch size of evaluation and of CREST's own forward passes; defaults to
            ``batch_size``, a size known to fit and to run efficiently (on a 2-core CPU, a small CNN's forward
            pass over 600 examples took 66 ms in batches of 128 and 91 ms in batches of 512).
        pin_memory: Pin host memory in the data loaders.
        seed: Seed of the shuffle in plain epochs, in ``[0, 2**63)``; ``None`` takes Lightning's global seed
            (``L.seed_everything``) when the loader is built, as Lightning's distributed sampler does; under DDP
            process 0's, taken when the fit starts (in :meth:`setup`: a subclass that overrides it calls
            ``super().setup(stage)``).
        predict_dataset: Optional dataset (or list of them) for ``trainer.predict``, served by
            ``predict_dataloader`` as its items come (no targets needed).
        collate_fn: Turns a list of ``(input, target)`` items into an ``(inputs, targets)`` batch, for inputs that
            :func:`~torch.utils.data.default_collate` cannot stack (text to pad, say). It must keep the items'
            order and return ``targets`` as a ``(B,)`` tensor of class indices. Used for every loader (the predict
            loader too, so its items must suit it) and for CREST's own forward passes; training batches get the
            weights appended. Defaults to ``default_collate``. Define it at module level when ``num_workers > 0``
            and processes are spawned, so that it pickles.
        prefetch_factor: Batches each loader worker reads ahead (``None``: torch's default, 2). A selection applies
            after the ``prefetch_factor * num_workers`` training batches already read, so a smaller value makes
            it apply sooner.
        persistent_workers: Keep the loader workers between epochs (``None``: whenever ``num_workers > 0``).

    Raises:
        TypeError: If ``train_dataset`` is not a map-style dataset of ``(input, target)`` pairs with integer
            targets, another dataset is not a dataset (a ``DataLoader`` or a path, say), or ``collate_fn`` is not
            callable.
        ValueError: If ``train_dataset`` is empty, a batch size or ``prefetch_factor`` is not a positive int,
            ``num_workers`` not a non-negative one, ``seed`` not an int in ``[0, 2**63)`` or None, ``pin_memory`` or
            ``persistent_workers`` not a bool, or a worker option is set without workers. The labels are read when
            first needed (:attr:`labels`, at the start of a fit with the callback): a ``targets`` attribute that is
            not one class index per example is refused then.

    Example::

        dm = CrestDataModule(train_set, val_set, batch_size=128, num_workers=2)
        trainer = L.Trainer(max_epochs=200, callbacks=[CrestCallback(fraction=0.1)])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        train_dataset: Dataset[Any],
        val_dataset: EvalDatasets = None,
        test_dataset: EvalDatasets = None,
        batch_size: int = 128,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        seed: int | None = None,
        predict_dataset: EvalDatasets = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        prefetch_factor: int | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.pin_memory = pin_memory
        self.seed = seed
        self.collate_fn = collate_fn
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers
        self.test_dataset = test_dataset
        self.predict_dataset = predict_dataset
        self._check_settings()
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.plan = CoresetPlan()
        self.steps_per_epoch: int | None = None
        # Lightning's global seed on process 0 as the last fit under DDP started (see setup).
        self._process_0_seed: int | None = None

    def _check_settings(self) -> None:
        """Refuse settings that cannot work, naming the argument. Run when the data module is built and again when a
        fit or a training loader needs them, so that a setting changed on the instance since is checked too (the
        training and validation sets are checked as they are set)."""
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("eval_batch_size", self.eval_batch_size)
        num_workers = self.num_workers
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative int, got {num_workers!r}.")
        if self.seed is not None:
            check_seed(self.seed)
            self.seed = int(self.seed)  # torch's sampler seeds with a Python int only
        check_flag("pin_memory", self.pin_memory)
        if self.prefetch_factor is not None:
            check_positive_int("prefetch_factor", self.prefetch_factor)
        if self.persistent_workers is not None:
            check_flag("persistent_workers", self.persistent_workers)
        for name, value in (
            ("prefetch_factor", self.prefetch_factor),
            ("persistent_workers", self.persistent_workers),
        ):
            if num_workers == 0 and value not in (None, False):
                raise ValueError(
                    f"`{name}`={value!r} applies to loader workers, but `num_workers` is 0; pass num_workers > 0, "
                    f"or leave `{name}` at None."
                )
        if self.collate_fn is not None and not callable(self.collate_fn):
            raise TypeError(f"`collate_fn` must be callable or None, got {self.collate_fn!r}.")
        for name in ("test_dataset", "predict_dataset"):
            _check_eval_dataset(name, getattr(self, name))

    @property
    def train_dataset(self) -> Dataset[Any]:
        """The training set: map-style, of ``(input, target)`` items with integer class targets."""
        return self._train_dataset

    @train_dataset.setter
    def train_dataset(self, dataset: Dataset[Any]) -> None:
        _check_item(dataset)
        self._train_dataset = dataset
        self._labels: Tensor | None = None  # read again from the new set when asked for

    @property
    def val_dataset(self) -> EvalDatasets:
        """The validation set (or list of them), or None for no validation."""
        return self._val_dataset

    @val_dataset.setter
    def val_dataset(self, dataset: EvalDatasets) -> None:
        _check_eval_dataset("val_dataset", dataset)
        self._val_dataset = dataset
        # Lightning validates only when `val_dataloader` is overridden. Without a validation set the instance gets a
        # stand-in that Lightning takes for the base class's method, so a fit skips validation as with any data module
        # that has none (a subclass with its own `val_dataloader` keeps it).
        if dataset is None and type(self).val_dataloader is CrestDataModule.val_dataloader:
            self.val_dataloader = _NoValidationLoader(self)  # type: ignore[method-assign]
        else:
            self.__dict__.pop("val_dataloader", None)

    @property
    def labels(self) -> Tensor:
        """``(n,)`` int64 class of every training example, on the CPU (whatever the device of the data)."""
        if self._labels is None:
            self._labels = _read_labels(self.train_dataset)
        return self._labels

    def use_plan(self, steps_per_epoch: int | None) -> None:
        """Serve ``steps_per_epoch`` batches per epoch from :attr:`plan` (``None``: plain full epochs)."""
        self.steps_per_epoch = steps_per_epoch

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        self._check_settings()
        trainer = self.trainer
        num_replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        planned = self.steps_per_epoch is not None
        sampler = CoresetSampler(
            self.train_dataset,
            self.batch_size,
            num_replicas=num_replicas,
            rank=rank,
            plan=self.plan if planned else None,
            steps_per_epoch=self.steps_per_epoch,
            seed=0 if planned else self._shuffle_seed(),  # a plan does not shuffle
        )
        if trainer is not None:  # Lightning sets it later, and workers may start reading before
            sampler.set_epoch(trainer.current_epoch)
        return DataLoader(
            WeightedDataset(self.train_dataset),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=None if self.collate_fn is None else WeightedCollate(self.collate_fn),
            **self._loader_options(),
        )

    @override
    def setup(self, stage: str) -> None:
        # Lightning calls this on every process as a fit starts: process 0's seed, a collective, is taken here, so
        # that a hook that builds the training loader on one process alone (a progress display under
        # `rank_zero_only`, say) does not wait for the others.
        trainer = self.trainer
        if stage == "fit" and self.seed is None and trainer is not None and trainer.world_size > 1:
            self._process_0_seed = global_seed(trainer)

    def _shuffle_seed(self) -> int:
        """The seed of plain epochs: ``seed``, else Lightning's global seed, process 0's under DDP."""
        if self.seed is not None:
            return self.seed
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return global_seed()
        if self._process_0_seed is None:  # a subclass's `setup` did not call this one
            return global_seed(trainer)
        return self._process_0_seed

    @override
    def val_dataloader(self) -> EvalLoaders:
        return self._stage_loader("val")

    @override
    def test_dataloader(self) -> EvalLoaders:
        return self._stage_loader("test")

    @override
    def predict_dataloader(self) -> EvalLoaders:
        return self._stage_loader("predict")

    def _stage_loader(self, stage: str) -> EvalLoaders:
        self._check_settings()
        dataset = getattr(self, f"{stage}_dataset")
        if dataset is None:
            raise MisconfigurationException(
                f"CrestDataModule was created without a `{stage}_dataset`; pass one to use `{stage}_dataloader`."
            )
        if _is_list_of_datasets(dataset):
            return [self._eval_loader(part) for part in dataset]
        return self._eval_loader(dataset)

    def _eval_loader(self, dataset: Dataset[Any]) -> DataLoader[Any]:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            **self._loader_options(),
        )

    def _loader_options(self) -> dict[str, Any]:
        persistent = self.num_workers > 0 if self.persistent_workers is None else self.persistent_workers
        options: dict[str, Any] = {"pin_memory": self.pin_memory, "persistent_workers": persistent}
        if self.prefetch_factor is not None:
            options["prefetch_factor"] = self.prefetch_factor
        return options

    @override
    def teardown(self, stage: str) -> None:
        if self.trainer is not None:
            release_process_group(self.trainer)

    def fetch(self, indices: Sequence[int], seed: int | None = None) -> Any:
        """Collate the training items at ``indices`` into one ``(inputs, targets)`` batch on the CPU.

        With ``seed``, each item is read with torch's, NumPy's and Python's global generators (those that random
        transforms draw from) seeded from ``seed`` and its index, and the generators are restored afterwards: the
        same items fetched with the same seed come back as the same views, whatever else is fetched with them.

        An item that fails to load raises the dataset's own error, with a note of the index when known.
        """
        if seed is not None:
            with restored_generators():  # a collate that draws random numbers is seeded by the last item
                return self._collate([self._item(index, item_seed(seed, index)) for index in indices])
        if hasattr(self.train_dataset, "__getitems__"):
            return self._collate(
                [(x, class_index(y)) for x, y in self.train_dataset.__getitems__(list(indices))]
            )
        return self._collate([self._item(index) for index in indices])

    def _collate(self, items: list[tuple[Any, Any]]) -> Any:
        return default_collate(items) if self.collate_fn is None else collated_pair(self.collate_fn, items)

    def _item(self, index: int, seed: int | None = None) -> tuple[Any, Any]:
        try:
            if seed is not None:
                seed_generators(seed)
            x, y = self.train_dataset[index]
        except Exception as error:
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(f"CREST failed to load training item {index} while scoring examples.")
            raise
        return x, class_index(y)


class _NoValidationLoader:
    """``val_dataloader`` of a data module without a validation set.

    Lightning's test of an override unwraps ``__wrapped__``, so it sees the base class's method and a fit skips
    validation; asked for a loader (``trainer.validate``), it raises the data module's message. ``__wrapped__`` is a
    class attribute so that it survives multiprocessing's pickling (``ddp_spawn``), which rebuilds a ``partial``
    without its attributes.
    """

    __wrapped__ = L.LightningDataModule.val_dataloader

    def __init__(self, dm: CrestDataModule) -> None:
        self.dm = dm

    def __call__(self) -> EvalLoaders:
        return self.dm._stage_loader("val")


@contextmanager
def restored_generators(device: torch.device | None = None) -> Iterator[None]:
    """Restore torch's (CPU, and ``device``'s if a CUDA device), NumPy's and Python's global generators on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    devices = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002


def seed_generators(seed: int, device: torch.device | None = None) -> None:
    """Seed the global generators that random transforms draw from: torch's (CPU, and ``device``'s if a CUDA
    device), NumPy's and Python's."""
    torch.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed >> 32)  # noqa: NPY002


@contextmanager
def seeded_generators(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the global generators seeded from ``seed`` (see :func:`seed_generators`), restored after."""
    with restored_generators(device):
        seed_generators(seed, device)
        yield


def item_seed(seed: int, index: int) -> int:
    """A 64-bit seed for item ``index`` under ``seed`` (SplitMix64's finaliser of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + index) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_MASK64 = (1 << 64) - 1


def _check_not_a_loader_or_path(name: str, dataset: object) -> None:
    if isinstance(dataset, DataLoader):
        raise TypeError(f"`{name}` must be a dataset, got a DataLoader; pass its `.dataset`.")
    if isinstance(dataset, (list, tuple)) and any(isinstance(part, DataLoader) for part in dataset):
        raise TypeError(
            f"`{name}` must be a dataset or a list of datasets, got a {type(dataset).__name__} of DataLoaders; "
            "pass their `.dataset`s."
        )
    if isinstance(dataset, (str, bytes, os.PathLike)):
        raise TypeError(
            f"`{name}` must be a dataset, got the {type(dataset).__name__} {dataset!r} (a path?); build the dataset "
            "from it and pass that."
        )


def _is_list_of_datasets(dataset: object) -> bool:
    """A list or tuple of datasets (one loader each), not a list of items (one dataset)."""
    return (
        isinstance(dataset, (list, tuple))
        and len(dataset) > 0
        and all(isinstance(part, Dataset) for part in dataset)
    )


def _check_eval_dataset(name: str, dataset: object) -> None:
    _check_not_a_loader_or_path(name, dataset)
    if dataset is not None and not (hasattr(dataset, "__getitem__") or hasattr(dataset, "__iter__")):
        raise TypeError(
            f"`{name}` must be a dataset or None, got {type(dataset).__name__} {dataset!r}"
            + ("; pass the batch size as `batch_size=`." if isinstance(dataset, int) else ".")
        )


def _check_item(dataset: Dataset[Any]) -> None:
    _check_not_a_loader_or_path("train_dataset", dataset)
    not_map_style = TypeError(
        f"`train_dataset` must be a map-style dataset with a length, got {type(dataset).__name__}: CREST reads "
        "the examples it picks by index."
    )
    if isinstance(dataset, IterableDataset):
        raise not_map_style
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise not_map_style from None
    if size == 0:
        raise ValueError("`train_dataset` is empty.")
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            f"`train_dataset` items must be (input, target) pairs, got {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            + " for item 0. Wrap the dataset so that it returns (input, target)."
        )
    if not _is_class_index(item[1]):
        raise TypeError(
            f"`train_dataset` targets must be integer class indices (scalars), got {item[1]!r} for item 0. CREST "
            "selects within classes, so it trains classifiers only; map the targets to class indices (for "
            "example with the dataset's `target_transform`)."
        )


def _is_class_index(target: Any) -> bool:
    if isinstance(target, Tensor):  # a scalar: a target of shape (1,) would collate to (B, 1)
        return target.ndim == 0 and not target.is_floating_point() and target.dtype != torch.bool
    # Python and numpy integers (numpy's are not `int`, and numpy's bools are not Integral)
    return isinstance(target, numbers.Integral) and not isinstance(target, bool)


def _parent_targets(dataset: Dataset[Any]) -> Tensor | None:
    """The targets of the datasets under a (nested) :class:`~torch.utils.data.Subset` or
    :class:`~torch.utils.data.ConcatDataset`, for its items."""
    if isinstance(dataset, Subset):
        parent = _targets_of(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        parts = []
        for part in dataset.datasets:
            targets = _targets_of(part)
            if targets is None or len(targets) != len(part):  # type: ignore[arg-type]
                return None
            parts.append(targets)
        return torch.cat(parts) if parts else None
    return None


def _targets_of(dataset: Dataset[Any]) -> Tensor | None:
    """A dataset's own ``targets``, else those of the datasets under it; None unless a 1-d integer sequence."""
    found = getattr(dataset, "targets", None)
    try:
        targets = torch.as_tensor(found) if found is not None else _parent_targets(dataset)
    except (TypeError, ValueError, RuntimeError):
        return None
    if targets is None or targets.ndim != 1 or targets.is_floating_point():
        return None
    return targets


def _first_disagreement(dataset: Dataset[Any], labels: Tensor) -> int | None:
    """A `target_transform` changes the items' targets but not a `targets` attribute: spot-check a few items."""
    size = len(labels)
    for index in sorted({0, size // 2, size - 1}):
        if int(dataset[index][1]) != int(labels[index]):
            return index
    return None


# Items whose labels are read one by one without a warning.
_SILENT_LABEL_PASS = 10_000


def _read_labels(dataset: Dataset[Any]) -> Tensor:
    size = len(dataset)  # type: ignore[arg-type]
    targets = getattr(dataset, "targets", None)
    from_attribute = targets is not None
    if targets is None:
        # A split of a labelled dataset: its parent's targets, unless a `target_transform` changes them.
        targets = _parent_targets(dataset)
        if targets is not None and _first_disagreement(dataset, targets) is not None:
            targets = None
    if targets is None:
        if size > _SILENT_LABEL_PASS:
            rank_zero_warn(
                f"`train_dataset` ({type(dataset).__name__}) has no `targets` attribute: CREST reads the class of "
                f"each of its {size} items once, now, loading and transforming every item. Give it a `targets` "
                "attribute, the class index of every item in order, to skip that pass."
            )
        targets = [dataset[i][1] for i in range(size)]
        for index, target in enumerate(targets):
            if not _is_class_index(target):
                raise TypeError(
                    f"`train_dataset` targets must be integer class indices (scalars), got {target!r} for item "
                    f"{index}. Make every item's target a class index."
                )
        targets = [int(target) for target in targets]
    # On the CPU whatever the data's device: selection indexes CPU tensors with it.
    try:
        labels = torch.as_tensor(targets).cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"`train_dataset.targets` must be a 1-d sequence of integer classes; torch cannot read "
            f"{reprlib.repr(targets)} as one ({error}). Make it hold the class indices the items return."
        ) from error
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim != 1:
        raise TypeError(
            f"`train_dataset.targets` must be a 1-d sequence of integer classes, got dtype {labels.dtype} and "
            f"shape {tuple(labels.shape)}. Make it hold the class index of each item (one-hot rows: their argmax; "
            "whole-number floats: `.long()`)."
        )
    if int(labels.min()) < 0:
        raise ValueError(
            f"`train_dataset` targets must be non-negative class indices, got {int(labels.min())}; number the "
            "classes from 0 (for example with the dataset's `target_transform`, and its `targets` attribute if any)."
        )
    if from_attribute:
        if len(labels) != size:
            raise ValueError(
                f"`train_dataset.targets` has {len(labels)} labels for {size} items; they must match one to one."
            )
        wrong = _first_disagreement(dataset, labels)
        if wrong is not None:
            raise ValueError(
                f"`train_dataset.targets[{wrong}]` is {int(labels[wrong])} but item {wrong} has target "
                f"{int(dataset[wrong][1])} (a `target_transform`?). CREST selects by the `targets` attribute: "
                "make it hold the targets the items return."
            )
    return labels.long()
