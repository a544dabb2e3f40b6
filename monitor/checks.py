"""Validation of settings objects, one rule per field, each error naming its field and value."""
from __future__ import annotations


def require(owner: object, *rules: tuple[str, bool, str]) -> None:
    """Raise ``ValueError`` for the first ``(field, holds, what it must be)`` that does not hold,
    naming the field and its value: an initialization file or a configuration with several
    bad settings then says which one to mend, not the whole group's rule.

    >>> from types import SimpleNamespace
    >>> settings = SimpleNamespace(lr=0.1, prox=-0.1)
    >>> require(settings, ("lr", settings.lr >= 0, ">= 0"), ("prox", settings.prox >= 0, ">= 0"))
    Traceback (most recent call last):
    ...
    ValueError: prox must be >= 0, got -0.1
    """
    for name, holds, rule in rules:
        if not holds:
            raise ValueError(f"{name} must be {rule}, got {getattr(owner, name)!r}")
