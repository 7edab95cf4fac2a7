"""Codecs: what happens to a payload on the wire, device half and cloud half in one object."""

from coevo.codecs.base import SEP, Codec, Tensors, encoded_bytes
from coevo.codecs.chain import Chain
from coevo.codecs.quantize import Float16, Int8
from coevo.codecs.topk import TopK

__all__ = [
    "SEP",
    "Chain",
    "Codec",
    "Float16",
    "Int8",
    "Tensors",
    "TopK",
    "encoded_bytes",
]
