"""Task-aware fine-tuning of compressed layers by distillation from the dense model.

All compressed layers are trained together against the dense model's logits:

    loss = kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - kd_weight) * CE(s, y)

(s: student logits, t: teacher logits, y: labels, T: temperature; the T^2 keeps the KD gradient
scale independent of T, as in Hinton et al. 2015).

Decisions (measured on the reference CIFAR-10 VGG-16-BN with fc6 and fc7 replaced by ~2,000x
TTNs initialised in weight space (0.10 top-1), fine-tuned for 40 steps of 256 on 5,000 cached
training features at lr 1e-2; top-1 on the 10,000 test images, dense 0.878):

* **Dropout on by default, batch norm frozen.** Dropout layers run as in training; every other
  module, batch norm included, runs in eval mode so its running statistics never drift. Dropout
  on reached 0.78 / 0.83 top-1 (seeds 0 / 1) where the student in eval mode reached 0.43 / 0.67;
  after a full epoch on 50,000 features at ~10,000x, 0.8789 on against 0.8776 off. At the
  smallest budgets the tiny generators underfit and the noise costs more than it regularises:
  340 parameters for fc6+fc7, 3 epochs, 0.8727 on against 0.8768 off (``dropout=False``,
  ``--no-dropout``).
* **Constant learning rate** (Adam): with a cosine decay to 0 the 40-step runs (seed 0) reached
  0.37 (dropout on) and 0.18 (eval mode), and the 3-epoch runs at 340 parameters 0.8674 / 0.8758
  against 0.8727 / 0.8768 at a constant rate. The default rate is 1e-2: at 1e-3 the 40-step run
  of seed 1 stayed at 0.10.
* **The last state is kept**, not the best: the running training loss of an epoch (measured
  while the parameters move, with dropout noise) is no sound basis for choosing a "best"
  state, and choosing by held-out accuracy would fit the evaluation split.
* Only the given parameters are trained; every other parameter of the student is frozen
  (``requires_grad`` off) for the duration, so no gradient is computed for it.
* Deterministic: the shuffling and the dropout masks come from ``config.seed`` (the global RNG
  state is forked and restored), so the same inputs and seed give the same bytes.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from adntn.errors import AdntnError
from adntn.seeding import epoch_seed
from adntn.models.layers import GeneratedLayer
from adntn.progress import Progress, Silent

if TYPE_CHECKING:
    from adntn.training.features import FeatureFile


DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning hyper-parameters (Adam at a constant learning rate; ``dropout``: dropout layers active)."""

    epochs: int = 3
    lr: float = 1e-2
    batch_size: int = 256
    temperature: float = 4.0
    kd_weight: float = 0.9
    seed: int = 0
    weight_decay: float = 0.0
    dropout: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise AdntnError(f"Fine-tuning epochs must be >= 0, not {self.epochs}.")
        if not self.lr > 0:
            raise AdntnError(f"The fine-tuning learning rate must be positive, not {self.lr}.")
        if self.batch_size < 1:
            raise AdntnError(f"The fine-tuning batch size must be at least 1, not {self.batch_size}.")
        if not self.temperature > 0:
            raise AdntnError(f"The distillation temperature must be positive, not {self.temperature}.")
        if not 0 <= self.kd_weight <= 1:
            raise AdntnError(f"The distillation weight must be in [0, 1], not {self.kd_weight}.")
        if self.weight_decay < 0:
            raise AdntnError(f"Weight decay must be >= 0, not {self.weight_decay}.")

    @property
    def student_mode(self) -> str:
        """How the student's layers run while it trains, as the report states it."""
        return f"dropout {'on' if self.dropout else 'off'}, batch norm frozen"

    def describe(self) -> dict:
        return {**asdict(self), "optimizer": "adam", "schedule": "constant", "student_mode": self.student_mode}


@dataclass
class FinetuneResult:
    """What a fine-tuning run did.

    Attributes:
        epochs: passes over the data.
        images: samples per epoch.
        steps: optimizer steps in all.
        seconds: wall-clock time of the training loop.
        final_loss: mean loss of the last epoch (None when epochs is 0).
        losses: mean loss of each epoch.
        trained: names of the trained parameter groups, e.g. ``"generator:classifier.0"``.
    """

    epochs: int
    images: int
    steps: int
    seconds: float
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return asdict(self)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      config: FinetuneConfig) -> torch.Tensor:
    """The module docstring's loss for logits (b, classes) and labels (b,); a scalar."""
    t = config.temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    ce = F.cross_entropy(student_logits, labels)
    return config.kd_weight * kd + (1 - config.kd_weight) * ce


def generated_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameter groups of every generated layer: ``generator:NAME`` (the cores), ``bias:NAME``."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, module in model.named_modules():
        if isinstance(module, GeneratedLayer):
            groups[f"generator:{name}"] = list(module.generator.parameters())
            if module.bias is not None:
                groups[f"bias:{name}"] = [module.bias]
    return groups


@torch.no_grad()
def logits_of(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model`` in eval mode on inputs (n, ...) -> logits (n, classes) on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(chunk.to(device)).float().cpu() for chunk in inputs.split(batch_size)])
    finally:
        model.train(was_training)


@contextmanager
def _fine_tuning_mode(model: nn.Module, trained: list[nn.Parameter], seed: int, dropout: bool) -> Iterator[None]:
    """Only ``trained`` requires grad, dropout trains if ``dropout``, all else is in eval mode; RNG seeded.

    The parameters' ``requires_grad``, the modules' modes and the global RNG state are restored
    on exit.
    """
    trained_ids = {id(p) for p in trained}
    parameters = list(model.parameters())
    required = [p.requires_grad for p in parameters]
    modes = [(module, module.training) for module in model.modules()]
    devices = sorted({p.device.index or 0 for p in trained if p.device.type == "cuda"})
    for p in parameters:
        p.requires_grad_(id(p) in trained_ids)
    model.eval()
    for module in model.modules():
        if dropout and isinstance(module, DROPOUT_TYPES):
            module.train()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
    finally:
        for module, training in modes:
            module.training = training
        for p, flag in zip(parameters, required):
            p.requires_grad_(flag)


class EpochCheckpoint:
    """Fine-tuning state saved after every completed epoch, so an interrupted run can resume.

    ``path`` holds the epoch count, the student's and the optimizer's state and the losses so far,
    with ``key`` (what the run was: its inputs and settings); with ``resume`` a saved state is
    resumed from (:meth:`load`: None when the file is absent; one written for another ``key`` is
    refused). Written atomically after each epoch.
    """

    def __init__(self, path: Path, key: str, resume: bool = False) -> None:
        self.path, self.key, self.resume = Path(path), key, resume

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:
            raise AdntnError(f"The resume state {self.path} is unreadable; remove it to start afresh.") from None
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise AdntnError(f"The resume state {self.path} was written by a run with other inputs or settings; "
                             "remove it to start afresh, or drop --resume.")
        return state

    def save(self, state: dict) -> None:
        from adntn.io.files import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda temporary: torch.save({**state, "key": self.key}, temporary))


Batches = Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]
# (student input, teacher logits, labels, samples in the global batch: this rank's share under torchrun)


def _train(student: nn.Module, epoch_batches: Callable[[int], Batches], steps_per_epoch: int,
           params: Mapping[str, Iterable[nn.Parameter]], config: FinetuneConfig,
           progress: Progress | None, checkpoint: EpochCheckpoint | None = None,
           data_parallel: bool = True) -> FinetuneResult:
    """Adam on ``params`` with the distillation loss, ``epoch_batches(epoch)`` for each epoch.

    With ``checkpoint`` the state after each epoch is saved, and a saved state is resumed from:
    the epochs it completed are skipped (each epoch's shuffling and dropout come from
    ``epoch_seed``, so the result is the uninterrupted run's).

    Under torchrun the student runs under DistributedDataParallel; each rank's loss (a mean over
    its share of the global batch) is weighted by share * world size / global batch, so the
    averaged gradient is the global batch's mean gradient even when the shares differ. The
    dropout masks come from ``seed + rank``. With ``data_parallel`` False the run is this
    process's alone (each rank runs the same steps on the same batches).
    """
    from adntn import distributed

    groups = {name: list(group) for name, group in params.items()}
    trained = [p for group in groups.values() for p in group]
    if not trained:
        raise ValueError("no parameters to fine-tune")
    device = trained[0].device
    world = distributed.world_size() if data_parallel else 1
    rank = distributed.rank() if data_parallel else 0
    total_steps = config.epochs * steps_per_epoch
    advance = (progress or Silent()).task("fine-tuning", total_steps)
    losses: list[float] = []
    images = steps = first_epoch = 0
    start = time.perf_counter()
    with _fine_tuning_mode(student, trained, config.seed + rank, config.dropout):
        model = student
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # batch norm is frozen, so its buffers are the same on every rank: no sync per forward
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
            model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                            **no_sync)
        optimizer = torch.optim.Adam(trained, lr=config.lr, weight_decay=config.weight_decay)
        saved = checkpoint.load() if checkpoint is not None and checkpoint.resume else None
        if saved is not None:
            student.load_state_dict(saved["student"])
            optimizer.load_state_dict(saved["optimizer"])
            first_epoch, steps, losses = saved["epoch"], saved["steps"], list(saved["losses"])
            advance(steps, losses[-1] if losses else None)
        for epoch in range(first_epoch, config.epochs):
            torch.manual_seed(epoch_seed(config.seed + rank, epoch))  # this epoch's dropout
            loss_sum, images = 0.0, 0
            for inputs, teacher_logits, labels, global_count in epoch_batches(epoch):
                labels = labels.to(device)
                outputs = model(inputs.to(device))
                if len(labels):
                    loss = distillation_loss(outputs, teacher_logits.to(device), labels, config)
                    weighted = loss if global_count == len(labels) and world == 1 else \
                        loss * (len(labels) * world / global_count)
                    loss_sum += loss.item() * len(labels)
                else:  # a rank without samples in a short last batch still joins the gradient average
                    weighted = outputs.sum() * 0.0
                optimizer.zero_grad(set_to_none=True)
                weighted.backward()
                optimizer.step()
                steps += 1
                images += len(labels)
                advance(steps, loss_sum / max(images, 1))
            if data_parallel:
                loss_sum, images = distributed.sum_all([loss_sum, float(images)])
            images = int(images)
            losses.append(loss_sum / max(images, 1))
            if checkpoint is not None and distributed.is_main():
                checkpoint.save({"epoch": epoch + 1, "steps": steps, "losses": losses,
                                 "student": student.state_dict(), "optimizer": optimizer.state_dict()})
    return FinetuneResult(epochs=config.epochs, images=images, steps=steps, seconds=time.perf_counter() - start,
                          final_loss=losses[-1] if losses else None, losses=losses, trained=list(groups))


def finetune(student: nn.Module, teacher_logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
             params: Mapping[str, Iterable[nn.Parameter]], config: FinetuneConfig,
             progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune ``student`` on precomputed inputs, e.g. a head with generated layers on trunk features.

    Args:
        student: inputs (b, f) -> logits (b, classes); trained in place.
        teacher_logits: (n, classes), the dense model's eval-mode logits on ``inputs`` (see
            :func:`logits_of`).
        inputs: (n, f) student inputs (cached trunk features).
        labels: (n,) class indices.
        params: named groups of parameters to train (see :func:`generated_parameters`).
        config: hyper-parameters; ``config.seed`` fixes the shuffling and the dropout masks.
        progress: receives the step count and the epoch's running mean loss (default: silent).

    The run is this process's alone: under torchrun every rank runs the same steps.
    """
    n = len(inputs)
    if len(teacher_logits) != n or len(labels) != n:
        raise ValueError(f"inputs, teacher logits and labels differ in length: {n}, {len(teacher_logits)}, {len(labels)}")
    def epoch_batches(epoch: int) -> Batches:
        shuffle = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        for index in torch.randperm(n, generator=shuffle).split(config.batch_size):
            yield inputs[index], teacher_logits[index], labels[index], len(index)

    return _train(student, epoch_batches, math.ceil(n / config.batch_size), params, config, progress,
                  data_parallel=False)


def finetune_features(student: nn.Module, teacher: nn.Module, features: "FeatureFile",
                      params: Mapping[str, Iterable[nn.Parameter]], config: FinetuneConfig,
                      progress: Progress | None = None, checkpoint: EpochCheckpoint | None = None) -> FinetuneResult:
    """Fine-tune ``student`` (e.g. a head with generated layers) on trunk features on disk.

    ``features`` (a :class:`adntn.training.features.FeatureFile`) is read a batch at a time, in
    one permutation of all its rows from ``config.seed`` and the epoch, so memory holds one batch
    whatever its number of rows. The teacher's logits (``teacher`` in eval mode, e.g. the dense
    head) are computed per batch. Under torchrun every rank reads the same global batches and
    trains on its contiguous share of each.
    """
    from adntn import distributed

    teacher_device = next(teacher.parameters()).device
    teacher_was_training = teacher.training
    teacher.eval()

    def epoch_batches(epoch: int) -> Batches:
        shuffle = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        for inputs, labels in features.batches(config.batch_size, shuffle):
            first, last = distributed.shard(len(labels))
            mine, mine_labels = inputs[first:last], labels[first:last]
            with torch.no_grad():
                teacher_logits = teacher(mine.to(teacher_device))
            yield mine, teacher_logits, mine_labels, len(labels)

    try:
        return _train(student, epoch_batches, math.ceil(len(features) / config.batch_size), params, config,
                      progress, checkpoint)
    finally:
        teacher.train(teacher_was_training)


def finetune_full(student_model: nn.Module, teacher_model: nn.Module,
                  loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  params: Mapping[str, Iterable[nn.Parameter]], config: FinetuneConfig,
                  progress: Progress | None = None, checkpoint: EpochCheckpoint | None = None) -> FinetuneResult:
    """Fine-tune a whole model with generated layers (e.g. conv layers) over image batches.

    ``loader`` yields (images (b, 3, H, W), labels (b,)) and must have a length (a DataLoader);
    its batch size and shuffling are used as they are (``config.batch_size`` is not, and
    ``config.seed`` only fixes the dropout masks: seed the loader, see ``data.image_loader``;
    under torchrun use ``data.images.training_loader``, whose batch sampler gives each rank its
    share of every global batch and says the global batch's size).
    The teacher's logits are computed on the fly in eval mode.
    """
    global_size = getattr(getattr(loader, "batch_sampler", None), "global_size", None)
    teacher_device = next(teacher_model.parameters()).device
    teacher_was_training = teacher_model.training
    teacher_model.eval()

    sampler = getattr(loader, "batch_sampler", None)

    def epoch_batches(epoch: int) -> Batches:
        if hasattr(sampler, "set_epoch"):  # data.images.GlobalBatches: this epoch's order
            sampler.set_epoch(epoch)
        for step, (images, labels) in enumerate(loader):
            with torch.no_grad():
                teacher_logits = teacher_model(images.to(teacher_device))
            yield images, teacher_logits, labels, len(labels) if global_size is None else global_size(step)

    try:
        return _train(student_model, epoch_batches, len(loader), params, config, progress, checkpoint)
    finally:
        teacher_model.train(teacher_was_training)
