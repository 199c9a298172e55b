"""Package attributes imported on first use (PEP 562), so importing a package stays cheap.

``racto_nb`` and ``racto_nb.testing`` name what they export and where it lives;
``import racto_nb.models`` then never pays for Celery, and ``python -m
racto_nb.testing.openai_server`` never imports its own module twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, homes: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` that import ``homes[name]`` when ``name`` is first used."""

    def get(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home), name)

    def listing() -> list[str]:
        return sorted(set(homes) | set(vars(importlib.import_module(package))))

    return get, listing
