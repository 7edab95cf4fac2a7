"""Tasks: datasets, evaluation protocols, model builders and metrics."""

from coevo.tasks.ctr import CTRModel, RatingCTRTask
from coevo.tasks.log import DatasetError, InteractionLog, describe
from coevo.tasks.metrics import (
    activity_groups,
    ctr_metrics,
    full_ranking_metrics,
    sampled_metrics,
    summarize,
)
from coevo.tasks.models import CloudModel, DeviceModel, count_parameters, flops_per_request
from coevo.tasks.movielens import (
    GROUPLENS_URL,
    download_movielens_100k,
    load_movielens_100k,
)
from coevo.tasks.protocol import P1Split, P2Split, split_p1, split_p2
from coevo.tasks.recommendation import ModelShapes, RecommendationTask
from coevo.tasks.synthetic import SyntheticConfig, make_world, true_scores

__all__ = [
    "GROUPLENS_URL",
    "CTRModel",
    "CloudModel",
    "DatasetError",
    "DeviceModel",
    "InteractionLog",
    "ModelShapes",
    "P1Split",
    "P2Split",
    "RatingCTRTask",
    "RecommendationTask",
    "SyntheticConfig",
    "activity_groups",
    "count_parameters",
    "ctr_metrics",
    "describe",
    "download_movielens_100k",
    "flops_per_request",
    "full_ranking_metrics",
    "load_movielens_100k",
    "make_world",
    "sampled_metrics",
    "split_p1",
    "split_p2",
    "summarize",
    "true_scores",
]
