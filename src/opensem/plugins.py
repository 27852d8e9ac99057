"""Registration points: how a provider, a scorer, an export format or a stage becomes known by name.

Each kind of extension has one ``Registry``. The built-ins register themselves when their module is imported,
exactly as a third-party one does:

    from opensem.judge.scorers import SCORERS

    @SCORERS.register
    class MyScorer:
        name = "my-scorer"
        ...

A separate package registers through a Python entry point in the registry's group (``opensem.providers``,
``opensem.scorers``, ``opensem.exports``, ``opensem.stages``), loaded on first use; a config can also name an
object directly as ``package.module:attribute``.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable, Optional


class Registry:
    """Named extensions of one kind: ``kind`` for messages, ``group`` for entry points, ``built_in`` the modules
    whose import registers the built-ins, ``accepts`` what a ``module:attribute`` must be to count as one."""

    def __init__(self, kind: str, group: str, built_in: tuple[str, ...], accepts: Optional[Callable[[Any], bool]] = None):
        self.kind, self.group, self.built_in = kind, group, built_in
        self.accepts = accepts or (lambda obj: True)
        self.entries: dict[str, Any] = {}
        self._loaded = False

    def register(self, obj: Any = None, *, name: Optional[str] = None):
        """Register ``obj`` under ``name`` (default: its ``name`` attribute). Usable as a decorator."""
        def add(o: Any) -> Any:
            self.entries[name or o.name] = o
            return o

        return add(obj) if obj is not None else add

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self.built_in:
            importlib.import_module(module)
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not take the built-ins with it
                warnings.warn(f"{self.kind} plugin {ep.name!r} ({ep.value}) could not be loaded: {e}", stacklevel=2)
                continue
            self.entries.setdefault(ep.name, obj)  # the entry point's name is the one configs use

    def names(self) -> list[str]:
        self.load()
        return list(self.entries)

    def __contains__(self, spec: str) -> bool:
        try:
            self.get(spec)
        except ValueError:
            return False
        return True

    def get(self, spec: str) -> Any:
        """A registered name, or ``package.module:attribute``. ValueError (one line, listing the known names) else."""
        self.load()
        if spec in self.entries:
            return self.entries[spec]
        if isinstance(spec, str) and ":" in spec:
            module, _, attr = spec.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError, ValueError) as e:
                raise ValueError(f"cannot load {self.kind} {spec!r} ({e})") from None
            if not self.accepts(obj):
                raise ValueError(f"{spec!r} is not a {self.kind}")
            return obj
        raise ValueError(f"unknown {self.kind} {spec!r}: use one of {', '.join(self.entries)}, or package.module:attribute "
                         f"for your own")
