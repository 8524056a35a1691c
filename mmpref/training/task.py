"""What the training loop needs of a task: the contract :class:`~mmpref.training.text_task.TextTask` and
:class:`~mmpref.training.diffusion_task.DiffusionTask` implement.

A task owns the model, the data and the reference, and turns a batch into
:class:`~mmpref.losses.LogRatios`; the loop (:mod:`mmpref.training.loop`) owns everything else.
The loop reads a task through these names only: the attributes and abstract methods below every task
has; the hooks at the end have no-op defaults, and a task overrides those it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor, nn

from mmpref.data.splits import Splits
from mmpref.losses import LogRatios

if TYPE_CHECKING:
    from mmpref.training.plan import RunPlan
    from mmpref.training.reference import Reference


class Split(Protocol):
    """One dataset split (``Task.train``, ``Task.eval``), indexed by row number 0 .. ``len(split) - 1``."""

    #: (N,) bool for unpaired rows, True = desirable (the loop balances batches by them); None for pairs
    labels: Tensor | None
    #: a stream (``streaming: true``): no length; ``stream(epoch)`` gives the epoch's rows, which the task's
    #: collate takes in place of positions
    streamed: bool

    def __len__(self) -> int: ...


class Task(ABC):
    """A modality's model, data and reference, as the one training loop drives them.

    The constructor only stores the plan and the accelerator. The loop then calls the stages below in order;
    each returns what the next one needs, and the task keeps it for the steps:

    1. :meth:`prepare_splits` -> the validated rows of ``train`` and ``eval`` (no model needed: bad rows and
       data problems are reported before any weights load);
    2. :meth:`load_models` -> the models, through their libraries' ``from_pretrained``;
    3. :meth:`build_artifacts` (models, splits) -> the splits with what training reads besides the rows
       (tokenized rows, prompt embeddings, latent caches);
    4. :meth:`make_reference` (models, splits) -> the reference (:mod:`mmpref.training.reference`);
    5. :meth:`wrap_for_training` (models) -> the module to train (gradient checkpointing, LoRA, EMA).

    Attributes set by the stages: ``model`` (the module to train, before ``accelerator.prepare``; the loop passes
    the prepared one back to :meth:`rows` and the hooks), ``train`` (the training :class:`Split`), ``eval`` (the
    evaluation split, or None) and ``reference``.
    """

    #: "text" | "diffusion": the model card's kind of model (pipeline tag, usage, tags)
    modality: ClassVar[str]
    #: what :meth:`count_units` counts ("tokens", "images"), for the throughput report
    unit: ClassVar[str]
    #: the model card's family: an SDXL pipeline (diffusion only)
    is_sdxl: bool = False

    model: nn.Module
    train: Split
    eval: Split | None

    def __init__(self, plan: RunPlan, accelerator) -> None:
        self.plan, self.cfg, self.accelerator = plan, plan.cfg, accelerator
        self.source = plan.source

    # -- the stages, in the order the loop calls them ---------------------------------------------
    @abstractmethod
    def prepare_splits(self) -> Splits:
        """The training and evaluation rows, validated (bad rows reported or left out)."""

    @abstractmethod
    def load_models(self) -> Any:
        """The models of the run, loaded (what :meth:`build_artifacts` and later stages take)."""

    @abstractmethod
    def build_artifacts(self, models: Any, splits: Splits) -> Splits:
        """The splits with what batches read besides the rows, computed or opened from their caches."""

    @abstractmethod
    def make_reference(self, models: Any, splits: Splits) -> Reference | None:
        """The run's reference (``plan.reference`` says which kind), or None for a reference-free loss."""

    @abstractmethod
    def wrap_for_training(self, models: Any) -> nn.Module:
        """The module to train: memory savers and LoRA applied, EMA set up."""

    # -- what every task implements ---------------------------------------------------------------
    @abstractmethod
    def collate_train(self, indices: list[int], epoch: int = 0) -> dict[str, Tensor]:
        """The training batch of these rows of ``train`` in ``epoch``; holds ``row_index`` (dataset rows, for
        messages). Any randomness is drawn from the run's seed, ``epoch`` and the rows, never from a global RNG:
        the loader reads a batch ahead, so a global RNG's position at collate time is not the step's."""

    @abstractmethod
    def collate_eval(self, indices: list[int]) -> dict[str, Tensor]:
        """The evaluation batch of these rows of ``eval`` (deterministic: evaluations are comparable)."""

    @abstractmethod
    def rows(self, model: nn.Module, batch: dict[str, Tensor]) -> LogRatios:
        """The per-row implicit log-ratios (and what the loss reads besides) of ``batch`` under ``model``.

        Runs under the loop's autocast, for training (with grad) and evaluation (no grad) alike.
        """

    @abstractmethod
    def count_units(self, batch: dict[str, Tensor]) -> int:
        """How many :attr:`unit` the batch holds, for the throughput report."""

    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the trained model (``model`` unwrapped) into ``out_dir``, in the form its library loads.

        ``state_dict``: the gathered weights when the model is sharded (FSDP, ZeRO-3), else None.
        Runs on the main process only.
        """

    # -- optional hooks (no-op defaults) ------------------------------------------------------------
    def sample_and_score(self, model: nn.Module, step: int) -> dict[str, float]:
        """At every evaluation, before the eval loss: generate and score samples; metrics to log."""
        return {}

    def after_optimizer_step(self, model: nn.Module) -> None:
        """After every optimizer step that updated the weights (not a skipped one); e.g. an EMA update."""
        return None

    def finalize(self, model: nn.Module) -> None:
        """After the last step, before the final evaluation and save; e.g. EMA weights in place of the trained."""
        return None

    def flush(self) -> None:
        """Before every checkpoint and at the end of training: write what the task holds in memory that a
        resumed or later run should find on disk (e.g. rows a lazily filled cache encoded since its last write)."""
        return None

    def data_metrics(self) -> dict[str, float]:
        """Counts about the data found while training (e.g. ``data/bad_rows_skipped``), for the logs and
        ``summary.json``; read on the main process."""
        return {}

    def checkpoint_objects(self) -> list:
        """Extra state (``state_dict`` / ``load_state_dict`` objects) saved in every checkpoint, restored on resume."""
        return []
