"""Codecs: what happens to a payload on the wire, device half and cloud half in one object."""

from coevo.codecs.base import SEP, Codec, Tensors, encoded_bytes
from coevo.codecs.chain import Chain
from coevo.codecs.clip import ClipNorm
from coevo.codecs.gaussian import GaussianNoise
from coevo.codecs.quantize import Float16, Int8
from coevo.codecs.secagg import FixedPoint
from coevo.codecs.topk import TopK

__all__ = [
    "SEP",
    "Chain",
    "ClipNorm",
    "Codec",
    "FixedPoint",
    "Float16",
    "GaussianNoise",
    "Int8",
    "Tensors",
    "TopK",
    "encoded_bytes",
]
