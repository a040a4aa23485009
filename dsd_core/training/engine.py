"""The training engine: one loop for every method (:mod:`dsd_core.training.methods`).

:class:`Trainer` runs a :class:`~dsd_core.training.methods.base.TrainingMethod` under accelerate:

1. read and validate the data (every bad item reported before step 1);
2. load the method's models; encode every item once through the disk cache (:mod:`.cache`);
3. optimiser (AdamW, 8-bit AdamW with bitsandbytes, Adafactor, SGD), LR schedule (diffusers'), ``accelerate.prepare``;
4. resume from a checkpoint if asked (method state, optimiser, scheduler, every process's RNG, data position, step);
5. the loop: gradient accumulation (DDP gradients synchronised only on the last micro-step), clipping, logging to
   ``OUTPUT/logs/loss.csv`` (and TensorBoard if installed), validation images every M steps, checkpoints every N
   steps keeping the last K; SIGINT or a cancel callback saves a checkpoint and stops;
6. export the method's artifact into ``OUTPUT``.

**Data order.** Each epoch is a permutation of the items drawn from ``seed`` and the epoch number; a global micro-batch
takes ``batch_size x processes`` consecutive items and process ``p`` its ``p``-th slice, so processes see disjoint
shards. The position in the data is a function of the micro-step count, which is checkpointed: a resumed run sees
exactly the batches the uninterrupted run would have seen.

**Randomness.** Each process draws noise, timesteps and dropout from its own CPU generator (seeded with
``seed`` and the process index) whose state is saved in every checkpoint, so a resumed run continues bit for bit
(on CPU; on GPUs up to kernel nondeterminism).

**Checkpoints** are folders ``OUTPUT/checkpoints/step-NNNNNNNN/`` written under a temporary name and renamed when
complete: ``method.safetensors`` (the trained tensors), ``optimizer.safetensors`` and ``scheduler.safetensors``
(nested states as safetensors, see :mod:`.io`; never pickle), ``rng-<process>.safetensors``, and
``trainer_state.json`` (step, micro-step, epoch, config). A run killed at any moment resumes from the newest complete
folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import DSDError, InputError
from .config import TrainConfig, to_dict
from .io import atomic_write_text, load_tree, replace_dir, save_tree

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOGS = "logs"
VALIDATION = "validation"
STATE_FILE = "trainer_state.json"


class TrainingCancelled(DSDError):
    """Raised by a progress callback to stop training; the engine saves a checkpoint first."""


@dataclass
class TrainProgress:
    """What the progress callback receives after every optimiser step (and with validation images)."""

    step: int
    total_steps: int
    loss: float
    lr: float
    seconds_per_step: float
    tokens_per_second: float
    images: list = field(default_factory=list)  # validation images of this step, if any
    checkpoint: str | None = None  # the checkpoint written at this step, if any


@dataclass
class TrainResult:
    output_dir: str
    step: int
    losses: list  # [(step, loss), ...] of this run (including resumed history from loss.csv)
    interrupted: bool = False
    last_checkpoint: str | None = None
    validation_images: list = field(default_factory=list)  # the last ones rendered


# ---------------------------------------------------------------------------------------------- data order
class BatchPlan:
    """Which items process ``rank`` uses at micro-step ``m`` (see the module docstring)."""

    def __init__(self, num_items: int, batch_size: int, num_processes: int, rank: int, seed: int):
        self.num_items, self.batch_size = num_items, batch_size
        self.num_processes, self.rank, self.seed = num_processes, rank, seed
        self.global_batch = batch_size * num_processes
        if num_items < self.global_batch:
            raise InputError(f"the dataset has {num_items} pairs but one step needs {self.global_batch} "
                             f"(batch_size {batch_size} x {num_processes} processes); add pairs or lower the batch.")
        self.per_epoch = num_items // self.global_batch  # the last incomplete global batch is dropped
        self._perm_epoch, self._perm = -1, None

    def position(self, micro_step: int) -> tuple[int, int]:
        return divmod(micro_step, self.per_epoch)

    def indices(self, micro_step: int) -> list[int]:
        epoch, j = self.position(micro_step)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_items, generator=g).tolist(), epoch
        start = j * self.global_batch + self.rank * self.batch_size
        return self._perm[start:start + self.batch_size]


# ---------------------------------------------------------------------------------------------- optimiser
def build_optimizer(config: TrainConfig, params):
    name = config.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_epsilon, weight_decay=config.weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DSDError("optimizer adamw8bit needs bitsandbytes (CUDA): `pip install bitsandbytes`, or use "
                           "--optimizer adamw.") from None
        return bnb.optim.AdamW8bit(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                   eps=config.adam_epsilon, weight_decay=config.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_steps)


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
             "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _python_state():
    version, internal, gauss = random.getstate()
    return (version, list(internal), gauss)


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders of a run, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [os.path.join(root, n) for n in os.listdir(root)
             if n.startswith("step-") and not n.endswith(".old") and os.path.isfile(os.path.join(root, n, STATE_FILE))]
    return sorted(found)


def resolve_resume(config: TrainConfig) -> str | None:
    """The checkpoint folder ``--resume`` names (``latest`` or a path), or None to start fresh."""
    if not config.resume:
        return None
    if config.resume == "latest":
        found = list_checkpoints(config.output)
        if not found:
            logger.warning("--resume latest: no checkpoint in %s yet; starting from step 0.", config.output)
            return None
        return found[-1]
    path = os.path.expanduser(config.resume)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise InputError(f"--resume {path} is not a complete checkpoint folder (no {STATE_FILE}); pass 'latest' or "
                         f"a folder from {os.path.join(config.output, CHECKPOINTS)}.")
    return path


# ---------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Runs one training method; see the module docstring.

    ``callback(progress: TrainProgress)`` is called on the main process after every optimiser step; it may raise
    :class:`TrainingCancelled` (or any exception after which the run should stop) -- the engine then writes a
    checkpoint and stops (``TrainingCancelled``) or re-raises. ``should_stop()`` is polled every step (e.g. ComfyUI's
    interrupt flag); ``True`` saves and stops. ``progress_bar`` shows a tqdm bar on the main process.
    """

    def __init__(self, config: TrainConfig, method, callback: Callable[[TrainProgress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, progress_bar: bool = True,
                 handle_sigint: bool = True):
        if not config.output:
            raise InputError("no output folder given; pass --output DIR.")
        self.config = config
        self.method = method
        self.callback = callback
        self.should_stop = should_stop
        self.progress_bar = progress_bar
        self.handle_sigint = handle_sigint
        self._stop_requested = False
        self.accelerator = None

    # ------------------------------------------------------------------ setup
    def _make_accelerator(self, dtype: torch.dtype):
        from accelerate import Accelerator

        mp = self.config.mixed_precision
        if mp == "auto":
            mp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
        return Accelerator(mixed_precision=mp, cpu=self.config.cpu or self.config.device == "cpu")

    def _frozen_dtype(self) -> torch.dtype:
        from ..loading import resolve_dtype

        cpu = self.config.cpu or self.config.device == "cpu" or not torch.cuda.is_available()
        device = "cpu" if cpu else "cuda"
        return resolve_dtype(None if self.config.dtype == "auto" else self.config.dtype, device)

    def _prepare_data(self):
        from .data import load_pairs, validate_pairs

        c = self.config
        records = load_pairs(c.data, c.reference_column, c.target_column, c.caption_column)
        validate_pairs(records, min_size=c.min_image_size, source=c.data)
        return records

    def _encode(self, records):
        from .cache import TensorCache

        acc, c = self.accelerator, self.config
        cache_dir = c.cache_dir or os.path.join(c.data if os.path.isdir(c.data) else os.path.dirname(c.data),
                                                ".dsd_cache")
        cache = TensorCache(cache_dir, self.method.cache_fingerprint())
        # the main process fills the cache first; the others then read every entry from disk
        items = []
        if acc.is_main_process:
            items = [cache.get_or_compute(r.content_key(), lambda r=r: self.method.encode_item(r)) for r in records]
        acc.wait_for_everyone()
        if not acc.is_main_process:
            items = [cache.get_or_compute(r.content_key(), lambda r=r: self.method.encode_item(r)) for r in records]
        self.method.after_encoding()
        if acc.is_main_process:
            logger.info("encoded %d pairs (%d from the cache in %s)", len(items), cache.hits, cache.folder)
        return items

    # ------------------------------------------------------------------ main
    def train(self) -> TrainResult:
        c = self.config
        records = self._prepare_data()  # before loading any model: bad data fails in seconds
        dtype = self._frozen_dtype()
        self.accelerator = acc = self._make_accelerator(dtype)
        output = os.path.abspath(os.path.expanduser(c.output))
        resume_from = resolve_resume(c)
        if acc.is_main_process:
            os.makedirs(os.path.join(output, LOGS), exist_ok=True)
        torch.manual_seed(c.seed)
        self.method.load(acc.device, dtype)
        if c.gradient_checkpointing:
            self.method.enable_gradient_checkpointing()
        items = self._encode(records)
        validation_records = records[:c.validation_pairs]

        params = self.method.trainable_parameters()
        optimizer = build_optimizer(c, params)
        scheduler = build_scheduler(c, optimizer)
        model = self.method.trainable_module()
        model, optimizer = acc.prepare(model, optimizer)
        model.train()

        plan = BatchPlan(len(items), c.batch_size, acc.num_processes, acc.process_index, c.seed)
        generator = torch.Generator().manual_seed(c.seed * 7919 + acc.process_index)
        step = 0
        if resume_from is not None:
            step = self._load_checkpoint(resume_from, optimizer, scheduler, generator)
            if acc.is_main_process:
                print(f"resumed from {resume_from} at step {step}")
        loss_log = LossLog(os.path.join(output, LOGS), enabled=acc.is_main_process, resume_step=step)

        if acc.is_main_process:
            estimate = self.method.memory_estimate()
            if estimate:
                print(estimate)
            trainable = sum(p.numel() for g in params for p in (g["params"] if isinstance(g, dict) else [g]))
            print(f"training {self.method.name}: {len(items)} pairs, {trainable:,} trainable parameters, steps "
                  f"{step} -> {c.max_steps}, effective batch {c.batch_size * c.gradient_accumulation * acc.num_processes}"
                  f" ({acc.num_processes} process{'es' if acc.num_processes > 1 else ''}, {acc.device})")
            from .config import write_config

            write_config(os.path.join(output, LOGS, "config.json"), c, self.method.options)

        bar = None
        if self.progress_bar and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.max_steps, initial=step, desc=f"train {self.method.name}", unit="step")

        interrupted, last_ckpt, last_images = False, None, []
        tokens = self.method.tokens_per_sample() * c.batch_size * c.gradient_accumulation * acc.num_processes
        with self._sigint_guard():
            while step < c.max_steps:
                t0 = time.perf_counter()
                loss_value = self._train_step(model, optimizer, scheduler, plan, items, step, generator)
                step += 1
                dt = time.perf_counter() - t0
                images, ckpt = [], None
                if c.log_every and step % c.log_every == 0:
                    loss_log.write(step, loss_value)
                if c.validate_every and (step % c.validate_every == 0 or step == c.max_steps):
                    images = self._validate(validation_records, step, output)
                    last_images = images or last_images
                if (c.checkpoint_every and step % c.checkpoint_every == 0) or step == c.max_steps:
                    ckpt = last_ckpt = self._save_checkpoint(output, step, optimizer, scheduler, generator, plan)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", s_step=f"{dt:.2f}", tok_s=f"{tokens / dt:.0f}")
                if acc.is_main_process and self.callback is not None:
                    progress = TrainProgress(step, c.max_steps, loss_value, scheduler.get_last_lr()[0], dt,
                                             tokens / dt if dt > 0 else 0.0, images, ckpt)
                    try:
                        self.callback(progress)
                    except TrainingCancelled:
                        self._stop_requested = True
                # SIGINT, cancel or should_stop(): every process stops after this step, with a checkpoint
                if self._stop_now() and step < c.max_steps:
                    if ckpt is None:
                        last_ckpt = self._save_checkpoint(output, step, optimizer, scheduler, generator, plan)
                    interrupted = True
                    if acc.is_main_process:
                        print(f"stopped at step {step}; checkpoint {last_ckpt} (continue with --resume)")
                    break
        if bar is not None:
            bar.close()
        loss_log.close()
        if not interrupted and acc.is_main_process:
            self.method.export(output)
            with open(os.path.join(output, LOGS, "run.json"), "w", encoding="utf-8") as fh:
                json.dump({"step": step, "method": self.method.describe(), "config": to_dict(c)}, fh, indent=2,
                          default=str)
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(output, step, loss_log.history, interrupted, last_ckpt, last_images)

    # ------------------------------------------------------------------ one step
    def _train_step(self, model, optimizer, scheduler, plan, items, step, generator) -> float:
        acc, c = self.accelerator, self.config
        accum = c.gradient_accumulation
        total = 0.0
        for micro in range(accum):
            micro_step = step * accum + micro
            batch = self.method.collate([items[i] for i in plan.indices(micro_step)])
            batch = {k: v.to(acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            sync = micro == accum - 1
            with (contextlib.nullcontext() if sync else acc.no_sync(model)):
                loss = self.method.loss(model, batch, generator)
                if not torch.isfinite(loss):
                    raise DSDError(f"the loss became {loss.item()} at step {step + 1}; lower --lr, use float32 / "
                                   "bf16 instead of fp16, or check the data. The last checkpoint is intact.")
                acc.backward(loss / accum)
            total += loss.detach().float().item() / accum
        if c.max_grad_norm > 0:
            acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], c.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if acc.num_processes > 1:
            t = torch.tensor([total], device=acc.device)
            total = acc.reduce(t, reduction="mean").item()
        return total

    # ------------------------------------------------------------------ stop / signals
    @contextlib.contextmanager
    def _sigint_guard(self):
        if not self.handle_sigint or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self._stop_requested = True
            print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_now(self) -> bool:
        stop = self._stop_requested
        if self.should_stop is not None and self.accelerator.is_main_process:
            try:
                stop = stop or bool(self.should_stop())
            except Exception:  # ComfyUI's interrupt raises: same meaning
                stop = True
        if self.accelerator.num_processes > 1:  # every process stops at the same step
            t = torch.tensor([1.0 if stop else 0.0], device=self.accelerator.device)
            stop = self.accelerator.reduce(t, reduction="sum").item() > 0
        self._stop_requested = stop
        return stop

    # ------------------------------------------------------------------ validation
    def _validate(self, records, step: int, output: str) -> list:
        acc = self.accelerator
        images = []
        if acc.is_main_process and records:
            module = self.method.trainable_module()
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    images = self.method.validation_images(records, step) or []
            finally:
                module.train(was_training)
            if images:
                folder = os.path.join(output, VALIDATION)
                os.makedirs(folder, exist_ok=True)
                for k, im in enumerate(images):
                    im.save(os.path.join(folder, f"{checkpoint_name(step)}_{k}.png"))
        acc.wait_for_everyone()
        return images

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, output, step, optimizer, scheduler, generator, plan) -> str:
        acc, c = self.accelerator, self.config
        root = os.path.join(output, CHECKPOINTS)
        final = os.path.join(root, checkpoint_name(step))
        tmp = os.path.join(root, f".tmp-{checkpoint_name(step)}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        save_tree(rng_state(generator), os.path.join(tmp, f"rng-{acc.process_index}.safetensors"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            from .io import atomic_save_file

            atomic_save_file(self.method.state_dict(), os.path.join(tmp, "method.safetensors"),
                             metadata={"method": self.method.name})
            save_tree(optimizer.state_dict(), os.path.join(tmp, "optimizer.safetensors"))
            save_tree(scheduler.state_dict(), os.path.join(tmp, "scheduler.safetensors"))
            micro = step * c.gradient_accumulation
            epoch, position = plan.position(micro)
            state = {"step": step, "micro_step": micro, "epoch": epoch, "position_in_epoch": position,
                     "num_processes": acc.num_processes, "method": self.method.name, "config": to_dict(c),
                     "method_options": to_dict(self.method.options)}
            atomic_write_text(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2, default=str))
            replace_dir(tmp, final)
            if c.keep_checkpoints:
                for old in list_checkpoints(output)[:-c.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, path, optimizer, scheduler, generator) -> int:
        from safetensors.torch import load_file

        acc, c = self.accelerator, self.config
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
            state = json.load(fh)
        if state.get("method") != self.method.name:
            raise InputError(f"{path} is a checkpoint of method {state.get('method')!r}, not {self.method.name!r}.")
        if state.get("num_processes") != acc.num_processes:
            raise InputError(f"{path} was written by {state.get('num_processes')} processes and this run has "
                             f"{acc.num_processes}; resume with the same number of processes (the data order and "
                             "the per-process random states depend on it).")
        saved = state.get("config", {})
        for key in ("batch_size", "gradient_accumulation", "seed"):
            if key in saved and saved[key] != getattr(c, key):
                raise InputError(f"{path} was trained with {key}={saved[key]} and this run has "
                                 f"{key}={getattr(c, key)}; resume with the same value.")
        self.method.load_state_dict(load_file(os.path.join(path, "method.safetensors")))
        optimizer.load_state_dict(load_tree(os.path.join(path, "optimizer.safetensors")))
        scheduler.load_state_dict(load_tree(os.path.join(path, "scheduler.safetensors")))
        rng_file = os.path.join(path, f"rng-{acc.process_index}.safetensors")
        set_rng_state(generator, load_tree(rng_file))
        return int(state["step"])


# ---------------------------------------------------------------------------------------------- loss log
class LossLog:
    """``logs/loss.csv`` (``step,loss``) plus TensorBoard when installed. On resume, rows after the resumed step
    (written by the interrupted run after its last checkpoint) are dropped, so the file matches an uninterrupted run."""

    def __init__(self, folder: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(folder, "loss.csv")
        self.history: list[tuple[int, float]] = []
        self._tb = None
        if not enabled:
            return
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh)]
            self.history = [(int(r["step"]), float(r["loss"])) for r in rows if int(r["step"]) <= resume_step]
        atomic_write_text(self.path, "step,loss\n" + "".join(f"{s},{v!r}\n" for s, v in self.history))
        self._fh = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(folder, "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self._tb = None

    def write(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        self.history.append((step, loss))
        self._fh.write(f"{step},{loss!r}\n")
        self._fh.flush()
        if self._tb is not None:
            self._tb.add_scalar("loss", loss, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_loss_csv(path: str) -> list[tuple[int, float]]:
    with open(path, encoding="utf-8") as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]
