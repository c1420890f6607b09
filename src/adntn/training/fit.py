"""The fitting loop: minimise any objective over a generator's cores with Adam.

The loop keeps the best cores seen (an initialisation from an SVD fit is never made worse) and
reports progress through a callback, so it prints nothing itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adntn.memory import reused_blocks
from adntn.networks import Generator
from adntn.networks.base import Disentangler
from adntn.training.objectives import Objective

ProgressCallback = Callable[[int, float], None]


@dataclass
class FitResult:
    steps: int
    seconds: float
    initial_loss: float
    best_loss: float


def _copy_state(generator: Generator, into: dict[str, torch.Tensor]) -> None:
    """Copy the generator's state into the tensors of ``into`` (same names and shapes)."""
    with torch.no_grad():
        for name, tensor in generator.state_dict().items():
            into[name].copy_(tensor)


def _value_and_gradient(objective: Objective, generator: Generator) -> float:
    """The objective's value, its gradient accumulated into the cores (by the objective's own
    ``accumulate`` when it has one)."""
    accumulate = getattr(objective, "accumulate", None)
    if accumulate is not None:
        return accumulate(generator)
    loss = objective(generator)
    loss.backward()
    return loss.item()


def fit(generator: Generator, objective: Objective, *, steps: int, lr: float,
        on_step: ProgressCallback | None = None, mix: bool = True) -> FitResult:
    """Run ``steps`` Adam steps on ``objective(generator)``; leave the best cores in place.

    The learning rate follows a cosine decay from ``lr`` to ``lr/100``. With ``mix`` False only
    the tree trains: the disentanglers (aTTN, MERA) stay as they are, e.g. at the identity, and
    the objective is taken of ``generator.unmixed()`` (aTTN at the identity: its tree alone).
    """
    if not mix:
        generator = generator.unmixed()
    start = time.perf_counter()
    with torch.no_grad():
        initial = float(objective(generator))
    # the best cores, copied into buffers made once (new small tensors at every improvement
    # would be scattered through the memory the objective's large temporaries are freed to)
    best_loss, best_state = initial, {name: tensor.clone() for name, tensor in generator.state_dict().items()}
    if steps > 0:
        frozen = [] if mix else [p for m in generator.modules() if isinstance(m, Disentangler)
                                 for p in m.parameters() if p.requires_grad]
        for parameter in frozen:  # no gradient at all, so none is left behind for a later stage
            parameter.requires_grad_(False)
        try:
            optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 100)
            with reused_blocks():
                for step in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    value = _value_and_gradient(objective, generator)
                    if value < best_loss:  # the cores it was measured at, before the step moves them
                        best_loss = value
                        _copy_state(generator, best_state)
                    optimizer.step()
                    schedule.step()
                    if on_step is not None:
                        on_step(step + 1, value)
                with torch.no_grad():
                    final = float(objective(generator))
            if final < best_loss:
                best_loss = final
                _copy_state(generator, best_state)
            generator.load_state_dict(best_state)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
    return FitResult(steps=steps, seconds=time.perf_counter() - start,
                     initial_loss=initial, best_loss=best_loss)
