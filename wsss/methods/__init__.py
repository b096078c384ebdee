"""Map methods by name: ``METHODS.get("ccam")``.

Registered names: ``cam``, ``ecs`` (ECS around CAM), ``ccam``, ``ccam-ecs`` (ECS around CCAM),
``ensemble`` (fuses stored maps, no model) and the label-free priors ``prior-grabcut`` and ``prior-ellipse``
(maps from the image alone, :mod:`wsss.methods.priors`). Model-backed methods share the template of
:class:`wsss.methods.base.MapMethod`.

``METHODS`` is built on first access (PEP 562 ``__getattr__``) so that importing this package stays
cheap. The names themselves (:class:`wsss.variants.MethodName`, the CLI choices) live with the other typed
names; a test keeps them equal to the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import TYPE_CHECKING, Any

from wsss.errors import ConfigError
from wsss.variants import MethodName

if TYPE_CHECKING:
    from wsss.methods.base import MapMethod
    from wsss.methods.ensemble import Ensemble
    from wsss.methods.priors import Prior


class UnknownMethodError(ConfigError, KeyError):
    """A method name that is not registered (a KeyError for lookups, a ConfigError for the CLI)."""

    def __str__(self) -> str:
        # KeyError would print the repr of the message, quotes and all.
        return str(self.args[0]) if self.args else ""


class MethodRegistry:
    """Name -> method object, in registration order."""

    def __init__(self, methods: Iterable[MapMethod | Ensemble | Prior]) -> None:
        self._methods: dict[str, MapMethod | Ensemble | Prior] = {}
        for m in methods:
            if m.name in self._methods:
                raise ValueError(f"method {m.name!r} registered twice")
            self._methods[m.name] = m

    def get(self, name: str) -> MapMethod | Ensemble | Prior:
        """The method called ``name``.

        Raises:
            UnknownMethodError: ``name`` is not registered (the message lists the valid names).
        """
        key = name.value if isinstance(name, Enum) else name
        try:
            return self._methods[key]
        except KeyError:
            raise UnknownMethodError(f"unknown method {key!r}; valid: {', '.join(self._methods)}") from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods


def _build() -> MethodRegistry:
    from wsss.methods.cam import CAM
    from wsss.methods.ccam import CCAM
    from wsss.methods.ecs import ECS
    from wsss.methods.ensemble import Ensemble
    from wsss.methods.priors import EllipsePrior, GrabCutPrior

    cam, ccam = CAM(), CCAM()
    return MethodRegistry([cam, ECS(cam, "ecs"), ccam, ECS(ccam, "ccam-ecs"), Ensemble(), GrabCutPrior(),
                           EllipsePrior()])


_registry: MethodRegistry | None = None


def __getattr__(name: str) -> Any:
    global _registry
    if name == "METHODS":
        if _registry is None:
            _registry = _build()
        return _registry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "MethodName", "MethodRegistry", "UnknownMethodError"]
