"""The registry of generator classes, keyed by arch name.

Each generator class registers itself when it is defined (``networks.base.Generator`` does it
for every subclass that names an ``arch``), so a new arch is one new file in ``networks/``: the
spec's validation, the budget solver and the CLI's choices all read this registry. It holds
classes and never imports them, so ``core`` stays below ``networks``.
"""

from __future__ import annotations

from adntn.errors import AdntnError

_CLASSES: dict[str, type] = {}


def register(cls: type) -> type:
    """Record ``cls`` under ``cls.arch`` (a second class for the same arch is a bug)."""
    if cls.arch in _CLASSES and _CLASSES[cls.arch] is not cls:
        raise ValueError(f"arch '{cls.arch}' is registered twice ({_CLASSES[cls.arch].__name__}, {cls.__name__})")
    _CLASSES[cls.arch] = cls
    return cls


def archs() -> tuple[str, ...]:
    """The registered arch names, in registration order."""
    return tuple(_CLASSES)


def generator_class(arch: str) -> type:
    """The generator class of ``arch``; an unknown name is the user's error."""
    try:
        return _CLASSES[arch]
    except KeyError:
        raise AdntnError(f"Unknown arch '{arch}'; choose one of {', '.join(archs())}.") from None
