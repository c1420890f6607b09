"""The fitting loop: minimise any objective over a generator's cores with Adam.

The loop keeps the best cores seen (an initialisation from an SVD fit is never made worse) and
reports progress through a callback, so it prints nothing itself.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

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
    the tree trains: the disentanglers (aTTN, MERA) stay as they are, e.g. at the identity.
    """
    start = time.perf_counter()
    with torch.no_grad():
        initial = float(objective(generator))
    best_loss, best_state = initial, copy.deepcopy(generator.state_dict())
    if steps > 0:
        frozen = [] if mix else [p for m in generator.modules() if isinstance(m, Disentangler)
                                 for p in m.parameters() if p.requires_grad]
        for parameter in frozen:  # no gradient at all, so none is left behind for a later stage
            parameter.requires_grad_(False)
        try:
            optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 100)
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                value = _value_and_gradient(objective, generator)
                optimizer.step()
                schedule.step()
                if value < best_loss:
                    best_loss, best_state = value, copy.deepcopy(generator.state_dict())
                if on_step is not None:
                    on_step(step + 1, value)
            with torch.no_grad():
                final = float(objective(generator))
            if final < best_loss:
                best_loss, best_state = final, copy.deepcopy(generator.state_dict())
            generator.load_state_dict(best_state)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
    return FitResult(steps=steps, seconds=time.perf_counter() - start,
                     initial_loss=initial, best_loss=best_loss)
