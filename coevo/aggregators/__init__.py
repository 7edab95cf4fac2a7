"""Robust aggregation: many devices' updates in, one update out, despite malicious devices.

Each aggregator is one file; ``Robust`` wraps any strategy so that its merge receives the
robust aggregate. Configs pick aggregators by name from ``AGGREGATORS``.
"""

from coevo.aggregators.base import Aggregator, AggregatorState, clip_rows, flatten, unflatten
from coevo.aggregators.centered_clip import CenteredClip
from coevo.aggregators.krum import Krum, MultiKrum, krum_scores
from coevo.aggregators.mean import Mean
from coevo.aggregators.median import Median
from coevo.aggregators.norm_clip import AdaptiveClip, NormClip
from coevo.aggregators.robust import Robust
from coevo.aggregators.trimmed_mean import TrimmedMean
from coevo.aggregators.wrapper import StrategyWrapper
from coevo.config.registry import Registry

AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregator")
for _aggregator in (
    Mean,
    Median,
    TrimmedMean,
    Krum,
    MultiKrum,
    NormClip,
    AdaptiveClip,
    CenteredClip,
):
    AGGREGATORS.register(_aggregator.name)(_aggregator)

__all__ = [
    "AGGREGATORS",
    "AdaptiveClip",
    "Aggregator",
    "AggregatorState",
    "CenteredClip",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "NormClip",
    "Robust",
    "StrategyWrapper",
    "TrimmedMean",
    "clip_rows",
    "flatten",
    "krum_scores",
    "unflatten",
]
