"""Seeds derived from the user's ``--seed`` (a leaf module: everything may import it)."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one fine-tuning epoch's shuffling and dropout masks: epoch e of a run is the same
    whether the run got there in one go or resumed from a saved epoch."""
    return (seed * 1_000_003 + epoch) % (2**63 - 1)
