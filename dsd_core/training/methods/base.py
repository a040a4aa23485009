"""The seam between the training engine and a training method.

The engine (:class:`dsd_core.training.engine.Trainer`) owns everything every method needs: accelerate
(devices, DDP, mixed precision), the optimiser and LR schedule, gradient accumulation and clipping, the data order
and its sharding across processes, the latent/text cache, checkpoints and exact resume, SIGINT/cancel, logging,
validation timing and progress. A **method** says what is trained and how; subclass :class:`TrainingMethod`::

    class MyMethod(TrainingMethod):
        name = "my-method"           # CLI --method value, checkpoint tag
        Options = MyOptions          # a dataclass of the method's own options (CLI flags / YAML keys)

        def load(self, device, dtype): ...            # build models (via dsd_core.load_pipeline), freeze the base,
                                                      # add the trainable parts
        def trainable_module(self): ...               # the nn.Module accelerate wraps (its forward runs in loss())
        def trainable_parameters(self): ...           # parameters (or param groups) the optimiser updates
        def cache_fingerprint(self): ...              # what the cached encodings depend on (models, sizes)
        def encode_item(self, record): ...            # frozen encodings of one PairRecord -> dict of CPU tensors
        def loss(self, model, batch, generator): ...  # scalar loss of a collated batch
        def state_dict(self) / load_state_dict(state) # the trained tensors (checkpoints)
        def export(self, output_dir): ...             # write the artifact users load
        def validation_images(self, records, step): ...  # PIL images of fixed pairs

Contract (the engine relies on it, so keep it when adding methods):

* All randomness of :meth:`loss` (noise, timesteps, dropout) comes from the ``generator`` argument, a CPU
  ``torch.Generator`` the engine seeds, checkpoints and restores: this is what makes resume exact.
* :meth:`loss` calls ``model`` (the accelerate-wrapped :meth:`trainable_module`), not the bare module, so DDP
  synchronises gradients.
* :meth:`encode_item` returns CPU tensors; they are cached on disk under :meth:`cache_fingerprint` and
  the item's content hash, and reused by later runs. :meth:`collate` turns a list of them into a batch
  (default: ``torch.cat`` of each key; the encodings keep a leading batch dimension of 1).
* :meth:`state_dict` returns tensors only, keyed by stable names; :meth:`load_state_dict` restores them exactly.
* :meth:`export` runs on the main process only; :meth:`validation_images` too.

This interface only grows: new hooks get a default implementation so existing methods keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import TrainConfig

if TYPE_CHECKING:  # annotations only: importing this module stays light (the CLI's parser)
    import torch


@dataclass
class NoOptions:
    """This method has no options of its own."""


class TrainingMethod:
    """Base class of training methods (see the module docstring for the contract)."""

    #: Short name: the ``--method`` value and the tag in checkpoints.
    name: ClassVar[str] = ""
    #: Dataclass of the method's own options (fields become CLI flags and YAML keys, like TrainConfig's).
    Options: ClassVar[type] = NoOptions

    def __init__(self, config: TrainConfig, options: Any = None):
        self.config = config
        self.options = options if options is not None else self.Options()

    # ------------------------------------------------------------------ models
    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        """Load the models, freeze what does not train and add what does (on ``device``)."""
        raise NotImplementedError

    def trainable_module(self) -> torch.nn.Module:
        """The module that holds every trainable parameter and whose forward :meth:`loss` calls."""
        raise NotImplementedError

    def trainable_parameters(self) -> list:
        """Parameters (or optimiser param groups: dicts with ``params`` and e.g. ``lr``) to optimise."""
        return [p for p in self.trainable_module().parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        module = self.trainable_module()
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ data
    def cache_fingerprint(self) -> str:
        """A string that changes whenever :meth:`encode_item` would give different tensors for the same item."""
        raise NotImplementedError

    def encode_item(self, record) -> dict[str, torch.Tensor]:
        """The frozen encodings of one :class:`~dsd_core.training.data.PairRecord` (CPU tensors, batch dim 1)."""
        raise NotImplementedError

    def after_encoding(self) -> None:
        """Called once every item is encoded (e.g. to move encoders off the GPU)."""

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        import torch

        return {k: torch.cat([it[k] for it in items], dim=0) for k in items[0]}

    # ------------------------------------------------------------------ objective
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one (micro-)batch; all randomness from ``generator``."""
        raise NotImplementedError

    def tokens_per_sample(self) -> int:
        """Tokens the model processes per sample (for the tokens/s report); 0 if not meaningful."""
        return 0

    # ------------------------------------------------------------------ state and artifacts
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, saved in every checkpoint."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def export(self, output_dir: str) -> None:
        """Write the artifact (e.g. a model folder) into ``output_dir``."""
        raise NotImplementedError

    def validation_images(self, records: list, step: int) -> list:
        """PIL images rendered from fixed pairs (``records``) at ``step``; [] if the method renders none."""
        return []

    def memory_estimate(self) -> str | None:
        """A one-paragraph estimate of peak memory for these settings, printed before training (or None)."""
        return None

    def describe(self) -> dict:
        """Plain values describing the method's setup (written to the run's metadata)."""
        return {"method": self.name}
