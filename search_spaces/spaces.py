"""The registry of search spaces: `@register_space`, `get_space(name)`, `list_spaces()`.

A space declares its choices once, as a flat dict of finite tuples of JSON values; strategies
sample from them, and `Space.build` turns one chosen `arch` dict into a torch model.
"""

from __future__ import annotations

import abc
import importlib
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["Space", "UnknownSpace", "get_space", "list_spaces", "register_space"]

# Modules that register the spaces shipped with hwnas; imported on first use of the registry.
_BUILTIN_MODULES = (
    "search_spaces.mbv2",
    "search_spaces.darts",
    "search_spaces.sparse_ift",
    "search_spaces.tiny",
)

_REGISTRY: dict[str, type[Space]] = {}


class UnknownSpace(ValueError):
    """A space name that is not registered."""


class Space(abc.ABC):
    """A family of models: a flat dict of choices and a builder for one choice of each."""

    name: str = ""
    description: str = ""

    @property
    @abc.abstractmethod
    def choices(self) -> dict[str, tuple]:
        """Choice name -> the tuple of its allowed JSON values, in a stable order."""

    @abc.abstractmethod
    def _build(
        self,
        arch: dict[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_scale: float,
    ) -> nn.Module:
        """Build the model for an already validated `arch`, channels scaled by `width_scale`."""

    def build(
        self,
        arch: Mapping[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        *,
        width_scale: float = 1.0,
    ) -> nn.Module:
        """Validate `arch` and build its torch model for the given data shape.

        `width_scale` multiplies every channel count (used by the small-dense and Sparse-IFT
        baselines, which need widths between the declared choices).
        """
        checked = self.validate(arch)
        if not 0.0 < width_scale <= 16.0:
            raise ValueError(f"width_scale={width_scale} is out of range; use (0, 16]")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}; a classifier needs at least 2 classes")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels}; need at least 1 input channel")
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small; use at least 8 pixels")
        return self._build(checked, num_classes, in_channels, image_size, float(width_scale))

    def dense_parent(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        """The same arch with every sparse choice made dense (the dense-parent baseline)."""
        raise ValueError(f"space {self.name!r} declares no dense parent; use another baseline")

    def supernet(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        fixed: Mapping[str, Any] | None = None,
    ) -> nn.Module:
        """A weight-sharing supernet for differentiable search (see `search_spaces.supernet`).

        Choices that are not searched differentiably take their value from `fixed`.
        """
        raise ValueError(
            f"space {self.name!r} has no supernet; use an Optuna strategy (random, tpe, nsga2)"
        )

    def _fixed(self, fixed: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict:
        """Validated values for the choices a supernet does not search: `fixed`, then
        `defaults`, then each choice's first value."""
        fixed = dict(fixed or {})
        arch = {
            key: fixed.get(key, defaults.get(key, values[0]))
            for key, values in self.choices.items()
        }
        unknown = sorted(set(fixed) - set(self.choices))
        if unknown:
            arch[unknown[0]] = fixed[unknown[0]]
        return self.validate(arch)

    def validate(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        """Return `arch` as a dict if every key is a known choice with an allowed value.

        Raises ValueError naming the first offending key.
        """
        if not isinstance(arch, Mapping):
            raise ValueError(f"arch must be a dict of choices, got {type(arch).__name__}")
        choices = self.choices
        for key, value in arch.items():
            if key not in choices:
                raise ValueError(
                    f"unknown choice {key!r} for space {self.name!r}; "
                    f"see `hwnas spaces show {self.name}` for the valid keys"
                )
            if value not in choices[key] or isinstance(value, bool) != isinstance(
                choices[key][0], bool
            ):
                allowed = ", ".join(repr(v) for v in choices[key])
                raise ValueError(f"{key}={value!r} is not allowed; choose one of {allowed}")
        missing = [key for key in choices if key not in arch]
        if missing:
            raise ValueError(f"arch is missing choice {missing[0]!r}; give a value for every key")
        return {key: arch[key] for key in choices}

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """Draw one arch uniformly, each choice independently."""
        return {key: rng.choice(values) for key, values in self.choices.items()}

    def size(self) -> int:
        """Number of distinct archs."""
        return math.prod(len(values) for values in self.choices.values())

    def describe(self) -> str:
        """Human-readable listing of every choice and its values."""
        choices = self.choices
        width = max(len(key) for key in choices)
        lines = [f"{self.name}: {self.description}".rstrip(": ")]
        lines += [
            f"  {key:<{width}}  {' | '.join(_format_value(v) for v in values)}"
            for key, values in choices.items()
        ]
        lines.append(f"  {len(choices)} choices, {self.size():.3g} architectures")
        return "\n".join(lines)


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def register_space(name: str) -> Callable[[type[Space]], type[Space]]:
    """Class decorator that registers a Space subclass under `name`."""

    def decorator(cls: type[Space]) -> type[Space]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"space {name!r} is already registered; pick another name")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_spaces() -> list[str]:
    """Names of all registered spaces, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_space(name: str) -> Space:
    """A fresh instance of the space registered as `name`."""
    _load_builtin()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownSpace(f"unknown space {name!r}; available spaces: {known}")
    return _REGISTRY[name]()
