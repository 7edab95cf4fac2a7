"""Chain: codecs composed in order, reporting one wire and one state.

On the device each codec encodes the previous codec's wire tensors; in the cloud the decoders
run in reverse, each rebuilding the input of its own encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from coevo.codecs.base import Codec, Tensors


def _namespace(position: int) -> str:
    return f"{position}/"


def _on_meta(tensors: Mapping[str, Tensor]) -> Tensors:
    """Data-free copies that keep names, shapes and dtypes, so encoders run without compute."""
    return {
        name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        for name, tensor in tensors.items()
    }


@dataclass(frozen=True)
class Chain(Codec):
    """Applies ``codecs`` in order on the device and their decoders in reverse in the cloud.

    Each codec sees the previous codec's wire tensors as its input, so a sparsifier followed by
    a quantiser sends quantised values next to untouched integer indices:

        >>> import torch
        >>> from coevo.codecs import Int8, TopK, encoded_bytes
        >>> chain = Chain([TopK(0.5), Int8()])
        >>> update = {"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}
        >>> wire, state = chain.encode(update, chain.init_state(update))
        >>> sorted(wire)
        ['w::indices', 'w::values::q', 'w::values::scale']
        >>> sorted(state)
        ['0/w']

    Each codec's state lives under its position, ``"0/..."``, ``"1/..."``. Error feedback in a
    codec covers that codec's loss only, not the loss of codecs after it.

    A decoder needs the template of its own encoder's input. Those intermediate templates are
    rebuilt on each ``decode`` by running the encoders on ``"meta"`` tensors shaped like the
    template: wire names, shapes and dtypes depend only on input shapes (which vmapping
    ``encode`` requires anyway), meta tensors carry no data and cost no compute, and nothing has
    to be recorded between calls. ``bound`` is ``None``: stage errors compound, so no stage's
    bound speaks for the chain.

    Args:
        codecs: at least one codec, in the order the device applies them.

    Raises:
        ValueError: when ``codecs`` is empty.
    """

    codecs: Sequence[Codec]

    name: ClassVar[str] = "chain"

    def __post_init__(self) -> None:
        if not self.codecs:
            raise ValueError("Chain.codecs must hold at least one codec, got none")
        # A tuple keeps the frozen chain hashable and safe from edits to the caller's list.
        object.__setattr__(self, "codecs", tuple(self.codecs))

    def _substate(self, state: Mapping[str, Tensor], position: int) -> Tensors:
        prefix = _namespace(position)
        return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}

    def init_state(self, template: Mapping[str, Tensor]) -> Tensors:
        # Real tensors rather than meta ones, as later codecs' states must live on a real device.
        state: Tensors = {}
        current: Mapping[str, Tensor] = template
        for position, codec in enumerate(self.codecs):
            substate = codec.init_state(current)
            state.update({_namespace(position) + key: value for key, value in substate.items()})
            if position < len(self.codecs) - 1:
                current, _ = codec.encode(current, substate)
        return state

    def encode(
        self, tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]
    ) -> tuple[Tensors, Tensors]:
        new_state: Tensors = {}
        current: Mapping[str, Tensor] = tensors
        for position, codec in enumerate(self.codecs):
            current, substate = codec.encode(current, self._substate(state, position))
            new_state.update({_namespace(position) + key: value for key, value in substate.items()})
        return dict(current), new_state

    def input_templates(self, template: Mapping[str, Tensor]) -> list[Tensors]:
        """The names, shapes and dtypes each codec receives, as meta tensors, first to last."""
        templates = [_on_meta(template)]
        for codec in self.codecs[:-1]:
            wire, _ = codec.encode(templates[-1], codec.init_state(templates[-1]))
            templates.append(wire)
        return templates

    def decode(self, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Tensors:
        current: Mapping[str, Tensor] = wire
        stages = zip(self.codecs, self.input_templates(template), strict=True)
        for codec, like in reversed(list(stages)):
            current = codec.decode(current, like)
        return dict(current)
