"""The Codec contract: what happens to a payload on the wire, both halves in one object.

A codec's ``encode`` runs on the device and its ``decode`` in the cloud; per-device state such
as an error-feedback residual is passed in and handed back, never kept on ``self``. Both halves
are pure tensor functions, so the simulator can ``torch.func.vmap`` ``encode`` over a cohort.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from coevo.types import Payload

Tensors = dict[str, Tensor]
"""Named tensors: a payload's content, a codec's wire tensors or its per-device state."""

SEP = "::"
"""Separates a tensor's name from the part a codec sent for it, as in ``"w::q"``."""


def wire_key(name: str, part: str) -> str:
    """The wire name of one part a codec sends for tensor ``name``, e.g. ``"w::scale"``."""
    return f"{name}{SEP}{part}"


def put_unique(wire: Tensors, key: str, value: Tensor) -> None:
    """Adds ``wire[key] = value``, refusing a name that another tensor's parts already took.

    Raises:
        ValueError: when ``key`` is already in ``wire`` (an input named like ``"w::q"`` next to
            a floating ``"w"``, say), since one would silently overwrite the other.
    """
    if key in wire:
        raise ValueError(
            f"wire tensor name {key!r} is produced twice; rename the input tensors so that no "
            f"name equals another's name plus {SEP!r} and a part"
        )
    wire[key] = value


def encoded_bytes(wire: Mapping[str, Tensor]) -> int:
    """The exact size of ``wire`` in transit: the length of its serialised ``Payload``.

    This is the only byte count coevo reports for a codec; sizes are never estimated from
    dtypes and shapes, so headers and names are paid for as they are on a real wire.
    """
    return Payload(tensors=wire).num_bytes


class Codec(ABC):
    """What happens to a payload on the wire: the device's ``encode`` and the cloud's ``decode``.

    Subclasses set ``name`` and implement ``encode`` and ``decode``; a codec that keeps
    per-device memory (an error-feedback residual) also overrides ``init_state``. Both halves
    must be pure functions of their tensor inputs: no Python branching on tensor values, no
    ``.item()``, no in-place writes to inputs. Branching on names, shapes and dtypes is fine,
    as those are static under ``torch.func.vmap``.

    Example:
        >>> import torch
        >>> class Identity(Codec):
        ...     name = "identity"
        ...     def encode(self, tensors, state):
        ...         return dict(tensors), {}
        ...     def decode(self, wire, template):
        ...         return {name: wire[name] for name in template}
        >>> codec = Identity()
        >>> update = {"w": torch.tensor([1.0, -2.0])}
        >>> wire, state = codec.encode(update, codec.init_state(update))
        >>> codec.decode(wire, update)["w"]
        tensor([ 1., -2.])
        >>> encoded_bytes(wire) == len(Payload(wire).to_bytes())
        True
    """

    name: ClassVar[str]

    def init_state(self, template: Mapping[str, Tensor]) -> Tensors:
        """One device's initial state, given the uncompressed tensors (only shapes are read).

        Args:
            template: tensors with the names, shapes and dtypes ``encode`` will receive.

        Returns:
            The state for the device's first ``encode``; empty for a stateless codec.
        """
        return {}

    @abstractmethod
    def encode(
        self, tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]
    ) -> tuple[Tensors, Tensors]:
        """The device half: compresses one device's tensors.

        Args:
            tensors: the uncompressed named tensors.
            state: this device's codec state, as ``init_state`` or the previous ``encode`` left it.

        Returns:
            ``(wire, new_state)``: the named tensors sent, and the state for the next round.
        """

    @abstractmethod
    def decode(self, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Tensors:
        """The cloud half: rebuilds tensors from what ``encode`` sent.

        Args:
            wire: the tensors ``encode`` produced.
            template: tensors with the original names, shapes and dtypes. Only those are read,
                never values or device, so a template of ``"meta"`` tensors serves.

        Returns:
            Tensors with the template's names, shapes and dtypes, on the wire's device.
        """

    def bound(self, tensors: Mapping[str, Tensor]) -> Tensors | None:
        """The documented worst-case error of ``decode(encode(tensors))``, element by element.

        Returns:
            For each name, a tensor of the input's shape bounding ``|decoded - original|``
            (for a fresh state); ``None`` when the codec is lossless or its error is unbounded.
        """
        return None
