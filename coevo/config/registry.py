"""Name-to-object registries, so configs pick components by name, not by import path.

A config says ``strategy: {name: fedprox, mu: 0.01}``; the code that builds the run
looks ``fedprox`` up in the strategy registry. Unknown names fail with the list of
known ones and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name was looked up that no component registered under.

    Attributes:
        kind: What the registry holds, such as ``"strategy"``.
        name: The name asked for.
        choices: The registered names, sorted.
    """

    def __init__(self, kind: str, name: str, choices: Iterable[str]) -> None:
        self.kind, self.name, self.choices = kind, name, tuple(sorted(choices))
        super().__init__(kind, name, self.choices)

    def __str__(self) -> str:
        # KeyError's own __str__ shows repr(args), which would bury the message in quotes.
        listed = ", ".join(self.choices) or "(none registered)"
        message = f"unknown {self.kind} {self.name!r}; choose one of: {listed}"
        close = difflib.get_close_matches(self.name, self.choices, n=1)
        return f"{message}; did you mean {close[0]!r}?" if close else message


class Registry(Generic[T]):
    """Components of one kind, looked up by the name a config gives them.

    Example:
        >>> strategies: Registry[type] = Registry("strategy")
        >>> @strategies.register("fedavg")
        ... class FedAvg: ...
        >>> strategies.get("fedavg") is FedAvg
        True
        >>> strategies.names()
        ['fedavg']

    Args:
        kind: What the registry holds, used in error messages (``"strategy"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name`` and returns it as is.

        Raises:
            ValueError: ``name`` is empty or already taken; the message names both objects.
        """
        if not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._entries:
                taken_by = _describe(self._entries[name])
                raise ValueError(
                    f"{self.kind} {name!r} is already registered to {taken_by}; "
                    f"cannot register {_describe(obj)} under the same name"
                )
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the object registered under ``name``.

        Raises:
            UnknownNameError: No object is registered under ``name``.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()!r})"


def _describe(obj: object) -> str:
    """Name an object by its import path when it has one, else by its repr."""
    qualname = getattr(obj, "__qualname__", None)
    module = getattr(obj, "__module__", None)
    return f"{module}.{qualname}" if qualname and module else repr(obj)
