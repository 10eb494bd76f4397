"""CrestCallback: when to select coresets, check the quadratic model and drop learned examples."""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from fractions import Fraction
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from typing_extensions import override

from lightning_crest._checks import (
    check_finite,
    check_flag,
    check_positive_int,
    check_range,
    check_seed,
    conversion_hint,
    global_seed,
)
from lightning_crest._fit_checks import (
    add_batch_notes,
    check_accumulation,
    check_accumulation_schedule,
    check_data_module,
    check_epoch_settings,
    check_loader,
    check_logits,
    check_losses,
    check_proxy_dtype,
    check_trainer,
    check_transferred,
    crest_data_module,
    is_weighted_batch,
    warn_on_probabilities,
    without_backward,
)
from lightning_crest._modules import compiled, eval_mode, inputs_of, last_owner, swapped
from lightning_crest.datamodule import CrestDataModule, item_seed, restored_generators, seeded_generators
from lightning_crest.distributed import (
    batch_share,
    broadcast_from_first,
    gather_shares,
    mean_over_processes,
    share,
)
from lightning_crest.pool import learned_examples, sampled_class_budgets, stratified_quotas
from lightning_crest.quadratic import QuadraticModel, hutchinson_diagonal, rademacher_like, relative_error
from lightning_crest.sampler import CoresetSampler
from lightning_crest.selection import facility_location, gradient_proxy, last_layer_sketch

_PHASES = ("proxies", "greedy", "hessian", "checks", "exclusion")
# Largest `interval_mul` and `coreset_mul`: each selection plans P = b T1 random subsets of r indices, T1 >= h.
_MAX_MUL = 1000
# Most classes: labels beyond are ids, not class indices (CREST counts every class in every random subset).
_MAX_CLASSES = 1 << 24
# Largest `embedding_proxy`: the sketch's values per example, beside the logits' gradient.
_MAX_SKETCH = 1 << 16
# The keys of a saved state that only a fit reads, when it takes the state (see _apply_restored_plan).
_TAKEN_BY_A_FIT = (
    "epoch_started",
    "epoch_ended",
    "plan_indices",
    "plan_weights",
    "plan_cursor",
    "in_flight_indices",
    "in_flight_weights",
    "global_batch",
    "steps_per_epoch",
    "fraction",
    "selection",
    "seed",
)
# Steps on which the check that the loss weights each example may stay undecided before it gives up with a warning.
_WEIGHT_CHECK_STEPS = 20


class CrestCallback(Callback):
    """Train on weighted mini-batch coresets under a budget (CREST, Yang et al., ICML 2023).

    Every epoch has ``ceil(fraction * n / global_batch)`` steps, so a run of ``max_epochs`` epochs costs
    ``fraction`` of full training's backprops and epoch-based schedules keep working. Each step trains on one
    mini-batch coreset: ``global_batch`` examples picked by facility location on gradient proxies from a random
    subset of the pool, with cluster-size weights. At each selection the callback plans ``P`` coresets, each from its
    own random subset (the first ``hessian_probes`` picked at once, the others when first reached), and builds a
    quadratic model of the loss. Every ``T1`` steps it compares the model's prediction with the loss on a random
    check sample drawn at the selection; when the relative error exceeds ``tau`` it selects again. After every
    re-selection ``T1 = ceil(interval_mul * ||H_ref|| / ||H_t||)`` and ``P = coreset_mul * T1``, where ``H_ref`` is
    the sharpest smoothed curvature met so far (the paper uses the first; see ``_adapted_interval``). Every
    ``drop_interval`` epochs, examples whose losses recorded in the window (on the random subsets and the check
    samples) all stayed at or under ``drop_threshold`` leave the pool of future random subsets.

    The callback needs a :class:`~lightning_crest.CrestDataModule`, whose training batches are
    ``(inputs, targets, weights)``; the module's loss must use the weights (see
    :func:`~lightning_crest.weighted_cross_entropy`).

    Args:
        fraction: Share of full training's backprops to spend, in ``(0, 1]``.
        random_subset_size: Size ``r`` of each random subset: a fraction of the training set (float) or a count
            (int). A fraction never yields fewer examples than the global batch. Where a coreset has at most one
            pick per class (small batches, many classes), keep it near two to three times the global batch: a
            pick standing for many examples is its class's most central one, and CREST can then under-fit (the
            fit warns above three times).
        tau: Tolerance of the quadratic model's relative error before re-selecting.
        check_size: Examples of the check sample, on which the loss is measured at the selection and at every check
            (the same examples both times), at most ``r``; ``None`` checks on ``r`` examples (the paper). Each
            check is a forward pass over them, every ``T1`` steps.
        check_sample: Where the check sample comes from. ``"independent"``: a class-stratified random draw of its
            own from the pool, scored at the selection beside the random subsets (one forward pass over
            ``check_size`` examples per selection). ``"subset"``: a random part of the first random subset, scored
            in the same pass at no extra cost; but that subset's coreset is trained on, so part of the sample
            (``check_size * batch / r`` examples on average) is trained on too, and its loss falls faster than
            the loss the model describes.
        interval_mul: ``h``, scale of the adaptive check interval ``T1``.
        coreset_mul: ``b``, coresets per selection per step of ``T1``. Unlike the paper, ``P`` is not capped by the
            steps left in the epoch: a selection carries over the epoch's end, and the coresets beyond the
            ``hessian_probes`` picked at the selection are picked only when first reached, so unused ones cost
            only their random subsets' indices (``P * r`` of them, which bounds ``b`` and ``h`` at 1000).
        drop_learned: Exclude learned examples from future random subsets.
        drop_threshold: ``alpha``, the loss at or under which an example counts as learned.
        drop_interval: ``T2``, epochs per exclusion window.
        min_pool_fraction: Never shrink the pool below this fraction of the training set.
        min_class_fraction: Never shrink a class below this fraction of its size.
        hessian_params: Parameters of the quadratic model: ``"all"``, or ``"last_layer"`` (the last module with
            trainable parameters, in registration order) for large models; a fit warns once when that module's
            output is not the logits.
        hessian_probes: Coreset batches that update the quadratic model at each selection (their gradients, and a
            Hutchinson probe each where the curvature is probed), at most the ``P`` that the previous selection
            planned (``P`` is known only after the probes); ``None`` takes all ``P``.
        hessian_every: Probe the curvature at every ``k``-th selection only, as AdaHessian's ``update_each`` does
            (unlike it, the curvature average is left untouched in between, not fed the stale probe). The other
            selections update the smoothed gradient with a plain backward pass instead of a double backward, about
            a third of the cost. No effect with ``second_order=False``.
        hessian_subsample: Run each Hutchinson probe on every ``k``-th example of the coreset only (picks in greedy
            order, so the sample spans the gains and classes), and the coreset gradient on all of it, as Sophia and
            Hessian-free optimisation take their curvature from a part of the gradient's batch. A probe's double
            backward costs about twice a training step per example, so ``k = 4`` makes a probe about half as
            costly. No effect with ``second_order=False``.
        proxy_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the forward passes that score random subsets
            (their gradient proxies, and the losses recorded for excluding learned examples) under autocast in
            that dtype; ``None`` runs them in the trainer's precision. The proxies only rank examples, so half
            precision changes few picks, while this pass is the largest part of CREST's cost: on a CPU with
            AVX-512 BF16 a bf16 pass of the benchmark's CNN took 9 ms against 15 ms. The check sample (the loss at
            each selection and at every check), the coreset gradients and the curvature keep the trainer's
            precision.
        embedding_proxy: ``k > 0`` extends the gradient proxies from the logits' gradient (the last layer's bias) to the
            whole last linear layer: a random sketch of about ``k`` values of each example's weight gradient, the
            outer product of the logits' gradient with the layer's input (the penultimate embedding), is appended
            without forming it (see :func:`~lightning_crest.selection.last_layer_sketch`). The paper's option for
            models whose logits alone tell examples apart poorly; it needs the logits to come from the module's
            last ``nn.Linear``, called once per forward on ``(B, D)`` inputs. ``0``: the logits' gradient only.
        second_order: Use the Hessian term; ``False`` gives the first-order model of the paper's ablation (the
            curvature is then the model's ``eps`` alone, a negligible ``eps ||delta||^2 / 2``, and ``T1`` is
            ``ceil(interval_mul)`` from the first re-selection on; the first selection has ``T1 = 1`` either way).
        knn: Passed to :func:`~lightning_crest.selection.facility_location`: ``None`` (dense) or neighbours.
            Only for random subsets of many thousands of examples: the kNN greedy takes one step (and host round
            trip) at a time, and on subsets of 600 it took 55 ms per coreset on an H200 against 2.7 ms for the
            dense greedy, and 12.6 s against 0.7 s over a ResNet-20 fit (``benchmarks/NOTES.md``).
        backend: kNN backend, passed to :func:`~lightning_crest.selection.facility_location`.
        similarity: Facility-location similarity, passed to :func:`~lightning_crest.selection.facility_location`.
        selection: ``"crest"``, or ``"random"`` for class-stratified random mini-batches of weight 1 (drawn as the
            random subsets are) under the same budget and sampler (no quadratic model, no checks): the honest
            baseline.
        seed: Seed of CREST's own random draws, and of the views of each check sample (see
            :meth:`CrestDataModule.fetch`). ``None`` takes Lightning's global seed (``L.seed_everything``, 0 if it
            was not called) when a fit starts afresh, as Lightning's distributed sampler does, and process 0's
            under DDP; a resumed fit keeps its checkpoint's.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        trainer = L.Trainer(max_epochs=200, callbacks=[CrestCallback(fraction=0.1)])
        trainer.fit(model, datamodule=CrestDataModule(train_set, val_set, batch_size=128))
    """

    _trainer: L.Trainer | None
    _module: L.LightningModule | None
    _dm: CrestDataModule
    _pool: Tensor | None
    _check_batches: list[Any] | None
    _labels: Tensor  # the training set's classes, from the fit's setup on
    # Every class in a subset has picks in its coreset (not when there are more classes than picks).
    _per_class: bool
    _anchor_stats: list[Tensor]  # the normalisation statistics at the selection (see _running_stats)
    _loaded_state: dict[str, Any] | None  # as loaded, until a fit takes it (see _apply_restored_plan)
    _check_seed: int | None  # the seed the check sample's items are read under
    _weights_probe: Tensor | None  # until a step shows that its loss weights each example
    _undecided_weight_steps: int  # steps that could not tell whether the loss weights each example
    _batch_losses_differ: bool  # the probed batch's losses differ beyond the rounding of the model's dtype
    _probe_is_the_weights: bool = False  # a tuple batch's weights, made to require grad themselves
    _ignore_next_state: bool  # the checkpoint being restored is not a fit's (see on_load_checkpoint)
    _in_step: bool  # between this callback's on_train_batch_start and on_train_batch_end
    _floor_probed: bool = False  # per_example_loss was checked in this fit for a floor above drop_threshold
    _logits_probed: bool = False  # compute_logits was checked in this fit for probabilities instead of logits
    # In this fit, the module that 'last_layer' models was seen to give the logits.
    _last_layer_checked: bool = False
    _stale: int  # batches of an earlier plan read ahead before the last selection, not yet trained
    _trained: int  # batches trained in this fit: the plan served them, and the loader may have read more
    _iterator_trained: int  # `_trained` when the current epoch's iterator started
    _window_epochs: int  # epochs started since the last exclusion or the first fit: T2 of them end a window
    _epoch_step: int  # steps trained in the current epoch
    _fit_end: float | None  # when the last fit ended (None while it runs)
    _select_next_epoch: bool  # a check failed on an epoch's last step: the next epoch starts with a selection
    _started_epoch: int  # the epoch whose start-of-epoch work ran (-1: none yet in this fit)
    _iterator_epoch: int  # the epoch the last data iterator started (-1: none yet in this fit)
    _epoch_ended: bool  # its end-of-epoch hook ran: a stop inside the epoch also ends it
    _epoch_floor: int  # after a restore: the earliest epoch that can start
    _modelled: tuple[str, ...]  # names of the parameters the quadratic model describes

    def __init__(
        self,
        fraction: float = 0.1,
        random_subset_size: int | float = 0.01,
        tau: float = 0.05,
        check_size: int | None = None,
        check_sample: Literal["independent", "subset"] = "independent",
        interval_mul: float = 1.0,
        coreset_mul: int = 5,
        drop_learned: bool = True,
        drop_threshold: float = 0.1,
        drop_interval: int = 20,
        min_pool_fraction: float = 0.5,
        min_class_fraction: float = 0.2,
        hessian_params: Literal["all", "last_layer"] = "all",
        hessian_probes: int | None = 1,
        hessian_every: int = 1,
        hessian_subsample: int = 1,
        proxy_dtype: torch.dtype | None = None,
        embedding_proxy: int = 0,
        second_order: bool = True,
        knn: int | None = None,
        backend: Literal["auto", "torch", "faiss"] = "auto",
        similarity: Literal["distance", "exp"] = "distance",
        selection: Literal["crest", "random"] = "crest",
        seed: int | None = None,
    ) -> None:
        self.fraction = fraction
        self.random_subset_size = random_subset_size
        self.tau = tau
        self.check_size = check_size
        self.check_sample = check_sample
        self.interval_mul = interval_mul
        self.coreset_mul = coreset_mul
        self.drop_learned = drop_learned
        self.drop_threshold = drop_threshold
        self.drop_interval = drop_interval
        self.min_pool_fraction = min_pool_fraction
        self.min_class_fraction = min_class_fraction
        self.hessian_params = hessian_params
        self.hessian_probes = hessian_probes
        self.hessian_every = hessian_every
        self.hessian_subsample = hessian_subsample
        self.proxy_dtype = proxy_dtype
        self.embedding_proxy = embedding_proxy
        self.second_order = second_order
        self.knn = knn
        self.backend = backend
        self.similarity = similarity
        self.selection = selection
        self.seed = seed
        self._check_settings()
        self._reset_state()

    def _check_settings(self) -> None:
        """Refuse settings that cannot work, naming the argument; made plain Python numbers. Run when the callback is
        built and again as each fit starts, so that a setting changed on the instance since is checked too."""
        check_range("fraction", self.fraction, 0.0, 1.0, low_open=True)
        if isinstance(self.random_subset_size, bool) or not isinstance(self.random_subset_size, (int, float)):
            raise ValueError(
                "`random_subset_size` must be a float fraction or an int count, got "
                f"{self.random_subset_size!r}{conversion_hint(self.random_subset_size)}."
            )
        if isinstance(self.random_subset_size, float):
            if self.random_subset_size > 1.0 and self.random_subset_size.is_integer():
                raise ValueError(
                    f"`random_subset_size` as a float is a fraction of the training set in (0, 1], got "
                    f"{self.random_subset_size!r}; pass {int(self.random_subset_size)} (an int) for a count."
                )
            check_range("random_subset_size", self.random_subset_size, 0.0, 1.0, low_open=True)
        elif self.random_subset_size < 1:
            raise ValueError(
                f"`random_subset_size` as a count must be at least 1, got {self.random_subset_size}."
            )
        if self.selection == "crest":  # random mini-batches make no checks
            check_finite(
                "tau",
                self.tau,
                "the check could never fail, so the whole run would train on the first selection's coresets; a "
                "large finite `tau` re-selects rarely",
            )
        check_range("tau", self.tau, 0.0, math.inf)
        if self.check_size is not None:
            check_positive_int("check_size", self.check_size)
        if self.check_sample not in ("independent", "subset"):
            raise ValueError(f"`check_sample` must be 'independent' or 'subset', got {self.check_sample!r}.")
        check_range("interval_mul", self.interval_mul, 0.0, math.inf, low_open=True)
        if self.interval_mul > _MAX_MUL:
            raise ValueError(
                f"`interval_mul` must be at most {_MAX_MUL} (each selection plans `coreset_mul` * T1 random "
                f"subsets, T1 at least `interval_mul`), got {self.interval_mul!r}; to re-select rarely, raise `tau` "
                "instead."
            )
        check_positive_int("coreset_mul", self.coreset_mul)
        if self.coreset_mul > _MAX_MUL:
            raise ValueError(
                f"`coreset_mul` must be at most {_MAX_MUL} (each selection plans `coreset_mul` * T1 random "
                f"subsets), got {self.coreset_mul!r}."
            )
        if self.drop_learned:
            check_finite(
                "drop_threshold",
                self.drop_threshold,
                "every example scored would count as learned; to exclude none, pass drop_learned=False",
            )
        check_range("drop_threshold", self.drop_threshold, 0.0, math.inf)
        check_positive_int("drop_interval", self.drop_interval)
        check_range("min_pool_fraction", self.min_pool_fraction, 0.0, 1.0)
        check_range("min_class_fraction", self.min_class_fraction, 0.0, 1.0)
        if self.hessian_params not in ("all", "last_layer"):
            raise ValueError(f"`hessian_params` must be 'all' or 'last_layer', got {self.hessian_params!r}.")
        if self.hessian_probes is not None:
            check_positive_int("hessian_probes", self.hessian_probes)
        check_positive_int("hessian_every", self.hessian_every)
        check_positive_int("hessian_subsample", self.hessian_subsample)
        if self.proxy_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"`proxy_dtype` must be torch.bfloat16, torch.float16 or None (the trainer's precision), got "
                f"{self.proxy_dtype!r}."
            )
        if (
            isinstance(self.embedding_proxy, bool)
            or not isinstance(self.embedding_proxy, int)
            or not 0 <= self.embedding_proxy <= _MAX_SKETCH
        ):
            raise ValueError(
                f"`embedding_proxy` must be an int in [0, {_MAX_SKETCH}] (0: the logits' gradient only; each example "
                f"of a random subset gets about that many values more), got {self.embedding_proxy!r}."
            )
        if self.knn is not None:
            check_positive_int("knn", self.knn)
        if self.backend not in ("auto", "torch", "faiss"):
            raise ValueError(f"`backend` must be 'auto', 'torch' or 'faiss', got {self.backend!r}.")
        if self.similarity not in ("distance", "exp"):
            raise ValueError(f"`similarity` must be 'distance' or 'exp', got {self.similarity!r}.")
        if self.selection not in ("crest", "random"):
            raise ValueError(f"`selection` must be 'crest' or 'random', got {self.selection!r}.")
        check_flag("drop_learned", self.drop_learned)
        check_flag("second_order", self.second_order)
        if self.seed is not None:
            check_seed(self.seed)
        # Plain Python numbers: a NumPy float would make the checkpoint unloadable with `weights_only=True`.
        self.fraction = float(self.fraction)
        self.random_subset_size = (
            float(self.random_subset_size)
            if isinstance(self.random_subset_size, float)
            else int(self.random_subset_size)
        )
        self.embedding_proxy = int(self.embedding_proxy)
        self.seed = None if self.seed is None else int(self.seed)

    # --- extension points ----------------------------------------------------------------------------------

    def compute_logits(self, pl_module: L.LightningModule, inputs: Any) -> Tensor:
        """Class logits ``(B, C)`` of a batch of inputs; override when ``forward`` returns something else."""
        return pl_module(inputs)  # type: ignore[no-any-return]

    def per_example_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-example training loss ``(B,)``; override for a loss other than cross-entropy.

        The gradient proxies stay ``softmax(logits) - onehot(targets)``, the gradient of cross-entropy with respect
        to the logits, whatever this returns. Its values are compared with ``drop_threshold`` to exclude learned
        examples: a loss that cannot fall that low (label smoothing) needs a higher threshold. It must be finite
        (where the logits are) and not negative: CREST's check is relative to it.
        """
        return F.cross_entropy(logits.float(), targets, reduction="none")

    # --- what it selected -----------------------------------------------------------------------------------

    @property
    def coresets(self) -> list[tuple[Tensor, Tensor]]:
        """The global batches of the current selection, ``(indices, weights)`` of shape ``(global_batch,)`` each.

        Indices point into the training set; weights average 1 within a coreset (over coresets, with more classes
        than the global batch holds: see the README's "Details and limits"). Empty before the first selection.
        A selection's coresets after the first are picked when first trained on, so they appear one by one.
        """
        return [] if self._dm is None else [(i, w) for i, w in self._dm.plan.batches if w.numel() > 0]

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of CREST's own work in the current fit, by part.

        ``proxies``: forward passes over the random subsets for the gradient proxies (data loading included);
        ``greedy``: facility location; ``hessian``: the quadratic model's coreset gradient and Hutchinson probes;
        ``checks``: forward passes and predictions of the checks; ``exclusion``: dropping learned examples. The
        rest of ``crest/overhead`` (drawing subsets, bookkeeping) is not itemised.
        """
        return dict(self._timings)

    @property
    def own_time(self) -> float:
        """Seconds of CREST's own work in the current fit, all parts together (the numerator of ``overhead``)."""
        return self._crest_time

    @property
    def statistics(self) -> dict[str, float]:
        """What the callback logs as ``crest/*``, current at every step (the logged values are refreshed only where
        the Trainer's loggers write, every ``log_every_n_steps`` steps, and at the end of each epoch).

        ``selections`` (coreset selections since training started, a restored checkpoint's included),
        ``pool_size`` (examples not excluded as learned), ``selection_time`` (seconds spent selecting, likewise),
        ``overhead`` (the share of the current fit's time spent in CREST's own work, as :attr:`timings`); with
        ``selection="crest"`` also ``rho`` (the quadratic model's relative error at the last check; NaN before the
        first, and at a check that failed because the model's prediction overflowed or the trainable parameters
        changed since the selection), ``check_interval`` (``T1``) and ``num_coresets`` (``P``).
        """
        end = time.perf_counter() if self._fit_end is None else self._fit_end
        elapsed = end - self._fit_start
        values = {
            "selections": float(self._selections),
            "pool_size": float(self._pool_size),
            "selection_time": self._selection_time,
            "overhead": self._crest_time / elapsed if elapsed > 0 else 0.0,
        }
        if self.selection == "crest":
            values |= {
                "rho": self._rho,
                "check_interval": float(self._interval),
                "num_coresets": float(self._num_coresets),
            }
        return values

    @property
    def pool(self) -> Tensor:
        """``(n,)`` bool mask of the training examples still drawn into random subsets (not excluded as learned)."""
        return torch.empty(0, dtype=torch.bool) if self._pool is None else self._pool.clone()

    # --- Lightning hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._ignore_next_state = False  # left set if another callback's restore failed before this one's
        if stage == "fit":
            self._setup_fit(trainer, pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._end_fit()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._ignore_next_state = False
        # A checkpoint saved on the way out is an interrupted step's, as Lightning saves it: no warning.
        self._in_step = False
        # Lightning skips `teardown` when a fit raises or is interrupted (and marks it interrupted before this hook).
        if trainer.state.fn == TrainerFn.FITTING:
            self._end_fit()
        add_batch_notes(
            exception, probed_tuple_weights=self._weights_probe is not None and self._probe_is_the_weights
        )

    def _end_fit(self) -> None:
        self._fit_end = time.perf_counter()
        self._release_data_module()

    def _release_data_module(self) -> None:
        # Leave the data module as a plain one: a later fit without this callback trains on full shuffled epochs.
        # The plan's batches stay readable through `coresets`.
        if self._dm is not None:
            self._dm.use_plan(None)
            plan = self._dm.plan
            plan.refill = plan.resolve = plan.on_iterator_start = plan.check_reader = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in `setup`: the module's `setup` and `configure_model` may build its layers after the callback's.
        if self.selection == "crest" and not self._model_parameters(pl_module):
            raise ValueError(
                f"`hessian_params`={self.hessian_params!r} selects no trainable parameters of "
                f"{type(pl_module).__name__}: the quadratic model needs some. Leave parameters trainable "
                "(requires_grad), or remove CrestCallback."
            )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_loader(trainer, self._dm)
        check_accumulation_schedule(trainer)
        # Lightning restores checkpointed tensors on the device they were saved from.
        self._quadratic.to(pl_module.device)
        self._anchor_stats = [stat.to(pl_module.device) for stat in self._anchor_stats]
        self._fit_start = time.perf_counter()
        self._fit_end = None
        self._crest_time = 0.0
        self._timings = dict.fromkeys(_PHASES, 0.0)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_loader(trainer, self._dm)  # `reload_dataloaders_every_n_epochs` builds it anew
        self._begin_epoch(trainer.current_epoch)

    def _check_reader(self, sampler: CoresetSampler) -> None:
        """Refuse a sampler other than the training loader's that starts reading the plan (called by the sampler).

        Lightning sets the trainer's loader before it reads it, so a read before that (in ``setup``, ``on_fit_start``
        or ``configure_optimizers``) is another reader's too.
        """
        assert self._trainer is not None
        if getattr(self._trainer.train_dataloader, "sampler", None) is not sampler:
            self._refuse_reader()

    def _refuse_reader(self) -> None:
        raise RuntimeError(
            f"{type(self._dm).__name__}'s training batches were read during the fit by something other than the "
            "training loop (a hook that iterates `datamodule.train_dataloader()` or `trainer.train_dataloader`, "
            "say). CREST's coresets are served to the training loop alone: another reader would use them up, and "
            "training would skip them. To go over the training set during a fit, build a loader of its own: "
            "`DataLoader(dm.train_dataset, ...)`."
        )

    def _start_iterator(self, epoch: int, start: int) -> None:
        """An iterator starts reading ``epoch`` from step ``start`` (called by the sampler)."""
        plan = self._dm.plan
        epoch = max(epoch, self._epoch_floor)
        if epoch == self._iterator_epoch:
            # The epoch's iterator again. Lightning creates two when it reloads the loaders, when it resumes into an
            # epoch with no batch left (the first's workers start reading the next), and when it resumes inside an
            # epoch with reloaded loaders and `configure_optimizers` reads `estimated_stepping_batches` (which
            # builds a loader before the epoch is restored). Batches the first read ahead and training never
            # reached are served again, first, and those of an earlier plan stay stale.
            if self._trained != self._iterator_trained:
                # Lightning starts its second iterator before the epoch's first step: one after steps is a hook's.
                self._refuse_reader()
            plan.unserve(plan.served - self._trained)
        elif start == 0:
            # A new epoch: batches read beyond the last one's trained steps (an epoch cut short by
            # `limit_train_batches`) are forgotten.
            self._trained = plan.served
            self._stale = 0
        # (Else the epoch a restore goes on with, from its saved step and count of stale batches.)
        self._iterator_trained = self._trained
        self._iterator_epoch = epoch
        if start == 0:
            self._begin_epoch(epoch)

    def _begin_epoch(self, epoch: int) -> None:
        """Work due when an epoch starts; runs once per epoch, from whichever comes first.

        Usually that is ``on_train_epoch_start``. Lightning skips that hook when it resumes from a checkpoint saved
        inside an epoch, and also when the checkpoint was saved on the epoch's last step (in
        ``on_train_batch_end``), where the resumed run starts the next epoch at once: then the sampler calls this
        when the new epoch's first batch is read (:attr:`CoresetPlan.on_iterator_start`).

        The sampler's epoch can lag: resuming with loader workers from a checkpoint saved at an epoch's end,
        Lightning starts reading the next epoch before it sets the sampler's epoch (or its own). The restored state
        knows which epoch comes next (``_epoch_floor``).
        """
        epoch = max(epoch, self._epoch_floor)
        if epoch == self._started_epoch:
            return
        # Batches a restore has still to serve belong to the epoch before (read ahead beyond the last step of an epoch
        # cut short): forgotten, as that epoch's own run forgot them, before a selection would count them as stale.
        self._dm.plan.replay.clear()
        # Counted by CREST, not read from the Trainer's epoch: a fit again with a fresh Trainer starts that at 0.
        if self._window_epochs >= self.drop_interval:
            if self._dropping and self._drop_learned_examples() > 0:
                # The plan's coresets, and the random subsets of those still to be picked, hold examples that have
                # left the pool: select anew from it (saved as such, should a checkpoint come before the selection).
                self._select_next_epoch = True
            self._window_epochs = 0
        if self.selection == "random" or len(self._dm.plan) == 0 or self._select_next_epoch:
            self._select(self._steps_per_epoch)
        # Started once its work is done: a checkpoint saved after that work failed (Ctrl-C) has it redone.
        self._window_epochs += 1
        self._started_epoch = epoch
        self._epoch_ended = False
        self._epoch_step = 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check_accumulation(trainer)  # a GradientAccumulationScheduler may raise it at any epoch
        self._in_step = True
        # The resumed epoch's iterator trains: later iterators start epochs of their own.
        self._dm.plan.resume_step = 0
        if not self._weights_checked and is_weighted_batch(batch):
            # Whether, and how, the loss uses each weight shows in the probe's gradient. Given to the step as
            # `weights + probe` where the batch is a list (as collated), so the step may change them in place.
            weights = batch[2]
            # (Random batches have weight 1: any use of the weights weights each example alike.)
            if self.selection == "crest":
                self._batch_losses_differ = self._losses_differ(pl_module, batch)
            self._probe_is_the_weights = not isinstance(batch, list)
            if self._probe_is_the_weights:
                self._weights_probe = weights.requires_grad_(True)
            else:
                self._weights_probe = torch.zeros_like(weights, requires_grad=True)
                batch[2] = weights + self._weights_probe

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A training_step that returned None (a skipped step) leaves no loss to inspect.
        skipped = outputs is None or (isinstance(outputs, dict) and not outputs)
        if not self._weights_checked and not skipped:
            self._check_weights_used(batch)
        self._trained += 1
        self._epoch_step = batch_idx + 1
        if self._stale > 0:
            # Loader workers read this batch from the plan before the last selection: the selection's steps (and
            # its checks) start with its own first batch.
            self._stale -= 1
        elif not without_backward(trainer):
            # (An epoch without training steps, StochasticWeightAveraging's pass that recomputes BatchNorm statistics
            # over the averaged weights, leaves nothing for the quadratic model to check.)
            self._steps_since_selection += 1
            if (
                self.selection == "crest"
                and self._steps_since_selection % self._interval == 0
                and self._check()
            ):
                steps_left = self._steps_per_epoch - batch_idx - 1
                if steps_left > 0:
                    self._select(steps_left)
                else:  # the next epoch starts with a selection; until then `coresets` shows this one's
                    self._select_next_epoch = True
        self._in_step = False
        self._log(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_step = False  # a step skipped by `on_train_batch_start` returning -1 has no batch end
        self._epoch_ended = True
        # The epoch's last values, which the loggers write at the epoch's end whatever `log_every_n_steps` is.
        if not trainer.barebones:  # barebones Trainers refuse `log`
            self._log_statistics(pl_module, epoch=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._pool is None:
            return {}
        if self._loaded_state is not None:
            # Loaded by hand and not yet applied to a fit: the data module's plan is not this state's.
            return dict(self._loaded_state)
        if self._dm is None:
            raise RuntimeError(
                "This CrestCallback was pickled after a fit, which leaves its coresets with the data module: its "
                "state is incomplete. Take `state_dict()` from the fitted callback, or copy it with `copy.deepcopy`."
            )
        if self._in_step:
            rank_zero_warn(
                "A checkpoint is saved inside a training step, before CrestCallback's `on_train_batch_end` ran for it "
                "(a callback listed before CrestCallback saves in its own `on_train_batch_end`, say): the step's "
                "check is not in it, so a fit resumed from it will not repeat this one. List the saving callback "
                "after CrestCallback (Lightning runs ModelCheckpoint and OnExceptionCheckpoint last already)."
            )
        plan = self._dm.plan
        # Batches loader workers read ahead but training has not reached, then those a restore has still to serve:
        # served first after a restore.
        in_flight = plan.served_since(plan.served - self._trained) + plan.replay
        # Lightning's epoch may be shorter than CREST's (`limit_train_batches`); once it is over, the next one starts
        # from its first step.
        assert self._trainer is not None  # set with the data module
        epoch_done = self._epoch_step >= min(self._steps_per_epoch, self._trainer.num_training_batches)
        epoch, epoch_step, epoch_ended = self._started_epoch, self._epoch_step, self._epoch_ended
        if self._started_epoch < self._epoch_floor:
            # In this fit the epoch due next has not started yet (after a restore, or fitting again): saved as such.
            epoch, epoch_step, epoch_done, epoch_ended = self._epoch_floor, 0, False, False
        return {
            "pool": self._pool.clone(),
            "window_max_loss": self._window_max_loss.clone(),
            "rng_state": self._generator.get_state(),
            "quadratic": self._quadratic.state_dict(),
            "interval": self._interval,
            "peak_curvature": self._peak_curvature,
            "modelled": list(self._modelled),
            "num_coresets": self._num_coresets,
            "selections": self._selections,
            "checks": self._checks,
            "steps_since_selection": self._steps_since_selection,
            "select_next_epoch": self._select_next_epoch,
            "stale": self._stale,
            "check_indices": self._check_indices.clone(),
            "check_seed": self._check_seed,
            "anchor_stats": [stat.clone() for stat in self._anchor_stats],
            "rho": self._rho,
            "selection_time": self._selection_time,
            "window_epochs": self._window_epochs,
            "weights_checked": self._weights_checked,
            "undecided_weight_steps": self._undecided_weight_steps,
            "plan_indices": [idx for idx, _ in plan.batches],
            "plan_weights": [w for _, w in plan.batches],
            "plan_cursor": plan.cursor,
            "in_flight_indices": [idx for idx, _ in in_flight],
            "in_flight_weights": [w for _, w in in_flight],
            "global_batch": self._global_batch,
            "steps_per_epoch": self._steps_per_epoch,
            "labels_digest": _digest(self._labels),
            "fraction": self.fraction,
            "selection": self.selection,
            "seed": self._seed,
            "epoch_step": self._steps_per_epoch if epoch_done else epoch_step,
            # The current epoch, whether its start-of-epoch work was done (a checkpoint saved before its first step, by
            # an interrupt say, may come before or after it) and whether all its steps were trained.
            "epoch": epoch,
            "epoch_started": self._started_epoch == epoch,
            "epoch_done": epoch_done,
            # A run stopped inside an epoch (`max_steps`, `Timer`, `EarlyStopping`) ends it too.
            "epoch_ended": epoch_ended,
        }

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores callbacks for `validate`, `test` and `predict` with a `ckpt_path` too (calling
        # `load_state_dict` next, with a state that is not empty); only a fit resumes CREST's training, so the others
        # leave this fit's state alone.
        has_state = bool(checkpoint.get("callbacks", {}).get(self.state_key))
        self._ignore_next_state = has_state and trainer.state.fn != TrainerFn.FITTING

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ignore, self._ignore_next_state = self._ignore_next_state, False
        if not state_dict or ignore:
            return
        # A state that lacks a key leaves the callback as it was (the keys are read in turn). A state refused by the
        # fit it would resume is dropped instead (see _apply_restored_plan).
        before = self.__dict__.copy()
        try:
            self._load_state(state_dict)
        except KeyError as error:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise ValueError(
                f"The checkpoint's CrestCallback state lacks {error}: it was saved by another version of "
                "lightning-crest. Resume with that version, or start afresh without `ckpt_path`."
            ) from None

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        self._pool = state_dict["pool"].clone()
        self._window_max_loss = state_dict["window_max_loss"].clone()
        self._generator = torch.Generator()
        self._generator.set_state(state_dict["rng_state"])
        self._quadratic = QuadraticModel()
        self._quadratic.load_state_dict(state_dict["quadratic"])
        self._interval = int(state_dict["interval"])
        self._peak_curvature = float(state_dict["peak_curvature"])
        self._modelled = tuple(state_dict["modelled"])
        self._num_coresets = int(state_dict["num_coresets"])
        self._selections = int(state_dict["selections"])
        self._checks = int(state_dict["checks"])
        self._steps_since_selection = int(state_dict["steps_since_selection"])
        self._select_next_epoch = bool(state_dict["select_next_epoch"])
        self._stale = int(state_dict["stale"])
        self._check_indices = state_dict["check_indices"].clone()
        self._anchor_stats = [stat.clone() for stat in state_dict["anchor_stats"]]
        self._check_seed = state_dict["check_seed"]
        self._check_batches = None
        self._rho = float(state_dict["rho"])
        self._selection_time = float(state_dict["selection_time"])
        self._window_epochs = int(state_dict["window_epochs"])
        self._weights_checked = bool(state_dict["weights_checked"])
        self._undecided_weight_steps = int(state_dict["undecided_weight_steps"])
        self._epoch_step = int(state_dict["epoch_step"])
        self._epoch_floor = int(state_dict["epoch"]) + bool(state_dict["epoch_done"])
        self._epoch_ended = False
        # Read when a fit takes the state, and looked up now: a state that lacks one is refused here.
        for key in _TAKEN_BY_A_FIT:
            if key not in state_dict:
                raise KeyError(key)
        self._loaded_state = dict(state_dict)
        if self.seed is None:  # the run's seed is the checkpoint's
            self._seed = int(state_dict["seed"])
        # Lightning restores callbacks inside `fit`, after `setup`: the plan goes to the data module at once. Loaded by
        # hand, outside a fit, the state waits for the next fit's `setup` (even on a callback used in an earlier fit).
        if self._dm is not None and _fitting(self._trainer):
            self._apply_restored_plan(self._dm)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned processes: torch.Generator objects do not pickle, and the Trainer travels separately.
        state = self.__dict__.copy()
        state.update(_trainer=None, _module=None, _dm=None, _check_batches=None)
        # As bytes: a temporary tensor would travel through shared memory that is freed once pickling returns,
        # before the spawned process reads it ("unable to resize file ... Invalid argument").
        state["_generator"] = self._generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["_generator"]), dtype=torch.uint8))
        self.__dict__.update(state, _generator=generator)

    def __deepcopy__(self, memo: dict[int, Any]) -> CrestCallback:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        if self._dm is not None and self._pool is not None and self._loaded_state is None:
            # The plan lives in the data module, which the copy does not share: the copy holds this state as one
            # loaded by hand, saved as it is and taken up by its next fit. (A copy is no checkpoint: the warning
            # about a state saved inside a step does not apply.)
            in_step, self._in_step = self._in_step, False
            try:
                state = self.state_dict()
            finally:
                self._in_step = in_step
            clone._load_state(copy.deepcopy(state, memo))
        return clone

    # --- setup ---------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._trainer = None
        self._module = None
        self._dm = None  # type: ignore[assignment]
        self._pool = None
        self._window_max_loss = torch.empty(0)
        # With seed=None, resolved again when a fit starts afresh (see _setup_fit).
        self._seed = global_seed() if self.seed is None else self.seed
        self._generator = torch.Generator().manual_seed(self._seed)
        self._quadratic = QuadraticModel()
        self._interval = 1
        self._num_coresets = self.coreset_mul
        self._peak_curvature = 0.0
        self._modelled = ()
        self._selections = 0
        self._checks = 0
        self._steps_since_selection = 0
        self._select_next_epoch = False
        self._stale = 0
        self._check_indices = torch.empty(0, dtype=torch.long)
        self._check_seed = None
        self._check_batches = None
        self._anchor_stats = []
        self._rho = math.nan
        self._selection_time = 0.0
        self._crest_time = 0.0
        self._timings = dict.fromkeys(_PHASES, 0.0)
        self._timing_depth = 0
        self._fit_start = time.perf_counter()
        self._fit_end = None
        self._window_epochs = 0
        self._weights_checked = False
        self._undecided_weight_steps = 0
        self._batch_losses_differ = False
        self._weights_probe = None
        self._in_step = False
        self._ignore_next_state = False
        self._epoch_step = 0
        self._trained = self._iterator_trained = 0
        self._started_epoch = self._iterator_epoch = -1
        self._epoch_ended = False
        self._epoch_floor = 0
        self._loaded_state = None

    def _setup_fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_settings()
        dm = crest_data_module(trainer)
        dm._check_settings()
        labels = dm.labels
        if (
            self._loaded_state is None
            and self._pool is not None
            and (self._module is not pl_module or not torch.equal(self._labels, labels))
        ):
            # The state (quadratic model, pool, plan) belongs to the module and training set of an earlier fit;
            # another module or training set starts afresh. Fitting the same ones again goes on where it stopped. A
            # copy sent to `ddp_spawn` workers (see __getstate__) cannot tell its module: it starts afresh too.
            self._reset_state()
        check_trainer(trainer, pl_module)
        crests = [c for c in trainer.callbacks if isinstance(c, CrestCallback)]  # type: ignore[attr-defined]
        if len(crests) > 1:
            raise ValueError(
                f"The Trainer has {len(crests)} CrestCallbacks ({', '.join(type(c).__name__ for c in crests)}): "
                "each would plan the data module's batches in turn and check its quadratic model against the "
                "others' coresets. Keep one."
            )
        n = len(labels)
        check_data_module(dm, n, trainer.world_size)
        global_batch = dm.batch_size * trainer.world_size
        num_classes = int(labels.max()) + 1
        present = int(torch.unique(labels).numel())
        if num_classes > _MAX_CLASSES:
            # CREST keeps per-class counts of every random subset: labels that are ids would make them huge.
            raise ValueError(
                f"The training labels go up to {num_classes - 1}, so CREST would count {num_classes} classes "
                f"({present} present) in every random subset: labels must be class indices from 0 to C - 1, one per "
                f"logit, with C at most {_MAX_CLASSES}. If they are ids, map them to indices "
                "(`torch.unique(targets, return_inverse=True)[1]`, say)."
            )
        if present < 2:
            raise ValueError(
                f"The training set holds one class (label {int(labels[0])}, all {n} examples): there is nothing to "
                "classify. Check how it was split (a `Subset` of the first items of data sorted by class?)."
            )
        # Random mini-batches draw no subsets and make no checks: CREST's sizes and parameters do not apply to them.
        subset = self._subset_size(n, global_batch) if self.selection == "crest" else global_batch
        if self.selection == "crest":
            self._check_crest_sizes(subset, global_batch, trainer.world_size, present)
        check_proxy_dtype(self.proxy_dtype, trainer)
        # With more classes than picks not every class can have one: each coreset's picks then go to classes drawn
        # in proportion to their sizes in its subset (see _pick).
        self._per_class = present <= global_batch
        steps_per_epoch = _ceil_share(self.fraction, n, global_batch)
        check_epoch_settings(trainer, steps_per_epoch, self.fraction)
        if self.seed is None and self._module is None and self._loaded_state is None:
            # A fresh start follows the global seed as of this fit, process 0's: every process draws the same.
            self._seed = global_seed(trainer)
            self._generator = torch.Generator().manual_seed(self._seed)
        self._trainer, self._module, self._dm = trainer, pl_module, dm
        # Checked once per fit: the module may have changed since the last.
        self._last_layer_checked = self._logits_probed = self._floor_probed = False
        self._labels = labels
        self._num_classes = num_classes
        self._global_batch = global_batch
        self._subset = subset
        self._steps_per_epoch = steps_per_epoch
        dm.use_plan(self._steps_per_epoch)
        dm.plan.refill = self._select
        dm.plan.on_iterator_start = self._start_iterator
        dm.plan.check_reader = self._check_reader
        dm.plan.resolve = self._resolve  # a restored plan may hold subsets whose coresets are not picked yet
        dm.plan.restart()
        # Left set by a resumed fit that stopped before its first step (a restore sets it again).
        dm.plan.resume_step = 0
        self._trained = self._iterator_trained = 0
        self._started_epoch = self._iterator_epoch = -1
        self._epoch_ended = False
        # Fitting again with the same Trainer goes on from its epoch; the sampler may start reading it first. A fresh
        # Trainer counts from 0 again (a restore sets the floor later; one loaded by hand is moved below).
        if self._loaded_state is None:
            self._epoch_floor = trainer.current_epoch
        fresh = self._pool is None or (self._loaded_state is None and len(self._pool) != n)
        if fresh:
            self._pool = torch.ones(n, dtype=torch.bool)
            self._window_max_loss = torch.full((n,), math.nan)
        # A fresh start: batches an earlier fit left in the data module's plan are not this run's. Going on with
        # another batch size: the last fit's coresets do not fit it, and the next step selects.
        if fresh or (
            self._loaded_state is None and any(len(w) not in (0, global_batch) for _, w in dm.plan.batches)
        ):
            dm.plan.replace([])
            dm.plan.replay.clear()
        if self._loaded_state is not None:  # loaded by hand before `fit`
            self._apply_restored_plan(dm)
            step = dm.plan.resume_step % self._steps_per_epoch
            if step and trainer.current_epoch > 0 and dm.num_workers > 0:
                # Such a Trainer starts a first iterator of the epoch and drops it: its workers' read-ahead would take
                # the state's place in the epoch.
                self._release_data_module()
                self._reset_state()
                raise ValueError(
                    f"The state loaded by hand stopped inside an epoch (step {step} of {self._steps_per_epoch}), and "
                    f"this Trainer trained before (epoch {trainer.current_epoch}): with loader workers "
                    f"(num_workers={dm.num_workers}) it cannot go on from that step. Fit it with a fresh Trainer, or "
                    "resume from the checkpoint with `ckpt_path`."
                )
            # The state's next epoch is this Trainer's next, which a fresh Trainer counts from 0.
            shift = trainer.current_epoch - self._epoch_floor
            self._epoch_floor += shift
            if self._started_epoch != -1:
                self._started_epoch += shift

    def _check_crest_sizes(self, subset: int, global_batch: int, world_size: int, classes: int) -> None:
        """Warn about, or refuse, random subsets, check samples and probes that CREST cannot use."""
        if self.second_order and self.hessian_subsample >= global_batch:
            raise ValueError(
                f"`hessian_subsample`={self.hessian_subsample} is at least the global batch of {global_batch}: each "
                "Hutchinson probe would use only the coreset's first pick. Lower it below the global batch "
                "(every k-th pick is probed; the benchmark uses 4)."
            )
        if subset <= global_batch:
            rank_zero_warn(
                f"`random_subset_size`={self.random_subset_size} gives random subsets of r={subset} examples, no "
                f"more than the global batch of {global_batch}: every coreset is its whole subset with weight 1, so "
                "CREST trains on random batches and still pays for its selections. Raise `random_subset_size` "
                "(about twice the global batch or more), or pass selection='random'."
            )
        elif subset < 2 * global_batch:
            rank_zero_warn(
                f"`random_subset_size`={self.random_subset_size} gives random subsets of r={subset} examples, less "
                f"than twice the global batch of {global_batch}: each coreset keeps {global_batch} of its subset's "
                f"{subset} examples, so CREST selects little and still pays for its selections. Raise "
                "`random_subset_size` (about twice the global batch or more) or lower the batch size, or pass "
                "selection='random'."
            )
        elif global_batch <= classes and subset > 3 * global_batch:
            rank_zero_warn(
                f"`random_subset_size`={self.random_subset_size} gives random subsets of r={subset} examples for "
                f"coresets of {global_batch} over {classes} classes: at most one pick per class, each standing "
                f"for about {subset / global_batch:.0f} examples. Facility location then picks each class's most "
                "central examples, mostly ones already learned, and CREST can fall behind random batches (balanced "
                "Fashion-MNIST in batches of 8: 74% with r=100, 80% with r=40, 82% with r=20, random batches 82%; "
                f"on a long-tailed version r=100 did better than random). Consider `random_subset_size` of about "
                f"{2 * global_batch} to {3 * global_batch}, or a larger batch."
            )
        if (
            self.check_sample == "subset"
            and self.check_size is not None
            and 0 < subset - self.check_size < world_size
        ):
            raise ValueError(
                f"`check_size`={self.check_size} leaves {subset - self.check_size} of the random subset's r={subset} "
                f"examples to score besides it, fewer than the {world_size} processes that share them; "
                f"lower it to at most {subset - world_size}, or pass None to check on the whole subset."
            )
        if self.check_size is not None and self.check_size < world_size:
            raise ValueError(
                f"`check_size`={self.check_size} is smaller than the {world_size} processes that share each "
                "check; raise it."
            )

    def _apply_restored_plan(self, dm: CrestDataModule) -> None:
        """Serve the restored coresets from the restored cursor, the epoch's iterator from the restored step."""
        state = self._loaded_state
        assert state is not None
        try:
            self._refuse_another_run(dm)
        except ValueError:
            # The refused state is dropped, so that fitting again without `ckpt_path` starts afresh.
            self._release_data_module()
            self._reset_state()
            raise
        epoch_step = self._epoch_step
        assert self._trainer is not None
        if state["epoch_ended"] and not state["epoch_done"] and self._trainer.max_steps == -1:
            # Saved at the end of an epoch that a stop cut short: Lightning goes on with the next epoch, whole
            # (with `max_steps` set it finishes the stopped one instead, from the checkpoint's step).
            epoch_step = self._steps_per_epoch
            self._epoch_floor += 1
        # Its start-of-epoch work (a selection, the exclusion of learned examples) is not repeated on resume.
        started = state["epoch_started"] and not state["epoch_done"]
        self._started_epoch = int(state["epoch"]) if started else -1
        dm.plan.replace(list(zip(state["plan_indices"], state["plan_weights"])), int(state["plan_cursor"]))
        dm.plan.resume_step = epoch_step
        dm.plan.replay = list(zip(state["in_flight_indices"], state["in_flight_weights"]))
        self._loaded_state = None

    def _refuse_another_run(self, dm: CrestDataModule) -> None:
        """Raise if the restored checkpoint was trained with other settings, batches, epochs or training set."""
        state = self._loaded_state
        assert state is not None
        global_batch, steps_per_epoch = int(state["global_batch"]), int(state["steps_per_epoch"])
        trainer = self._trainer
        assert trainer is not None
        for name in ("fraction", "selection", "seed"):
            saved = state[name]
            if getattr(self, name) is not None and saved != getattr(self, name):
                raise ValueError(
                    f"The checkpoint was trained with CrestCallback({name}={saved!r}); this run's has "
                    f"{name}={getattr(self, name)!r}. Resume with {name}={saved!r}, or start afresh without "
                    "`ckpt_path`."
                )
        if global_batch != self._global_batch:
            raise ValueError(
                f"The checkpoint's coresets are global batches of {global_batch} examples; this run's are "
                f"{trainer.world_size} process{'es' if trainer.world_size > 1 else ''} x batch_size={dm.batch_size} = "
                f"{self._global_batch}. Resume with "
                f"batch_size x devices x num_nodes = {global_batch}, or start afresh."
            )
        if steps_per_epoch != self._steps_per_epoch:
            raise ValueError(
                f"The checkpoint's epochs have {steps_per_epoch} steps; this run's have {self._steps_per_epoch} "
                f"(ceil(fraction * n / global batch) with fraction={self.fraction}, n={len(self._labels)}). Resume "
                "with the checkpoint's `fraction` and training set, or start afresh."
            )
        assert self._pool is not None
        if len(self._pool) != len(self._labels):
            raise ValueError(
                f"The checkpoint was trained on a training set of {len(self._pool)} examples; this run's has "
                f"{len(self._labels)}. Resume with the checkpoint's training set, or start afresh without `ckpt_path`."
            )
        # Checkpoints saved before the fingerprint was kept have none: their training set is taken on trust.
        digest = state.get("labels_digest")
        if digest and digest != _digest(self._labels):
            # Its pool, plan and check sample are positions in the training set: they would be other examples' here.
            raise ValueError(
                f"The checkpoint was trained on a training set of {len(self._labels)} examples with other labels, "
                "in order, than this run's: another split or order of the data (a `random_split` without a seeded "
                "`generator`, say). Resume with the checkpoint's training set, in its order, or start afresh "
                "without `ckpt_path`."
            )

    def _subset_size(self, n: int, global_batch: int) -> int:
        """``r`` for ``n`` training examples and this global batch; raises if it, or ``check_size``, cannot be."""
        if isinstance(self.random_subset_size, float):
            subset = min(n, max(global_batch, _ceil_share(self.random_subset_size, n)))
        elif not global_batch <= self.random_subset_size <= n:
            raise ValueError(
                f"`random_subset_size`={self.random_subset_size} must lie between the global batch "
                f"({global_batch}) and the training set size ({n}): a coreset is picked from each random subset."
            )
        else:
            subset = self.random_subset_size
        if self.check_size is not None and self.check_size > subset:
            raise ValueError(
                f"`check_size`={self.check_size} exceeds the random subset size r={subset}; lower it, raise "
                "`random_subset_size`, or pass None to check on r examples."
            )
        return subset

    @property
    def _pool_size(self) -> int:
        return 0 if self._pool is None else int(self._pool.sum())

    @property
    def _dropping(self) -> bool:
        return self.drop_learned and self.selection == "crest"

    # --- selection -----------------------------------------------------------------------------------------

    def _select(self, steps_left: int) -> None:
        """Plan new batches: ``P`` coresets and a new quadratic model, or random batches for the epoch's rest."""
        assert self._pool is not None
        with self._timed(selection=True):
            if self.selection == "random":
                batches = self._draw(steps_left, self._global_batch).unbind(0)
                self._dm.plan.replace([(b, torch.ones(len(b))) for b in batches])
            else:
                self._select_coresets()
            self._selections += 1
            self._steps_since_selection = 0
            self._select_next_epoch = False
            # Batches read ahead but not trained, and those a restore has still to serve, come before the new plan's.
            self._stale = self._dm.plan.served - self._trained + len(self._dm.plan.replay)

    def _select_coresets(self) -> None:
        """Pick the coresets probed for the quadratic model, then plan ``P = b T1`` coresets with this selection's
        ``T1``: the probed ones, and random subsets whose coresets are picked when the sampler first reaches them.

        Lazy picks compute their proxies with the weights of the step that trains them. In measured runs the check
        failed before a selection's last coresets were reached about half the time, and their forward passes were
        the largest part of CREST's cost.
        """
        self._share_running_stats()
        self._anchor_stats = [stat.clone() for stat in self._running_stats()]
        probed = min(self._num_coresets, self.hessian_probes or self._num_coresets)
        subsets = self._draw(probed, self._subset)
        # The check sample, loaded once, so that the loss at the selection (L0) and at every check are measured on
        # the same inputs, random augmentations included; its items are read under a seed of their own, so that a
        # restored run loads the same views again.
        checked = self.check_size or self._subset
        self._check_seed = item_seed(self._seed, self._selections)  # every bit of the seed counts
        if self.check_sample == "independent":
            self._check_indices = self._draw(1, checked)[0]
            self._check_batches = self._fetch_share(self._check_indices, self._check_seed)
            with self._timed("checks"):
                _, check_losses, _ = self._forward(self._check_indices, self._check_batches)
            self._record_losses(self._check_indices, check_losses)
            coresets, weights, _ = self._pick(subsets)
            loss0 = float(check_losses.mean())
        else:  # a random part of the first subset, put first and scored with it
            subsets[0] = subsets[0][torch.randperm(self._subset, generator=self._generator)]
            self._check_indices = subsets[0][:checked]
            self._check_batches = self._fetch_share(self._check_indices, self._check_seed)
            coresets, weights, losses = self._pick(subsets, self._check_batches)
            loss0 = float(losses[:checked].mean())
        with self._timed("hessian"):
            self._build_model(coresets, weights, loss0)
        self._peak_curvature = max(self._peak_curvature, self._quadratic.curvature_norm())
        if self._selections > 0:
            self._interval = self._adapted_interval()
            self._num_coresets = self.coreset_mul * self._interval
        planned = list(zip(coresets.unbind(0), weights.unbind(0)))[: self._num_coresets]
        pending = max(0, self._num_coresets - len(planned))
        if pending:
            planned += [(subset, torch.empty(0)) for subset in self._draw(pending, self._subset)]
        self._dm.plan.replace(planned)

    def _pick(self, subsets: Tensor, check_batches: list[Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One weighted coreset from each random subset ``(k, r)``: indices and weights ``(k, m)``, losses ``(k r,)``.

        ``check_batches``: the loaded check sample, with which the first subset starts (see :meth:`_forward`).
        """
        # A restored plan may hold subsets drawn under another `random_subset_size`: each is picked at its own size.
        (count, size), flat = subsets.shape, subsets.flatten()
        with self._timed("proxies"):
            logits, losses, embeddings = self._forward(flat, check_batches, embed=self.embedding_proxy > 0)
        targets = self._labels[flat].to(logits.device)
        if embeddings is None:
            proxies = gradient_proxy(logits, targets)
        else:
            proxies = last_layer_sketch(logits, targets, embeddings, self.embedding_proxy, self._generator)
        assert self._trainer is not None
        if not bool(torch.isfinite(proxies).all()):
            hint = (
                f" They were scored under proxy_dtype={self.proxy_dtype}, whose range may have overflowed; try "
                "torch.bfloat16 or None."
                if self.proxy_dtype == torch.float16
                else ""
            )
            raise FloatingPointError(
                "Non-finite gradient proxies while picking a coreset at global step "
                f"{self._trainer.global_step}: the model's logits contain NaN or inf." + hint
            )
        self._record_losses(flat, losses)
        rows = targets.view(count, size)
        budgets = shares = None
        if not self._per_class:
            # More classes than picks: each subset's picks go to classes drawn in proportion to their sizes there.
            host_rows = rows.cpu()
            counts = torch.zeros(count, self._num_classes, dtype=torch.long)
            counts.scatter_add_(1, host_rows, torch.ones(count, size, dtype=torch.long))
            budgets = sampled_class_budgets(counts, self._global_batch, self._generator)
            shares = counts * (self._global_batch / size)
        with self._timed("greedy"):
            picked = facility_location(
                proxies.view(count, size, -1),
                self._global_batch,
                rows,
                similarity=self.similarity,
                knn=self.knn,
                backend=self.backend,
                budgets=budgets,
            )
        indices, weights = picked.indices, picked.weights.float()
        if self._trainer.world_size > 1:
            # Every process scores the same proxies, but a greedy on a GPU may break a near tie otherwise (its atomic
            # sums come in no fixed order): all train process 0's picks. (On the proxies' device, as NCCL needs.)
            indices, weights = (
                indices.to(proxies.device).contiguous(),
                weights.to(proxies.device).contiguous(),
            )
            broadcast_from_first(self._trainer, [indices, weights])
        indices, weights = indices.cpu(), weights.cpu()
        coresets = subsets.gather(1, indices)
        if shares is not None:
            # A class whose share is below one pick has one with that probability: it then stands for its size over
            # its share (r / m examples), so that every class keeps its share of the weight on average. (Scaling
            # each coreset to its own total instead would leave a rare class's pick about m / (m + 1) of its weight
            # in the coresets that hold one: 8/9 at m = 8.)
            weights = weights / shares.gather(1, host_rows.gather(1, indices)).clamp(max=1.0).float()
        # Cluster sizes sum to r per coreset (on average, as above); scaled to average 1 so the loss keeps the scale of
        # a plain mean.
        return coresets, weights * (self._global_batch / size), losses

    def _resolve(self, subset: Tensor) -> tuple[Tensor, Tensor]:
        with self._timed(selection=True):
            self._share_running_stats()
            coresets, weights, _ = self._pick(subset.unsqueeze(0))
        return coresets[0], weights[0]

    def _adapted_interval(self) -> int:
        """``T1 = ceil(h ||H_ref|| / ||H_t||)``, with ``H_ref`` the sharpest smoothed curvature met so far.

        The paper divides the curvature at the first selection by the current one, so that checks grow rarer as
        the loss flattens. Networks without normalisation start flatter than they become (the curvature rises
        several-fold over the first epochs), and then that ratio stays below 1 and ``T1`` at 1 for the whole run.
        Measuring the flattening from the sharpest point reached keeps the intent in both cases and equals the
        paper's rule when the curvature only decreases.
        """
        return self._quadratic.check_interval(self.interval_mul, reference=self._peak_curvature)

    def _draw(self, count: int, size: int) -> Tensor:
        """``count`` class-stratified random subsets of ``size`` pool examples, each without repeats, and disjoint
        while every class has members for its quotas in all of them (a class's quota rounds up in some subsets)."""
        assert self._pool is not None
        members = torch.nonzero(self._pool).flatten()
        shuffled = members[torch.randperm(len(members), generator=self._generator)]
        order = torch.sort(self._labels[shuffled], stable=True)
        grouped = shuffled[order.indices]
        counts = torch.bincount(order.values, minlength=self._num_classes)
        if int((counts > 0).sum()) > size:
            # More classes than slots: plain uniform subsets, in the shuffled order (not the class-sorted one).
            positions = (torch.arange(count).unsqueeze(1) * size + torch.arange(size)) % len(shuffled)
            return shuffled[positions]
        quotas = stratified_quotas(counts, size, count, self._generator)
        # Each class's members in turn: subset k takes the next quotas[k, c] of class c, from where k - 1 stopped
        # (wrapping round a class with fewer members than its quotas). All classes at once, class by class.
        starts = counts.cumsum(0) - counts
        per_class = quotas.sum(0)
        classes = torch.repeat_interleave(torch.arange(len(counts)), per_class)
        rank = torch.arange(len(classes)) - (per_class.cumsum(0) - per_class)[classes]
        picks = grouped[starts[classes] + rank % counts[classes]]
        owners = torch.repeat_interleave(torch.arange(count).repeat(len(counts)), quotas.T.reshape(-1))
        # Grouped by subset (a stable sort keeps the classes in order within each).
        return picks[torch.sort(owners, stable=True).indices].view(count, size)

    # --- forward passes ------------------------------------------------------------------------------------

    def _forward(
        self, indices: Tensor, check_batches: list[Any] | None = None, *, embed: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Logits ``(k, C)`` and losses ``(k,)`` of training examples in eval mode, split across processes, and with
        ``embed`` the inputs ``(k, D)`` of the last linear layer (else ``None``).

        With ``check_batches`` (this process's loaded share of the check sample), ``indices`` starts with the
        check sample, which is evaluated from those batches instead of being loaded again.
        """
        trainer = self._trainer
        assert trainer is not None
        head = 0 if check_batches is None else len(self._check_indices)
        # The check sample keeps the trainer's precision and its seed, as every later check measures it.
        parts: list[tuple[int, list[Any], torch.dtype | None, int | None]] = []
        if check_batches is not None:
            parts.append((head, check_batches, None, self._check_seed))
        if len(indices) > head:
            parts.append((len(indices) - head, self._fetch_share(indices[head:]), self.proxy_dtype, None))
        scored = [
            (self._evaluate(batches, dtype, seed, embed=embed), total)
            for total, batches, dtype, seed in parts
        ]

        def gathered(field: int) -> Tensor:
            return torch.cat([gather_shares(trainer, scores[field], total) for scores, total in scored])  # type: ignore[arg-type]

        self._check_labels(indices, gathered(2))
        return gathered(0), gathered(1), gathered(3) if embed else None

    def _check_labels(self, indices: Tensor, targets: Tensor) -> None:
        """CREST stratifies, selects and scores by :attr:`CrestDataModule.labels`, read once (from a ``targets``
        attribute when there is one, spot-checked there): the items it reads must agree with them."""
        expected = self._labels[indices.cpu()]
        wrong = torch.nonzero(targets.cpu() != expected).flatten()
        if len(wrong):
            first = int(wrong[0])
            raise ValueError(
                f"Training item {int(indices[first])} has target {int(targets[first])}, but CrestDataModule read its "
                f"label as {int(expected[first])} (from the dataset's `targets` attribute, or its parent's under a "
                "Subset; a `target_transform`?). CREST selects by those labels: make the attribute hold the targets "
                "the items return."
            )

    def _fetch_share(self, indices: Tensor, seed: int | None = None) -> list[Any]:
        """This process's :func:`share` of ``indices`` as CPU batches of at most ``eval_batch_size`` examples, read
        under ``seed`` if given (see :meth:`CrestDataModule.fetch`)."""
        trainer = self._trainer
        assert trainer is not None
        mine = indices[share(len(indices), trainer.global_rank, trainer.world_size)]
        return [self._dm.fetch(chunk.tolist(), seed) for chunk in torch.split(mine, self._dm.eval_batch_size)]

    def _evaluate(
        self,
        batches: list[Any],
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        *,
        embed: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Logits, losses and targets in eval mode without gradients, under autocast in ``dtype`` if given, and with
        ``embed`` the inputs of the last linear layer; ``seed``: the batches are kept (the check sample) and their
        transfer hooks run seeded (see :meth:`_on_device`)."""
        trainer, module = self._trainer, self._module
        assert trainer is not None
        assert module is not None
        layer = self._last_linear() if embed else None
        all_logits, all_losses, all_targets, all_embeddings = [], [], [], []
        for position, batch in enumerate(batches):
            # One batch on the device at a time (`eval_batch_size` is what fits); its hooks run as for a training
            # batch, in training mode and outside the pass's contexts.
            hook_seed = None if seed is None else self._hook_seed(seed, position)
            inputs, targets = self._on_device(batch, hook_seed)
            autocast = torch.autocast(module.device.type, dtype=dtype) if dtype is not None else nullcontext()
            captured: list[tuple[Tensor, Tensor]] = []
            with (
                eval_mode(module),
                torch.no_grad(),
                trainer.precision_plugin.forward_context(),
                autocast,
                inputs_of(layer, captured) if layer is not None else nullcontext(),
            ):
                logits = self._logits(module, inputs, targets).float()
                all_logits.append(logits)
                all_losses.append(self._losses(logits, targets).float())
                all_targets.append(targets.long())
            if layer is not None:
                all_embeddings.append(self._embeddings(layer, captured, logits))
        embeddings = torch.cat(all_embeddings) if layer is not None else None
        return torch.cat(all_logits), torch.cat(all_losses), torch.cat(all_targets), embeddings

    def _last_linear(self) -> torch.nn.Linear:
        """The module's last ``nn.Linear`` in registration order, whose inputs ``embedding_proxy`` sketches."""
        assert self._module is not None
        layers = [m for m in self._module.modules() if isinstance(m, torch.nn.Linear)]
        if not layers:
            raise ValueError(
                f"`embedding_proxy`={self.embedding_proxy} sketches the gradient of the last nn.Linear layer, the one "
                f"that gives the logits, but {type(self._module).__name__} has none. Pass embedding_proxy=0."
            )
        return layers[-1]

    def _embeddings(
        self, layer: torch.nn.Linear, captured: list[tuple[Tensor, Tensor]], logits: Tensor
    ) -> Tensor:
        """The inputs of ``layer`` in the forward pass that gave ``logits``, once it is sure its output is them."""
        if len(captured) != 1 or captured[0][0].ndim != 2 or not torch.equal(captured[0][1].float(), logits):
            calls = ", ".join(f"{tuple(x.shape)} -> {tuple(y.shape)}" for x, y in captured) or "no call"
            raise ValueError(
                f"`embedding_proxy`={self.embedding_proxy} needs the logits ({tuple(logits.shape)}) to be the output of "
                f"the module's last nn.Linear, as they are, called once per forward on (batch, features) inputs; its "
                f"last one ({layer}) had {calls}. Register the output layer last (with nothing added to its "
                "output), or pass embedding_proxy=0."
            )
        return captured[0][0].detach().float()

    def _hook_seed(self, seed: int, position: int) -> int:
        """Seed of the transfer hooks for batch ``position`` of this process's share of the check sample: apart
        from the seeds the sample's items are read under (``item_seed(seed, index)``) and from other processes'."""
        assert self._trainer is not None
        return item_seed(item_seed(seed, -1), (self._trainer.global_rank << 32) + position)

    def _on_device(self, batch: Any, seed: int | None = None) -> tuple[Any, Tensor]:
        """An ``(inputs, targets)`` batch of :meth:`CrestDataModule.fetch` on the device, as training batches get
        there: in the trainer's precision and through the batch-transfer hooks of the module (or data module), as a
        training batch of weight 1 each. With ``seed``, the batch is one that CREST keeps (the check sample): the hooks
        get a copy, so that one that changes its tensors in place leaves the kept batch as it was, and they run with
        the global generators seeded from ``seed`` and restored afterwards, so that random transforms there give the
        same views every time."""
        trainer, module = self._trainer, self._module
        assert trainer is not None
        assert module is not None
        if seed is not None:
            batch = apply_to_collection(batch, Tensor, Tensor.clone)
        inputs, targets = batch
        given = targets.to("cpu", copy=True)  # a hook may change the targets in place
        batch = trainer.precision_plugin.convert_input([inputs, targets, torch.ones(len(targets))])
        with seeded_generators(seed, module.device) if seed is not None else nullcontext():
            batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
            batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        check_transferred(batch, given)
        return batch[0], batch[1]

    def _logits(self, module: L.LightningModule, inputs: Any, targets: Tensor) -> Tensor:
        try:
            logits = self.compute_logits(module, inputs)
        except TypeError as error:
            overridden = type(self).compute_logits is not CrestCallback.compute_logits
            if not overridden and hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(
                    "CREST scores examples with `pl_module(inputs)`; if `forward` takes other arguments or does not "
                    "return class logits, override CrestCallback.compute_logits(pl_module, inputs)."
                )
            raise
        check_logits(logits, len(targets), self._num_classes)
        if not self._logits_probed:  # once per fit
            self._logits_probed = True
            warn_on_probabilities(logits)
        return logits

    def _losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        losses = self.per_example_loss(logits, targets)
        check_losses(losses, targets, logits)
        if self._dropping and not self._floor_probed:
            self._floor_probed = True
            self._warn_on_a_loss_floor(logits, targets)
        return losses

    def _warn_on_a_loss_floor(self, logits: Tensor, targets: Tensor) -> None:
        """Warn when ``per_example_loss`` stays above ``drop_threshold`` on confident correct predictions of the
        batch's targets (``+m/2`` for the target, ``-m/2`` elsewhere, margins ``m`` from 0.5 to 1024 in steps of
        ``2^(1/8)``): then no example can ever be excluded as learned. Draws no random numbers."""
        try:
            with torch.no_grad():
                signs = F.one_hot(targets, logits.shape[1]).float().mul_(2).sub_(1).div_(2)
                lowest = min(
                    float(self.per_example_loss(signs * 2.0 ** (step / 8), targets).min())
                    for step in range(-8, 81)
                )
        except Exception:  # advisory only: a loss that needs more than (logits, targets) is not probed
            return
        if lowest > self.drop_threshold:
            rank_zero_warn(
                f"`per_example_loss` stays above `drop_threshold`={self.drop_threshold} even on confident correct "
                f"predictions (its lowest value on them was about {lowest:.3g}), so no example can be excluded as "
                "learned. With label smoothing, cross-entropy stays above the entropy of the smoothed targets (0.50 "
                "for 0.1 over 10 classes): raise `drop_threshold` above that, or pass drop_learned=False."
            )

    # --- quadratic model -----------------------------------------------------------------------------------

    def _model_parameters(self, module: torch.nn.Module | None = None) -> list[Tensor]:
        module = module if module is not None else self._module
        assert module is not None
        if self.hessian_params == "all":
            return [p for p in module.parameters() if p.requires_grad]
        owner = last_owner(module)
        return [p for p in owner.parameters(recurse=False) if p.requires_grad] if owner is not None else []

    def _check_last_layer(self, owner: torch.nn.Module, outputs: list[Any], logits: Tensor) -> None:
        """Warn when the module whose parameters ``hessian_params='last_layer'`` models does not give the logits."""
        # A head whose output is reshaped into the logits (a 1x1 convolution's (B, C, 1, 1), flattened) gives them.
        if not any(
            isinstance(out, Tensor)
            and out.numel() == logits.numel()
            and torch.equal(out.detach().reshape(logits.shape).to(logits.dtype), logits.detach())
            for out in outputs
        ):
            rank_zero_warn(
                f"hessian_params='last_layer' models {', '.join(self._modelled_names())}, the parameters of the last "
                f"module registered with any ({type(owner).__name__}), but that module's output is not the logits: "
                "the quadratic model describes another layer than the output one. Register the output layer last, or "
                "pass hessian_params='all'."
            )

    def _modelled_names(self) -> tuple[str, ...]:
        """Names of the parameters the quadratic model would describe now (see :meth:`_model_parameters`)."""
        assert self._module is not None
        chosen = {id(p) for p in self._model_parameters()}
        return tuple(name for name, p in self._module.named_parameters() if id(p) in chosen)

    def _build_model(self, coresets: Tensor, weights: Tensor, loss: float) -> None:
        """Update the smoothed gradient with each given coreset, and the curvature with one Hutchinson probe per
        coreset at every ``hessian_every``-th selection; then anchor the model here."""
        trainer = self._trainer
        assert trainer is not None
        names = self._modelled_names()
        if names != self._modelled:
            # Other parameters are trained now (a backbone unfrozen, say): their model starts afresh.
            if self._modelled:
                self._quadratic, self._peak_curvature = QuadraticModel(), 0.0
            self._modelled = names
        params = self._model_parameters()
        mine = batch_share(trainer.global_rank, trainer.world_size)
        probe = self._selections % self.hessian_every == 0 or self._quadratic.curvature_steps == 0
        double_backward = probe and self.second_order
        for coreset, weight in zip(coresets, weights, strict=True):
            # This process's picks, by their place in the coreset.
            positions = torch.arange(len(coreset))[mine]
            grad, curvature = self._coreset_derivatives(
                coreset[mine], weight[mine], params, double_backward, positions
            )
            flat_grad = mean_over_processes(trainer, grad)
            if curvature is not None:
                curvature = mean_over_processes(trainer, curvature)
            for name, values in (("gradient", flat_grad), ("curvature", curvature)):
                # Smoothed across the run, one non-finite value would leave every later prediction NaN.
                if values is not None and not bool(torch.isfinite(values).all()):
                    raise FloatingPointError(
                        f"Non-finite {name} of a coreset's loss for the quadratic model at global step "
                        f"{trainer.global_step}: the loss or its derivatives overflowed. Lower the learning rate if "
                        "training diverges; for the curvature alone, probe fewer parameters (hessian_params="
                        "'last_layer'), train in 32-bit precision, or pass second_order=False."
                    )
            if not probe:
                self._quadratic.update([flat_grad])
                continue
            # The first-order model has no curvature beyond the model's eps.
            flat_curv = torch.zeros_like(flat_grad) if curvature is None else curvature
            self._quadratic.update([flat_grad], [flat_curv])
        self._quadratic.anchor(params, loss)

    def _coreset_derivatives(
        self, indices: Tensor, weights: Tensor, params: list[Tensor], probe: bool, positions: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Flat gradient of this process's share of a coreset's weighted mean loss, with a Hutchinson estimate of its
        Hessian diagonal when ``probe``, taken on every ``hessian_subsample``-th pick of the whole coreset (see the
        argument). ``positions`` are the share's places in the coreset.

        Both are scaled so that their mean over the processes is the whole coreset's: the gradient of its mean loss,
        and the curvature of its sample's mean loss, whichever process holds the sampled picks.
        """
        trainer, module = self._trainer, self._module
        assert trainer is not None
        assert module is not None
        rows = torch.arange(len(indices))
        sampled = (
            positions % self.hessian_subsample == 0 if probe else torch.zeros(len(indices), dtype=torch.bool)
        )
        # This process's part of the whole sample, times the processes that average the curvature.
        coreset_size = len(indices) * trainer.world_size
        sample_share = (
            int(sampled.sum()) * trainer.world_size / math.ceil(coreset_size / self.hessian_subsample)
        )
        grad = torch.zeros(sum(p.numel() for p in params), device=module.device)
        curvature = None
        if probe and not bool(sampled.any()):
            # No sampled pick here: the probe vector is drawn all the same, as every process draws it.
            rademacher_like(params, self._generator)
            curvature = torch.zeros_like(grad)
        # The probed examples first, with the graph for the double backward; then the rest with a plain backward.
        for part, graph in ((rows[sampled], True), (rows[~sampled], False)):
            if len(part) == 0:
                continue
            inputs, targets = self._on_device(self._dm.fetch(indices[part].tolist()))
            # Fused attention kernels have no second derivative; the math kernel computes the same attention.
            attention = sdpa_kernel(SDPBackend.MATH) if graph else nullcontext()
            # Once per fit, 'last_layer' is checked to be the layer that gives the logits.
            checking = self.hessian_params == "last_layer" and not self._last_layer_checked
            watched = last_owner(module) if checking else None
            calls: list[tuple[Any, Any]] = []
            with (
                eval_mode(module),
                torch.enable_grad(),
                trainer.precision_plugin.forward_context(),
                attention,
                inputs_of(watched, calls) if watched is not None else nullcontext(),
            ):
                logits = self._logits(module, inputs, targets)
                if watched is not None:
                    self._last_layer_checked = True
                    self._check_last_layer(watched, [output for _, output in calls], logits)
                share = len(part) / len(rows)  # of the mean over all the examples
                if not logits.requires_grad:
                    raise ValueError(
                        f"The logits that CREST computes with `{type(module).__name__}.forward` (through "
                        "`CrestCallback.compute_logits`) carry no gradient, so the quadratic model cannot be built: "
                        "a `forward` under `torch.no_grad()` or `torch.inference_mode()`, say, or one that detaches "
                        "its output. Leave gradients on in `forward` (and disable them where you predict), or "
                        "override CrestCallback.compute_logits."
                    )
                part_loss = (weights[part].to(module.device) * self._losses(logits, targets)).mean() * share
                if not part_loss.requires_grad:
                    raise ValueError(
                        "`per_example_loss` returned losses that carry no gradient (it detaches the logits, or "
                        "computes under `torch.no_grad()`), so the quadratic model cannot be built. Return a loss "
                        "computed from the logits with gradients on."
                    )
                try:
                    grads = torch.autograd.grad(part_loss, params, create_graph=graph, allow_unused=True)
                except (RuntimeError, NotImplementedError) as error:
                    # Some compiled graphs refuse already to keep their own graph for a second pass.
                    if not graph or _out_of_memory(error):
                        raise
                    raise self._no_double_backward(module, error) from error
                if all(g is None for g in grads):
                    raise ValueError(
                        f"`hessian_params`={self.hessian_params!r} chose parameters that the loss does not depend "
                        f"on ({sum(p.numel() for p in params)} values of {type(module).__name__}); the quadratic "
                        "model would be flat. With 'last_layer', register the output layer last, or pass 'all'."
                    )
                # A sparse gradient (`nn.Embedding(sparse=True)`) as the dense one the model's values are laid out by.
                grads = tuple(
                    torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g
                    for g, p in zip(grads, params, strict=True)
                )
                if graph:
                    # The probe estimates the Hessian of the sample's own mean loss.
                    try:
                        hessian = hutchinson_diagonal(grads, params, self._generator)
                    except (RuntimeError, NotImplementedError) as error:
                        if _out_of_memory(error):
                            raise
                        raise self._no_double_backward(module, error) from error
                    curvature = torch.cat([h.flatten() for h in hessian]).div_(share)
                    if sample_share != 1:
                        curvature.mul_(sample_share)
            grad += torch.cat([g.detach().flatten() for g in grads])
        return grad, curvature

    def _no_double_backward(self, module: torch.nn.Module, error: BaseException) -> RuntimeError:
        """The error for a model that cannot be differentiated twice, with the ways around it."""
        if compiled(module):
            way = (
                "The model is compiled (torch.compile), and its compiled graph has none: keep the modules that "
                "`forward` (or `compute_logits`) calls uncompiled and compile only what the training step calls "
                "(kept out of the module tree: `self._compiled = [torch.compile(self.net)]`)"
            )
        elif self.hessian_params == "last_layer":
            way = (
                f"hessian_params='last_layer' probed {', '.join(self._modelled)}, the parameters of the last module "
                "that has any: register the output layer last"
            )
        else:
            way = "Pass hessian_params='last_layer' to probe the last layer only"
        return RuntimeError(
            "The Hutchinson probe of the quadratic model takes a double backward pass through the model, which "
            f"failed: {str(error).rstrip('.')}. Some layers have no second derivative (EmbeddingBag, compiled "
            f"models). {way}, or pass second_order=False for a first-order model."
        )

    def _running_stats(self) -> list[Tensor]:
        """The module's normalisation statistics (BatchNorm's running mean and variance): training steps move them
        and eval-mode passes use them, but the quadratic model, a function of the parameters, cannot see them."""
        assert self._module is not None
        return [
            stat
            for m in self._module.modules()
            if isinstance(m, torch.nn.modules.batchnorm._NormBase)
            for stat in (m.running_mean, m.running_var)
            if stat is not None
        ]

    def _share_running_stats(self) -> None:
        """Give every process process 0's normalisation statistics before CREST's own passes.

        DDP broadcasts process 0's buffers at every training forward (unless ``broadcast_buffers=False``), so a
        process's own update of them never reaches training, but CREST's passes between two steps would see it. A
        checkpoint holds process 0's alone: sharing them keeps the passes of a resumed run those of the
        uninterrupted one.
        """
        assert self._trainer is not None
        broadcast_from_first(self._trainer, self._running_stats())

    def _check(self) -> bool:
        """Compare the quadratic model with the loss on the check sample; True when it drifted past ``tau``."""
        trainer = self._trainer
        assert trainer is not None
        if self._modelled_names() != self._modelled:
            # Parameters were frozen or unfrozen since the selection: the model describes other ones.
            self._rho = math.nan
            return True
        with self._timed("checks"):
            indices = self._check_indices
            if self._check_batches is None:  # after a restore
                self._check_batches = self._fetch_share(indices, self._check_seed)
            # With the normalisation statistics of the selection, as L0 was measured: the quadratic model is a
            # function of the parameters only (the recorded losses for exclusion use them too).
            with swapped(self._running_stats(), self._anchor_stats):
                _, losses, _, _ = self._evaluate(self._check_batches, seed=self._check_seed)
            losses = gather_shares(trainer, losses, len(indices))
            self._record_losses(indices, losses)
            actual = float(losses.mean())
            if not math.isfinite(actual):
                raise FloatingPointError(
                    f"Non-finite loss on the check sample at global step {trainer.global_step}: training diverged."
                )
            self._rho = relative_error(self._quadratic.predict(self._model_parameters()), actual)
            self._checks += 1
            # A prediction that overflowed (NaN: the model's terms inf of both signs) describes nothing: re-select.
            failed = math.isnan(self._rho) or self._rho > self.tau
            # Every process computes the same rho; agreeing explicitly keeps them in step if rounding ever differs.
            return bool(trainer.strategy.reduce_boolean_decision(failed, all=False))

    # --- learned examples ----------------------------------------------------------------------------------

    def _record_losses(self, indices: Tensor, losses: Tensor) -> None:
        if self._dropping:
            # An example scored twice in one call (overlapping subsets) keeps the larger of its losses.
            idx, inverse = torch.unique(indices.cpu(), return_inverse=True)
            largest = torch.full((len(idx),), -math.inf).scatter_reduce_(
                0, inverse, losses.detach().float().cpu(), reduce="amax"
            )
            self._window_max_loss[idx] = torch.fmax(self._window_max_loss[idx], largest)

    def _drop_learned_examples(self) -> int:
        """Drop pool examples whose every loss recorded in the window was at most ``drop_threshold``; returns how
        many."""
        assert self._pool is not None
        with self._timed("exclusion"):
            dropped = learned_examples(
                self._window_max_loss,
                self._pool,
                self._labels,
                threshold=self.drop_threshold,
                min_pool_fraction=self.min_pool_fraction,
                min_class_fraction=self.min_class_fraction,
                min_pool=self._subset,  # random subsets are drawn from the pool
            )
            self._pool[dropped] = False
            self._window_max_loss.fill_(math.nan)
        return len(dropped)

    # --- bookkeeping ---------------------------------------------------------------------------------------

    def _check_weights_used(self, batch: Any) -> None:
        self._weights_checked = True
        if not is_weighted_batch(batch):
            rank_zero_warn(
                "CrestCallback could not find the (inputs, targets, weights) batch that CrestDataModule serves; "
                "make sure the training loss multiplies each example's loss by its weight."
            )
            return
        probe, self._weights_probe = self._weights_probe, None
        if probe is None:
            # The step's batch did not reach `on_train_batch_start` (a `training_step` that takes `dataloader_iter`).
            rank_zero_warn(
                "CrestCallback could not check that the training loss uses the batch's weights: the batch was not "
                "given to `on_train_batch_start` (as with a `training_step` that takes `dataloader_iter`). Make sure "
                "the loss multiplies each example's loss by its weight; unweighted, the coresets train a biased sample."
            )
            return
        probe.requires_grad_(False)
        assert self._trainer is not None
        strategy = self._trainer.strategy

        def anywhere(decision: bool) -> bool:  # every process decides alike
            return bool(strategy.reduce_boolean_decision(decision, all=False))

        if anywhere(probe.grad is None):
            raise RuntimeError(
                "The training loss does not use the batch's weights: CREST batches are weighted coresets and "
                "training on them unweighted trains on a biased sample. Unpack `inputs, targets, weights = batch` "
                "and return `weighted_cross_entropy(logits, targets, weights)` (or multiply per-example losses "
                "by `weights` before averaging, without detaching them: this check follows the loss's graph)."
            )
        # A loss that weights each example has d loss / d weight_i = loss_i / B, as different as the losses. The same
        # gradient for every weight while the losses differ is that of a loss scaled by the weights' mean (1 in a
        # coreset), unweighted in effect: `losses.mean() * weights.mean()`, or `(losses * weights[:, None]).mean()`
        # broadcast to (B, B). Examples whose losses are all equal (a last layer that starts at zero) tell nothing.
        assert probe.grad is not None
        grad = probe.grad.detach().flatten().float()
        scale = float(grad.abs().max()) if len(grad) else 0.0
        spread = float(grad.max() - grad.min()) if len(grad) else 0.0
        telling = math.isfinite(scale) and scale > 0 and len(grad) > 1
        # Under selection="random" every weight is 1: scaling the loss by their mean weights each example alike.
        uniform = telling and spread <= 1e-6 * scale and self.selection == "crest"
        if anywhere(uniform and self._batch_losses_differ):
            raise RuntimeError(
                "The training loss gave every example's weight the same gradient although the examples' losses "
                "differ: it scales the batch's loss by the weights' mean (1 in every coreset) instead of weighting "
                "each example's loss by its own weight, so it trains on the coresets unweighted, a biased sample. "
                "Multiply per-example losses of shape (B,) by `weights` of shape (B,) before averaging (not "
                "`weights[:, None]`, and not `loss.mean() * weights.mean()`), or return "
                "`weighted_cross_entropy(logits, targets, weights)`."
            )
        if anywhere(telling and not uniform):
            return
        # Zero or non-finite gradients, or equal losses: tried again at the next steps, for a while.
        self._undecided_weight_steps += 1
        if self._undecided_weight_steps < _WEIGHT_CHECK_STEPS:
            self._weights_checked = False
            return
        rank_zero_warn(
            f"CrestCallback could not tell in {_WEIGHT_CHECK_STEPS} steps whether the training loss weights each "
            "example's loss by its own weight (the loss's gradient with respect to the weights was zero or not "
            "finite, or the same for every example while their losses were equal too). Make sure it does, as "
            "`weighted_cross_entropy(logits, targets, weights)` does; unweighted, the coresets train a biased sample."
        )

    def _losses_differ(self, module: L.LightningModule, batch: Any) -> bool:
        """Whether the per-example losses of a training batch's first ``eval_batch_size`` examples differ, by more
        than 1e-3 of the largest and than the rounding of the logits' dtype (a loss computed in bf16 rounds equal
        what float32 tells apart). From a forward pass in eval mode without gradients, on a copy of the inputs, the
        global generators restored after it and no statistics moved; False if it cannot be had."""
        trainer = self._trainer
        assert trainer is not None
        count = min(len(batch[1]), self._dm.eval_batch_size)
        # A copy: a forward may change its inputs in place, and the training step reads them next.
        inputs = apply_to_collection(batch[0], Tensor, lambda t: t[:count].clone())
        targets = batch[1][:count]
        try:
            # A forward that draws random numbers in eval mode too leaves the training's draws as they would be.
            with (
                self._timed(),
                restored_generators(module.device),
                torch.no_grad(),
                eval_mode(module),
                trainer.precision_plugin.forward_context(),
            ):
                logits = self._logits(module, inputs, targets)
                losses = self._losses(logits, targets).float()
        except Exception:  # advisory: without the losses the weights' check waits for a step that decides it
            return False
        top = float(losses.abs().max()) if len(losses) else 0.0
        rounding = 4 * torch.finfo(logits.dtype).eps if logits.is_floating_point() else 0.0
        return math.isfinite(top) and float(losses.max() - losses.min()) > max(1e-3, rounding) * top

    @contextmanager
    def _timed(self, phase: str | None = None, *, selection: bool = False) -> Iterator[None]:
        """Time CREST's own work: into ``phase`` of :attr:`timings`, and once (outermost) into the totals."""
        start = time.perf_counter()
        self._timing_depth += 1
        try:
            yield
        finally:
            self._timing_depth -= 1
            module = self._module
            if module is not None and module.device.type == "cuda":
                torch.cuda.synchronize(module.device)  # the phase's kernels are its time, not the next one's
            elapsed = time.perf_counter() - start
            if phase is not None:
                self._timings[phase] += elapsed
            if self._timing_depth == 0:
                self._crest_time += elapsed
                if selection:
                    self._selection_time += elapsed

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log :attr:`statistics` as ``crest/*`` at the steps where the loggers write (and see
        :meth:`on_train_epoch_end`).

        Lightning's ``log`` costs about half a millisecond per value, 3.5 ms per step for these seven on a 2-core
        CPU (as much as a small model's whole training step), and its loggers write step values only every
        ``log_every_n_steps`` steps.
        """
        # Lightning's own test of whether the loggers write at this step; if it ever goes, log at every step.
        if not trainer.barebones and getattr(trainer._logger_connector, "should_update_logs", True):
            self._log_statistics(pl_module, epoch=False)

    def _log_statistics(self, pl_module: L.LightningModule, *, epoch: bool) -> None:
        # Epoch values are the same on every process but the overhead; unsynced, they make Lightning warn.
        metrics = {f"crest/{name}": value for name, value in self.statistics.items()}
        pl_module.log_dict(
            metrics, on_step=not epoch, on_epoch=epoch, batch_size=self._global_batch, sync_dist=epoch
        )


def _digest(labels: Tensor) -> str:
    """A fingerprint of the training set's labels, in order, that a checkpoint keeps."""
    return hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest()


def _ceil_share(fraction: float, total: int, per: int = 1) -> int:
    """``ceil(fraction * total / per)`` for the fraction as written in decimal: in floats, 0.07 * 50000 / 125 is
    28.000000000000004, and a step or an example more than asked for."""
    return math.ceil(Fraction(repr(fraction)) * total / per)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA's own error, or a CPU allocator's RuntimeError), which a
    smaller batch fixes and no advice about second derivatives would."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        text in str(error) for text in ("out of memory", "can't allocate memory")
    )


def _fitting(trainer: L.Trainer | None) -> bool:
    return (
        trainer is not None
        and trainer.state.fn == TrainerFn.FITTING
        and trainer.state.status == TrainerStatus.RUNNING
    )
