"""The built-in synthetic device–cloud recommendation world: no downloads, seeded, scalable.

Each device is one user. Items have content flags, latent factors and Zipf popularity; users
belong to clusters, deviate personally and drift; each picks distinct items by Gumbel-top-k
from ``<u_t, v_i> / temperature + popularity_weight * log(popularity_i)``. Users draw from
per-block seeded streams, so the log depends only on the config and the seed, and a world with
more devices extends one with fewer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from coevo.tasks.log import InteractionLog

__all__ = ["SyntheticConfig", "make_world", "true_scores"]

# Randomness is drawn per block of users; processing chunks are whole numbers of blocks.
_BLOCK_USERS = 256
# Elements of one [chunk_users, num_items] float32 matrix (32 MiB), to bound memory.
_CHUNK_ELEMENTS = 8 * 1024 * 1024
_STAGES = 4
_SIGMA = 0.8  # of log activity: real logs have a few very active devices
_EPOCH_S = 1_577_836_800  # 2020-01-01, so timestamps look like real Unix seconds
_START_WINDOW_S = 200 * 86_400
_SESSION_BREAK_SHARE = 0.1  # of consecutive interactions: sessions of ~10 interactions
# Ratings are standardised per user; this centre puts ~55% of them at >= 4, as in MovieLens.
_RATING_CENTRE, _RATING_SLOPE = 3.65, 1.2
# Separate seed streams, so that no draw shifts when another one changes size.
_ITEMS, _USERS, _CHOICES, _RATING_NOISE, _ROW_UNIFORMS = range(5)


class SyntheticConfig(BaseModel):
    """Knobs of the synthetic world; each field says which heterogeneity it controls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Devices (one user each): more devices, more realistic fleets, longer generation.
    num_devices: int = Field(default=1000, ge=1, le=100_000_000)
    # Catalogue size: a larger catalogue gives sparser, harder recommendation.
    num_items: int = Field(default=500, ge=2, le=100_000)
    # Rank of user/item taste: higher allows richer tastes but needs more data to recover.
    latent_dim: int = Field(default=16, ge=1, le=256)
    # Observable binary content flags (1-3 per item): let models generalise to unseen items.
    num_item_features: int = Field(default=12, ge=1, le=256)
    # Share of an item's factor explained by its flags: high helps cold start, low rewards IDs.
    content_weight: float = Field(default=0.6, ge=0.0, le=1.0)
    # Zipf exponent of item popularity: long tail (high) versus a flat catalogue (0).
    popularity_exponent: float = Field(default=1.0, ge=0.0, le=3.0)
    # Weight of log-popularity in choices: high makes a popularity baseline hard to beat.
    popularity_weight: float = Field(default=1.0, ge=0.0, le=10.0)
    # Population clusters: more clusters, less that one global model can share.
    num_clusters: int = Field(default=8, ge=1, le=10_000)
    # Norm of cluster centres: strong structure rewards device clustering.
    cluster_scale: float = Field(default=1.0, ge=0.0, le=10.0)
    # Personal deviation from the cluster: what only personalisation can recover.
    personal_scale: float = Field(default=1.0, ge=0.0, le=10.0)
    # Taste drift over a device's sequence, relative to its taste norm: punishes stale models.
    drift_scale: float = Field(default=0.5, ge=0.0, le=10.0)
    # Fewest interactions per device: low values create few-shot devices.
    min_interactions: int = Field(default=20, ge=1, le=100_000)
    # Mean of the lognormal activity before clipping: data volume versus generation time.
    mean_interactions: float = Field(default=60.0, gt=0.0, le=100_000.0)
    # Most interactions per device (at most num_items): heavy tail versus generation time.
    max_interactions: int = Field(default=400, ge=1, le=100_000)
    # Choice sharpness: low makes users predictable, high makes them noisy.
    temperature: float = Field(default=0.5, ge=0.01, le=100.0)
    # Rating noise around the user's standardised affinity: label noise versus signal.
    rating_noise: float = Field(default=0.5, ge=0.0, le=5.0)
    # Share of devices whose row feature leaks the label: tests robustness to spurious cues.
    spurious_share: float = Field(default=0.0, ge=0.0, le=1.0)
    # How often the spurious feature equals the label on those devices (0.5 = no leak).
    spurious_strength: float = Field(default=0.9, ge=0.0, le=1.0)
    # Share of consecutive interactions within the same second: exercises tie-breaks.
    tie_share: float = Field(default=0.3, ge=0.0, le=1.0 - _SESSION_BREAK_SHARE)
    # Mean gap between interactions within a session, in seconds.
    event_gap_s: float = Field(default=120.0, gt=0.0, le=86_400.0)
    # Mean gap between sessions, in seconds: long gaps make time splits span more drift.
    session_gap_s: float = Field(default=172_800.0, gt=0.0, le=31_536_000.0)

    @model_validator(mode="after")
    def _check_consistent(self) -> SyntheticConfig:
        low, mean, high = self.min_interactions, self.mean_interactions, self.max_interactions
        # A device never picks the same item twice, hence the catalogue bounds the maximum.
        if not low <= mean <= high <= self.num_items:
            raise ValueError(
                f"need min_interactions ({low}) <= mean_interactions ({mean}) "
                f"<= max_interactions ({high}) <= num_items ({self.num_items})"
            )
        return self


class _Items(NamedTuple):
    factors: np.ndarray  # float32 [num_items, latent_dim]
    flags: np.ndarray  # float32 [num_items, num_item_features]
    choice_bias: np.ndarray  # float32 [num_items]: popularity_weight * log(popularity)
    centres: np.ndarray  # float32 [num_clusters, latent_dim]


class _Users(NamedTuple):
    counts: np.ndarray  # int64 [users]
    cluster: np.ndarray  # int64 [users]
    spurious: np.ndarray  # bool [users]
    start_s: np.ndarray  # int64 [users]
    latent: np.ndarray  # float32 [users, latent_dim], the taste at mid-sequence
    drift: np.ndarray  # float32 [users, latent_dim], the move from first to last interaction


def _make_items(config: SyntheticConfig, seed: int) -> _Items:
    rng = np.random.default_rng([seed, _ITEMS, 0])
    dim, num_flags, num_items = config.latent_dim, config.num_item_features, config.num_items
    projection = rng.standard_normal((num_flags, dim))
    flag_counts = rng.integers(1, min(3, num_flags) + 1, size=num_items)
    # A random permutation per item: the flags whose place is below the count are on.
    places = np.argsort(rng.random((num_items, num_flags)), axis=1)
    flags = (places < flag_counts[:, None]).astype(np.float32)
    content = flags @ projection / np.sqrt(flag_counts)[:, None]
    weight = config.content_weight
    # Dividing by the mix's norm keeps the score scale the same for every content_weight.
    mixed = weight * content + (1.0 - weight) * rng.standard_normal((num_items, dim))
    factors = (mixed / math.hypot(weight, 1.0 - weight)).astype(np.float32)
    ranks = rng.permutation(num_items) + 1
    bias = -config.popularity_weight * config.popularity_exponent * np.log(ranks)
    # Centre and personal deviation each have norm ~sqrt(1/2), so |u| ~ 1 at the defaults and
    # taste logits spread by ~1 / temperature, comparable to the popularity term.
    centres = rng.standard_normal((config.num_clusters, dim)) / math.sqrt(2 * dim)
    return _Items(factors, flags, bias.astype(np.float32), centres.astype(np.float32))


def _make_users(config: SyntheticConfig, seed: int, items: _Items) -> _Users:
    """All users, drawn in whole blocks so that each user's values depend on its id only."""
    blocks, dim = [], config.latent_dim
    scale = config.personal_scale / math.sqrt(2 * dim)
    for block in range(-(-config.num_devices // _BLOCK_USERS)):
        rng = np.random.default_rng([seed, _USERS, block])
        activity = np.exp(_SIGMA * rng.standard_normal(_BLOCK_USERS) - _SIGMA**2 / 2)
        counts = np.rint(config.mean_interactions * activity).astype(np.int64)
        counts = np.clip(counts, config.min_interactions, config.max_interactions)
        cluster = rng.integers(config.num_clusters, size=_BLOCK_USERS)
        spurious = rng.random(_BLOCK_USERS) < config.spurious_share
        start_s = (rng.random(_BLOCK_USERS) * _START_WINDOW_S).astype(np.int64)
        personal = rng.standard_normal((_BLOCK_USERS, dim)) * scale
        direction = rng.standard_normal((_BLOCK_USERS, dim))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        latent = config.cluster_scale * items.centres[cluster] + personal
        drift = config.drift_scale * np.linalg.norm(latent, axis=1, keepdims=True) * direction
        latent, drift = latent.astype(np.float32), drift.astype(np.float32)
        blocks.append((counts, cluster, spurious, start_s, latent, drift))
    columns = zip(*blocks, strict=True)
    return _Users(*(np.concatenate(column)[: config.num_devices] for column in columns))


def _choose(
    config: SyntheticConfig, seed: int, items: _Items, users: _Users, start: int
) -> tuple[np.ndarray, np.ndarray]:
    """Items of the users from ``start`` on, in order, and the affinity ``<u_t, v_i>`` then."""
    num_users, num_items = len(users.counts), config.num_items
    blocks = range(start // _BLOCK_USERS, -(-(start + num_users) // _BLOCK_USERS))
    generators = [np.random.default_rng([seed, _CHOICES, block]) for block in blocks]
    # Reused buffers: allocating fresh 32 MiB arrays every stage costs page faults.
    noise = np.empty((len(blocks) * _BLOCK_USERS, num_items), dtype=np.float32)
    keys = np.empty((num_users, num_items), dtype=np.float32)
    groups = max(1, num_items // 8)
    picked: list[np.ndarray] = []  # flat indices row * num_items + item, in pick order
    affinity: list[np.ndarray] = []
    for stage in range(_STAGES):
        # Every block draws every stage's noise, so the streams never depend on the chunking.
        for index, generator in enumerate(generators):
            generator.random(dtype=np.float32, out=noise[index * _BLOCK_USERS :][:_BLOCK_USERS])
        sizes = (users.counts * (stage + 1)) // _STAGES - (users.counts * stage) // _STAGES
        latent = users.latent + ((stage + 0.5) / _STAGES - 0.5) * users.drift
        np.matmul(latent / np.float32(config.temperature), items.factors.T, out=keys)
        keys += items.choice_bias
        # Gumbel-top-k: the k largest of s + Gumbel noise are a draw without replacement from
        # softmax(s), in sequential order once sorted. A uniform of 0 gives a key of -inf.
        gumbel = noise[:num_users]
        with np.errstate(divide="ignore"):
            np.log(np.negative(np.log(gumbel, out=gumbel), out=gumbel), out=gumbel)
        keys -= gumbel
        if picked:
            keys.reshape(-1)[np.concatenate(picked)] = -np.inf
        # The k-th largest maximum over disjoint item groups is at most the k-th largest key,
        # so only keys above it compete; partitioning whole rows would cost 4x more.
        bound = keys[:, : num_items // groups * groups].reshape(num_users, -1, groups).max(axis=1)
        reach = max(1, min(int(sizes.max()), groups))
        largest = np.sort(np.partition(bound, groups - reach, axis=1)[:, groups - reach :])
        floor = largest[np.arange(num_users), np.clip(reach - sizes, 0, reach - 1)]
        floor[sizes > groups] = -np.inf
        flat = np.flatnonzero(keys >= floor[:, None])
        # Stable sort by (user, -key): exact ties keep the lower item id.
        flat = flat[np.lexsort((-keys.reshape(-1)[flat], flat // num_items))]
        rows = flat // num_items
        keep = np.arange(len(flat)) - np.searchsorted(rows, rows) < sizes[rows]
        flat, rows = flat[keep], rows[keep]
        picked.append(flat)
        affinity.append(np.einsum("ij,ij->i", latent[rows], items.factors[flat % num_items]))
    flat = np.concatenate(picked)
    order = np.argsort(flat // num_items, kind="stable")
    return flat[order] % num_items, np.concatenate(affinity)[order]


def _rows(
    config: SyntheticConfig, seed: int, users: _Users, affinity: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ratings, timestamps and spurious feature of the rows of the users from ``start`` on."""
    noise, uniforms = [], []
    per_block = np.add.reduceat(users.counts, np.arange(0, len(users.counts), _BLOCK_USERS))
    for block, num_rows in enumerate(per_block.tolist(), start // _BLOCK_USERS):
        noise.append(np.random.default_rng([seed, _RATING_NOISE, block]).standard_normal(num_rows))
        uniforms.append(np.random.default_rng([seed, _ROW_UNIFORMS, block]).random((num_rows, 3)))
    kind, magnitude, coin = np.concatenate(uniforms).T
    local = np.repeat(np.arange(len(users.counts)), users.counts)
    # Standardising within each user makes the rating share independent of the other knobs.
    centred = affinity - (np.bincount(local, affinity) / users.counts)[local]
    spread = np.sqrt(np.bincount(local, centred**2) / users.counts) + 1e-9
    score = _RATING_CENTRE + _RATING_SLOPE * centred / spread[local]
    stars = np.clip(np.rint(score + config.rating_noise * np.concatenate(noise)), 1, 5)
    session_break = kind < config.tie_share + _SESSION_BREAK_SHARE
    mean_gap_s = np.where(session_break, config.session_gap_s, config.event_gap_s)
    gap = np.where(kind < config.tie_share, 0.0, 1.0 + mean_gap_s * -np.log1p(-magnitude))
    elapsed = np.cumsum(gap.astype(np.int64))
    elapsed -= np.repeat(elapsed[np.cumsum(users.counts) - users.counts], users.counts)
    timestamp = _EPOCH_S + users.start_s[local] + elapsed
    leaked = (stars >= 4) ^ (coin >= config.spurious_strength)
    feature = np.where(users.spurious[local], leaked, coin < 0.5)
    return stars.astype(np.float32), timestamp, feature.astype(np.float32)


def make_world(
    config: SyntheticConfig, seed: int, *, _chunk_users: int | None = None
) -> InteractionLog:
    """Generate the synthetic interaction log.

    Args:
        config: the world's knobs.
        seed: non-negative seed; the log depends only on ``config`` and ``seed``.
        _chunk_users: users processed at once (a multiple of 256); by default as many as
            keep one ``[chunk, num_items]`` float32 matrix near 32 MiB. Does not change the log.

    Returns:
        The log named ``"synthetic"``, rows sorted by (user, timestamp). ``user_features``
        is the cluster one-hot plus a last column marking spurious devices; ``row_features``
        holds the spurious feature when ``spurious_share > 0``, else ``None``.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    num_devices = config.num_devices
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // (_BLOCK_USERS * config.num_items))
    chunk = _chunk_users or blocks_per_chunk * _BLOCK_USERS
    if chunk <= 0 or chunk % _BLOCK_USERS:
        raise ValueError(f"_chunk_users must be a positive multiple of {_BLOCK_USERS}")
    items = _make_items(config, seed)
    # Per-device parameters are O(num_devices * latent_dim); only [chunk, items] is chunked.
    everyone = _make_users(config, seed, items)
    offsets = np.concatenate(([0], np.cumsum(everyone.counts)))
    user = np.repeat(np.arange(num_devices, dtype=np.int64), everyone.counts)
    item, timestamp = np.empty_like(user), np.empty_like(user)
    rating, feature = np.empty(len(user), np.float32), np.empty(len(user), np.float32)
    for start in range(0, num_devices, chunk):
        users = _Users(*(column[start : start + chunk] for column in everyone))
        rows = slice(offsets[start], offsets[start + len(users.counts)])
        item[rows], affinity = _choose(config, seed, items, users, start)
        rating[rows], timestamp[rows], feature[rows] = _rows(config, seed, users, affinity, start)
    one_hot = np.eye(config.num_clusters, dtype=np.float32)[everyone.cluster]
    user_features = np.column_stack((one_hot, everyone.spurious)).astype(np.float32)
    return InteractionLog(
        name="synthetic",
        user=user,
        item=item,
        rating=rating,
        timestamp=timestamp,
        num_users=num_devices,
        num_items=config.num_items,
        item_features=items.flags,
        user_features=user_features,
        row_features=feature[:, None] if config.spurious_share > 0 else None,
        info={**config.model_dump(), "seed": seed},
    )


def true_scores(config: SyntheticConfig, seed: int, users: np.ndarray) -> np.ndarray:
    """Noiseless affinity ``<u_end, v_i>`` of the given users at the end of their sequences.

    Regenerates the world's parameters from the seed rather than storing them: memory and
    time are O(num_devices * latent_dim), like the parameters inside ``make_world``.

    Returns:
        float32 ``[len(users), num_items]``, rows in the order of ``users``.
    """
    users = np.asarray(users, dtype=np.int64)
    if users.size and (users.min() < 0 or users.max() >= config.num_devices):
        raise ValueError(f"users must lie in [0, {config.num_devices})")
    items = _make_items(config, seed)
    everyone = _make_users(config, seed, items)
    return (everyone.latent[users] + 0.5 * everyone.drift[users]) @ items.factors.T
