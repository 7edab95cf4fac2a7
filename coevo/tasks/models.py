"""Model builders for sequential recommendation: a small device model and a large cloud model.

Both score ``candidates [batch, num_candidates]`` given ``history [batch, length]`` (the most
recent items last, left-padded with the padding item ``num_items``), so any strategy can swap
one for the other. Item ids run ``0..num_items-1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class DeviceModel(nn.Module):
    """Small on-device recommender: pooled recent history, an MLP user tower, a dot scorer.

    An item is represented by its id embedding plus a projection of its observable content
    features (genres), so that a model trained on few interactions still generalises to items
    it never saw. The ``head`` layer is the natural personal part.

    Example:
        >>> model = DeviceModel(num_items=50, dim=8, history_len=5)
        >>> model(torch.tensor([[1, 2, 3, 50, 50]]), torch.tensor([[4, 5]])).shape
        torch.Size([1, 2])
    """

    item_features: torch.Tensor

    def __init__(
        self,
        num_items: int,
        dim: int = 32,
        history_len: int = 20,
        item_features: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.history_len = history_len
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        nn.init.normal_(self.item_embedding.weight, std=0.1)
        with torch.no_grad():
            self.item_embedding.weight[num_items].zero_()
        self.item_bias = nn.Parameter(torch.zeros(num_items + 1))
        self.feature_projection: nn.Linear | None = None
        if item_features is not None and item_features.shape[1] > 0:
            padded = torch.cat([item_features.float(), torch.zeros(1, item_features.shape[1])])
            self.register_buffer("item_features", padded, persistent=False)
            self.feature_projection = nn.Linear(item_features.shape[1], dim, bias=False)
        self.tower = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, dim)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        if self.feature_projection is None:
            return self.item_embedding(items)
        return self.item_embedding(items) + self.feature_projection(self.item_features[items])

    def user_vector(self, history: torch.Tensor) -> torch.Tensor:
        history = history[..., -self.history_len :]
        mask = (history != self.num_items).unsqueeze(-1).float()
        pooled = (self.item_vectors(history) * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)
        return self._user_from_pooled(pooled)

    def _user_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled + torch.tanh(self.tower(pooled)))

    def forward(
        self, history: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores ``[batch, num_candidates]``, or of every real item when no candidates given."""
        if candidates is None:
            return self.all_item_logits(history)
        user = self.user_vector(history)
        scores = (self.item_vectors(candidates) * user.unsqueeze(-2)).sum(-1)
        return scores + self.item_bias[candidates]

    def all_item_logits(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of every real item, ``[batch, num_items]`` (for full-softmax training)."""
        items = torch.arange(self.num_items, device=history.device)
        vectors = self.item_vectors(items)
        return self.user_vector(history) @ vectors.T + self.item_bias[: self.num_items]

    def sequence_logits(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of every real item after each position, ``[batch, length, num_items]``.

        Position ``t`` pools the ``history_len`` items ending at ``t`` (a sliding-window mean
        from cumulative sums), exactly what ``forward`` sees for that prefix.
        """
        mask = (history != self.num_items).unsqueeze(-1).float()
        summed = F.pad((self.item_vectors(history) * mask).cumsum(1), (0, 0, 1, 0))
        counted = F.pad(mask.cumsum(1), (0, 0, 1, 0))
        end = torch.arange(1, history.shape[1] + 1, device=history.device)
        start = (end - self.history_len).clamp(min=0)
        pooled = (summed[:, end] - summed[:, start]) / (counted[:, end] - counted[:, start]).clamp(
            min=1.0
        )
        items = torch.arange(self.num_items, device=history.device)
        user = self._user_from_pooled(pooled)
        return user @ self.item_vectors(items).T + self.item_bias[: self.num_items]


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_feedforward = nn.LayerNorm(dim)
        self.feedforward = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm_attention(x)
        h, _ = self.attention(h, h, h, attn_mask=mask, need_weights=False)
        x = x + self.dropout(h)
        return x + self.dropout(self.feedforward(self.norm_feedforward(x)))


class CloudModel(nn.Module):
    """Large cloud recommender: causal self-attention over a long history (SASRec-style).

    Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018, with pre-norm blocks
    and a full-softmax training loss.

    Example:
        >>> model = CloudModel(num_items=50, dim=16, history_len=6, num_layers=1, num_heads=2)
        >>> model(torch.tensor([[50, 50, 1, 2, 3, 4]]), torch.tensor([[7, 8, 9]])).shape
        torch.Size([1, 3])
    """

    item_features: torch.Tensor

    def __init__(
        self,
        num_items: int,
        dim: int = 64,
        history_len: int = 50,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.2,
        item_features: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.history_len = history_len
        self.num_heads = num_heads
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        nn.init.normal_(self.item_embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[num_items].zero_()
        self.feature_projection: nn.Linear | None = None
        if item_features is not None and item_features.shape[1] > 0:
            padded = torch.cat([item_features.float(), torch.zeros(1, item_features.shape[1])])
            self.register_buffer("item_features", padded, persistent=False)
            self.feature_projection = nn.Linear(item_features.shape[1], dim, bias=False)
        self.position_embedding = nn.Embedding(history_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        # A skip path from the mean of the history: attention need not relearn averaging,
        # which is most of the signal when tastes are stable.
        self.pooled = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """Hidden state after each position, ``[batch, length, dim]``; pads are zeroed."""
        history = history[..., -self.history_len :]
        batch, length = history.shape
        keep = (history != self.num_items).unsqueeze(-1).float()
        positions = torch.arange(length, device=history.device) + self.history_len - length
        x = self.item_vectors(history) * self.item_embedding.embedding_dim**0.5
        x = self.dropout(x + self.position_embedding(positions)) * keep
        # A large negative instead of -inf, and the diagonal always open, so that padded
        # positions never produce an all-masked softmax row (NaN).
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        blocked = future | (history == self.num_items).unsqueeze(1)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool)
        mask = torch.zeros(batch, length, length).masked_fill(blocked, -1e9)
        mask = mask.repeat_interleave(self.num_heads, dim=0)
        items = self.item_vectors(history) * keep
        prefix_mean = items.cumsum(1) / keep.cumsum(1).clamp(min=1.0)
        for block in self.blocks:
            x = block(x, mask) * keep
        return (self.norm(x) + self.pooled(prefix_mean)) * keep

    def forward(
        self, history: torch.Tensor, candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores ``[batch, num_candidates]``, or of every real item when no candidates given."""
        if candidates is None:
            return self.all_item_logits(history)
        user = self.encode(history)[:, -1]
        return (self.item_vectors(candidates) * user.unsqueeze(-2)).sum(-1)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Item id embedding plus the projection of its content features (if any)."""
        if self.feature_projection is None:
            return self.item_embedding(items)
        return self.item_embedding(items) + self.feature_projection(self.item_features[items])

    def _catalogue(self) -> torch.Tensor:
        return self.item_vectors(
            torch.arange(self.num_items, device=self.item_embedding.weight.device)
        )

    def all_item_logits(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of every real item after the last position, ``[batch, num_items]``."""
        return self.encode(history)[:, -1] @ self._catalogue().T

    def sequence_logits(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of every real item after each position, ``[batch, length, num_items]``."""
        return self.encode(history) @ self._catalogue().T


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_request(model: nn.Module, history_len: int, num_candidates: int = 100) -> int:
    """FLOPs to score ``num_candidates`` items for one user (one request), as PyTorch counts them.

    Matrix products are counted by ``torch.utils.flop_counter``; element-wise work (pooling,
    activations, the candidate dot products) is added analytically since the counter skips it.
    """
    num_items = getattr(model, "num_items", 0)
    history = torch.full((1, history_len), num_items, dtype=torch.long)
    history[0, -history_len:] = torch.arange(history_len) % max(num_items, 1)
    candidates = torch.arange(num_candidates)[None] % max(num_items, 1)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(history, candidates)
    model.train(was_training)
    embedding = model.get_submodule("item_embedding")
    if not isinstance(embedding, nn.Embedding):
        raise TypeError("flops_per_request needs a model with an nn.Embedding 'item_embedding'")
    dim = embedding.embedding_dim
    return int(counter.get_total_flops()) + 2 * num_candidates * dim + 2 * history_len * dim


def cross_entropy_all_items(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Full-catalogue softmax cross-entropy per row (padded targets give 0)."""
    num_items = logits.shape[-1]
    valid = target < num_items
    loss = F.cross_entropy(logits, target.clamp(max=num_items - 1), reduction="none")
    return loss * valid
