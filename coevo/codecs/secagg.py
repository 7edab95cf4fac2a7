"""Secure aggregation (SecAgg+): the cloud learns the sum of the devices' updates, nothing else.

Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020 (SecAgg+), after Bonawitz et al., CCS 2017 (SecAgg).

Device: encodes its (clipped) update in fixed point in the ring Z_2^32 (or Z_2^64), adds a
self mask expanded from a random seed ``b`` and, for each neighbour in a sparse random graph of
degree O(log n), a pairwise mask expanded from an X25519 key agreement (added by the lower
index, subtracted by the higher), and sends only the masked vector. It Shamir-shares ``b`` and
its mask private key among its neighbours (encrypted device to device with AES-GCM).
Cloud: routes keys and shares, sums the masked vectors (pairwise masks cancel), then asks the
survivors for shares: of ``b`` for every device whose vector arrived, of the mask key for every
device that dropped after sharing keys, and removes those masks. Wire, per device: 64 bytes of
public keys up; per neighbour 68 bytes of keys and 94 of encrypted shares down, 94 of shares
and 37 of unmasking shares up; the masked vector (4 or 8 bytes per value) up; 4 round trips.

In the simulator, the protocol's numerical effect is the ``FixedPoint`` codec (the secure sum
equals the plain sum of fixed-point values exactly) and its traffic is ``secagg_cost``;
``SecAggClient`` and ``SecAggServer`` run the real protocol over bytes for the Service and the
benchmark. Randomness comes from the operating system.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from torch import Tensor

from coevo.codecs.base import Codec, Tensors
from coevo.codecs.shamir import shamir_combine, shamir_split

ID_BYTES, PUBLIC_BYTES, SHARE_BYTES, TAG_BYTES = 4, 64, 33, 16
CIPHER_BYTES = 2 * ID_BYTES + 2 * SHARE_BYTES + TAG_BYTES
"""An encrypted share pair: sender, recipient, share of ``b``, share of the mask key, GCM tag."""
ROUND_TRIPS = 4
"""Advertise keys, share keys, masked input, unmasking; plain FedAvg needs one."""


class SecAggError(RuntimeError):
    """The protocol cannot finish: too many devices dropped, or a message is malformed."""


@dataclass(frozen=True)
class SecAggParams:
    """The public parameters of one aggregation, known to the cloud and every device.

    Args:
        num_devices: devices that start the round (ids ``0..num_devices-1``).
        degree: neighbours per device k (even, or ``num_devices - 1`` for a complete graph).
        threshold: shares needed to rebuild a secret t, in ``1..degree``.
        vector_len: values in each device's vector.
        clip_range: every value is clamped to ``[-clip_range, clip_range]`` before encoding.
        scale_bits: fixed-point fractional bits f (resolution ``2^-f``).
        ring_bits: 32 or 64, the ring Z_2^ring_bits of the masked values.

    Raises:
        ValueError: for a field out of range, or when ``num_devices · clip_range · 2^f`` does not
            fit in half the ring (the sum would wrap around).
    """

    num_devices: int
    degree: int
    threshold: int
    vector_len: int
    clip_range: float = 1.0
    scale_bits: int = 16
    ring_bits: int = 32

    def __post_init__(self) -> None:
        n, k = self.num_devices, self.degree
        if n < 2:
            raise ValueError(f"SecAggParams.num_devices must be at least 2, got {n}")
        if not (1 <= k <= n - 1 and (k % 2 == 0 or k == n - 1)):
            raise ValueError(f"SecAggParams.degree must be even in 2..{n - 1} or {n - 1}, got {k}")
        if not 1 <= self.threshold <= k:
            raise ValueError(
                f"SecAggParams.threshold must be in 1..degree={k}, got {self.threshold}"
            )
        if self.vector_len < 1:
            raise ValueError(f"SecAggParams.vector_len must be at least 1, got {self.vector_len}")
        if self.ring_bits not in (32, 64):
            raise ValueError(f"SecAggParams.ring_bits must be 32 or 64, got {self.ring_bits}")
        if not self.clip_range > 0:
            raise ValueError(f"SecAggParams.clip_range must be positive, got {self.clip_range}")
        largest = n * self.clip_range * 2.0**self.scale_bits
        if largest >= 2.0 ** (self.ring_bits - 1):
            raise ValueError(
                f"SecAggParams: num_devices·clip_range·2^scale_bits = {largest:.3g} must stay "
                f"below 2^{self.ring_bits - 1}; lower scale_bits or clip_range, or ring_bits=64"
            )

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.ring_bits == 32 else np.uint64


def neighbour_threshold(degree: int) -> int:
    """Shares needed to rebuild a secret: a strict majority of the neighbours, ``k // 2 + 1``."""
    return degree // 2 + 1


def _binomial_below(trials: int, success: float, limit: int) -> float:
    """P[Binomial(trials, success) < limit]."""
    return sum(
        math.comb(trials, i) * success**i * (1 - success) ** (trials - i) for i in range(limit)
    )


def neighbour_degree(num_devices: int, dropout: float = 0.3, failure: float = 1e-6) -> int:
    """The smallest even degree k for which the round survives ``dropout`` w.p. ≥ 1 - failure.

    A round fails when some device keeps fewer than ``neighbour_threshold(k)`` neighbours; by a
    union bound over devices it is enough that ``n · P[Bin(k, 1 - dropout) < k//2 + 1] ≤
    failure``. The binomial tail falls exponentially in k, so k grows as log(n / failure), not n.
    At most ``num_devices - 1`` (a complete graph).
    """
    if num_devices < 2:
        raise ValueError(f"num_devices must be at least 2, got {num_devices}")
    if not 0 <= dropout < 0.5:
        raise ValueError(f"dropout must be in [0, 0.5) (a majority must survive), got {dropout}")
    degree = 2
    while degree < num_devices - 1:
        tail = _binomial_below(degree, 1 - dropout, neighbour_threshold(degree))
        if num_devices * tail <= failure:
            return degree
        degree += 2
    return num_devices - 1


def neighbour_graph(num_devices: int, degree: int, seed: int) -> np.ndarray:
    """Each device's neighbours, ``[num_devices, degree]`` sorted: a randomly relabelled Harary
    graph (devices on a shuffled ring, each joined to the ``degree / 2`` nearest on either side),
    as in SecAgg+. ``degree = num_devices - 1`` gives the complete graph."""
    if degree == num_devices - 1:
        ids = np.arange(num_devices)
        return np.stack([np.delete(ids, u) for u in ids])
    order = np.random.default_rng(seed).permutation(num_devices)
    position = np.argsort(order)
    offsets = np.concatenate([np.arange(1, degree // 2 + 1), -np.arange(1, degree // 2 + 1)])
    around = (position[:, None] + offsets[None, :]) % num_devices
    return np.sort(order[around], axis=1)


def encode_fixed(values: np.ndarray, params: SecAggParams) -> np.ndarray:
    """Values clamped to ±clip_range, times 2^f, rounded, as ring elements (two's complement)."""
    codes = np.round(
        np.clip(values, -params.clip_range, params.clip_range) * 2.0**params.scale_bits
    )
    # Two's complement: the int64 bits read as unsigned, then cut to the ring's width (mod 2^k).
    return codes.astype(np.int64).view(np.uint64).astype(params.dtype)


def decode_fixed(total: np.ndarray, params: SecAggParams) -> np.ndarray:
    """A ring sum back to float64: read as a signed integer, divided by 2^f."""
    signed = total.view(np.int64) if params.ring_bits == 64 else total.view(np.int32)
    return signed.astype(np.float64) / 2.0**params.scale_bits


def expand(seed: bytes, params: SecAggParams) -> np.ndarray:
    """A mask of ``vector_len`` ring elements from a 32-byte seed (AES-256 in counter mode)."""
    size = params.vector_len * np.dtype(params.dtype).itemsize
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(size))
    return np.frombuffer(stream, dtype=params.dtype)


def _pack(entries: Mapping[int, bytes]) -> bytes:
    return b"".join(u.to_bytes(ID_BYTES, "little") + body for u, body in sorted(entries.items()))


def _unpack(message: bytes, body_bytes: int) -> dict[int, bytes]:
    step = ID_BYTES + body_bytes
    if len(message) % step:
        raise SecAggError(
            f"message of {len(message)} bytes is not a whole number of {step}-byte entries"
        )
    return {
        int.from_bytes(message[i : i + ID_BYTES], "little"): message[i + ID_BYTES : i + step]
        for i in range(0, len(message), step)
    }


def _agree(private: X25519PrivateKey, public: bytes, label: bytes) -> bytes:
    """A 32-byte key from an X25519 agreement, separated by ``label``."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return hashlib.sha256(label + shared).digest()


def _nonce(sender: int, recipient: int) -> bytes:
    return sender.to_bytes(ID_BYTES, "little") + recipient.to_bytes(ID_BYTES, "little") + bytes(4)


def _bitmap(flags: list[bool]) -> bytes:
    return np.packbits(np.array(flags, dtype=bool), bitorder="little").tobytes()


def _add_pair_mask(total: np.ndarray, u: int, v: int, seed: bytes, params: SecAggParams) -> None:
    """Adds, in place, what device u masks with for its pair with v: +PRG if u < v, else -PRG."""
    mask = expand(seed, params)
    (np.add if u < v else np.subtract)(total, mask, out=total)


class SecAggClient:
    """One device's side of the protocol; every method takes and returns bytes.

    Call, in order: ``advertise``, ``share_keys`` (with the cloud's answer to advertise),
    ``masked_input`` (with the cloud's answer to share_keys), ``unmask`` (with its request).

    Args:
        device: this device's id in ``0..num_devices-1``.
        params: the round's public parameters.
        neighbours: this device's neighbours, a row of ``neighbour_graph``.
    """

    def __init__(self, device: int, params: SecAggParams, neighbours: np.ndarray) -> None:
        self.device, self.params = device, params
        self.neighbours = [int(v) for v in neighbours]
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(32)
        self._public: dict[int, bytes] = {}
        self._ciphers: dict[int, AESGCM] = {}
        self._received: dict[int, tuple[int, int]] = {}

    def advertise(self) -> bytes:
        """Round 1, up: the two public keys (encryption, masking), 64 bytes."""
        return (
            self._cipher_key.public_key().public_bytes_raw()
            + self._mask_key.public_key().public_bytes_raw()
        )

    def share_keys(self, neighbour_keys: bytes) -> bytes:
        """Round 2, up: Shamir shares of ``b`` and of the mask key, encrypted per neighbour."""
        self._public = _unpack(neighbour_keys, PUBLIC_BYTES)
        unknown = set(self._public) - set(self.neighbours)
        if unknown:
            raise SecAggError(f"device {self.device}: keys from non-neighbours {sorted(unknown)}")
        ids = sorted(self._public)
        threshold = self.params.threshold
        if len(ids) < threshold:
            raise SecAggError(
                f"device {self.device}: {len(ids)} neighbours advertised keys, threshold is "
                f"{threshold}"
            )
        xs = [v + 1 for v in ids]
        self_shares = shamir_split(int.from_bytes(self._self_seed, "little"), xs, threshold)
        mask_secret = int.from_bytes(self._mask_key.private_bytes_raw(), "little")
        key_shares = shamir_split(mask_secret, xs, threshold)
        out = {}
        for v, b_share, sk_share in zip(ids, self_shares, key_shares, strict=True):
            key = _agree(self._cipher_key, self._public[v][:32], b"coevo-secagg-cipher")
            self._ciphers[v] = AESGCM(key)
            plain = (
                self.device.to_bytes(ID_BYTES, "little")
                + v.to_bytes(ID_BYTES, "little")
                + b_share.to_bytes(SHARE_BYTES, "little")
                + sk_share.to_bytes(SHARE_BYTES, "little")
            )
            out[v] = self._ciphers[v].encrypt(_nonce(self.device, v), plain, None)
        return _pack(out)

    def masked_input(self, vector: np.ndarray, shares: bytes) -> bytes:
        """Round 3, up: the fixed-point vector plus the self mask and the pairwise masks."""
        params = self.params
        if np.shape(vector) != (params.vector_len,):
            raise SecAggError(
                f"device {self.device}: vector has shape {np.shape(vector)}, expected "
                f"({params.vector_len},)"
            )
        for v, cipher in _unpack(shares, CIPHER_BYTES).items():
            if v not in self._ciphers:
                raise SecAggError(f"device {self.device}: shares from unknown device {v}")
            plain = self._ciphers[v].decrypt(_nonce(v, self.device), cipher, None)
            body = plain[2 * ID_BYTES :]
            b_share = int.from_bytes(body[:SHARE_BYTES], "little")
            self._received[v] = (b_share, int.from_bytes(body[SHARE_BYTES:], "little"))
        total = encode_fixed(np.asarray(vector, dtype=np.float64), params)
        np.add(total, expand(self._self_seed, params), out=total)
        for v in self._received:
            seed = _agree(self._mask_key, self._public[v][32:], b"coevo-secagg-mask")
            _add_pair_mask(total, self.device, v, seed, params)
        return total.tobytes()

    def unmask(self, request: bytes) -> bytes:
        """Round 4, up: for each neighbour that shared with us, one share: of ``b`` if its
        vector arrived (bit set in ``request``), of its mask key if it dropped."""
        ids = sorted(self._received)
        flags = np.unpackbits(np.frombuffer(request, dtype=np.uint8), bitorder="little")
        if len(flags) < len(ids):
            raise SecAggError(f"device {self.device}: unmask request too short for {len(ids)}")
        out = {}
        for v, survived in zip(ids, flags[: len(ids)], strict=True):
            b_share, sk_share = self._received[v]
            out[v] = (b_share if survived else sk_share).to_bytes(SHARE_BYTES, "little")
        return _pack(out)


class SecAggServer:
    """The cloud's side: routes keys and shares, keeps only masked vectors, unmasks the sum.

    Each phase takes the messages of the devices that made it this far (a missing device has
    dropped) and returns what to send each device for the next phase.

    Args:
        params: the round's public parameters.
        graph: ``neighbour_graph(params.num_devices, params.degree, seed)``.
    """

    def __init__(self, params: SecAggParams, graph: np.ndarray) -> None:
        self.params, self.graph = params, graph
        self.keys: dict[int, bytes] = {}
        self.shared: dict[int, set[int]] = {}
        self.masked: dict[int, np.ndarray] = {}
        """The only thing the cloud ever holds of a device's update: its masked vector."""

    def advertise(self, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        """Public keys in; for each device that sent them, its neighbours' keys out."""
        for u, message in messages.items():
            if len(message) != PUBLIC_BYTES:
                raise SecAggError(f"device {u}: public keys must be {PUBLIC_BYTES} bytes")
        self.keys = dict(messages)
        return {
            u: _pack({int(v): self.keys[int(v)] for v in self.graph[u] if int(v) in self.keys})
            for u in self.keys
        }

    def share(self, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        """Encrypted shares in (per sender); for each sender, the shares addressed to it out."""
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in messages}
        for u, message in messages.items():
            for v, cipher in _unpack(message, CIPHER_BYTES).items():
                if v in inbox:
                    inbox[v][u] = cipher
        self.shared = {v: set(received) for v, received in inbox.items()}
        return {v: _pack(received) for v, received in inbox.items()}

    def collect(self, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        """Masked vectors in; for each device that sent one, its unmasking request out."""
        params = self.params
        for u, message in messages.items():
            if u not in self.shared:
                raise SecAggError(f"device {u} sent a masked vector without sharing keys")
            vector = np.frombuffer(message, dtype=params.dtype)
            if vector.shape != (params.vector_len,):
                raise SecAggError(f"device {u}: masked vector has {vector.size} values")
            self.masked[u] = vector
        return {u: _bitmap([v in self.masked for v in sorted(self.shared[u])]) for u in self.masked}

    def _rebuild(self, secret_of: int, shares: dict[int, dict[int, int]], what: str) -> int:
        points = [
            (u + 1, by_owner[secret_of]) for u, by_owner in shares.items() if secret_of in by_owner
        ]
        need = self.params.threshold
        if len(points) < need:
            raise SecAggError(
                f"cannot rebuild device {secret_of}'s {what}: {len(points)} of its neighbours "
                f"answered, threshold is {need}; too many devices dropped out"
            )
        return shamir_combine(points[:need])

    def unmask(self, messages: Mapping[int, bytes]) -> np.ndarray:
        """Unmasking shares in; the float64 sum of the surviving devices' vectors out.

        Raises:
            SecAggError: when some secret has fewer than ``threshold`` shares.
        """
        params = self.params
        shares = {
            u: {v: int.from_bytes(body, "little") for v, body in _unpack(m, SHARE_BYTES).items()}
            for u, m in messages.items()
            if u in self.masked
        }
        total = np.zeros(params.vector_len, dtype=params.dtype)
        for vector in self.masked.values():
            np.add(total, vector, out=total)
        for u in self.masked:
            seed = self._rebuild(u, shares, "self-mask seed").to_bytes(32, "little")
            np.subtract(total, expand(seed, params), out=total)
        for v in sorted(set(self.shared) - set(self.masked)):
            secret = self._rebuild(v, shares, "mask key").to_bytes(32, "little")
            private = X25519PrivateKey.from_private_bytes(secret)
            for u in sorted(u for u in self.masked if v in self.shared[u]):
                seed = _agree(private, self.keys[u][32:], b"coevo-secagg-mask")
                mask = np.zeros(params.vector_len, dtype=params.dtype)
                _add_pair_mask(mask, u, v, seed, params)
                np.subtract(total, mask, out=total)
        return decode_fixed(total, params)


@dataclass(frozen=True)
class SecAggCost:
    """One device's traffic in one round of SecAgg+, when every neighbour takes part."""

    bytes_up: int
    bytes_down: int
    round_trips: int


def secagg_cost(num_devices: int, degree: int, vector_len: int, ring_bits: int = 32) -> SecAggCost:
    """Exact bytes per device and round trips of SecAgg+ with ``degree`` neighbours.

    Equal to the lengths of the messages ``SecAggClient`` and ``SecAggServer`` exchange when no
    device drops out; an upper bound otherwise (a dropped neighbour sends and receives less).
    """
    if not 1 <= degree <= num_devices - 1:
        raise ValueError(f"degree must be in 1..num_devices-1={num_devices - 1}, got {degree}")
    vector = vector_len * ring_bits // 8
    up = (
        PUBLIC_BYTES
        + degree * (ID_BYTES + CIPHER_BYTES)
        + vector
        + degree * (ID_BYTES + SHARE_BYTES)
    )
    down = (
        degree * (ID_BYTES + PUBLIC_BYTES) + degree * (ID_BYTES + CIPHER_BYTES) + (degree + 7) // 8
    )
    return SecAggCost(bytes_up=up, bytes_down=down, round_trips=ROUND_TRIPS)


@dataclass(frozen=True)
class FixedPoint(Codec):
    """The numerical effect of secure aggregation: values clamped and rounded to ``2^-f``.

    Each floating tensor ``w`` is sent as ``w::fixed`` (int32 for a 32-bit ring, else int64):
    ``round(clamp(x, ±clip_range) · 2^scale_bits)``. Summing these integers is exactly what the
    secure sum computes, so a simulator that chains ``FixedPoint`` into the uplink sees the same
    aggregate as the real protocol; ``secagg_cost`` gives the traffic.

    Bound, per element: ``2^-(f+1)`` plus ``max(0, |x| - clip_range)`` plus one float32 rounding.

    Args:
        clip_range: the largest magnitude represented.
        scale_bits: fractional bits f.
        ring_bits: 32 or 64.
    """

    clip_range: float = 1.0
    scale_bits: int = 16
    ring_bits: int = 32

    name: ClassVar[str] = "fixed_point"

    def __post_init__(self) -> None:
        if self.ring_bits not in (32, 64):
            raise ValueError(f"FixedPoint.ring_bits must be 32 or 64, got {self.ring_bits}")
        if not 0 < self.clip_range * 2.0**self.scale_bits < 2.0 ** (self.ring_bits - 1):
            raise ValueError(
                f"FixedPoint: clip_range·2^scale_bits must be in (0, 2^{self.ring_bits - 1})"
            )

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int32 if self.ring_bits == 32 else torch.int64

    def encode(
        self, tensors: Mapping[str, Tensor], state: Mapping[str, Tensor]
    ) -> tuple[Tensors, Tensors]:
        wire: Tensors = {}
        for name, t in tensors.items():
            if not t.is_floating_point():
                wire[name] = t
                continue
            scaled = t.double().clamp(-self.clip_range, self.clip_range) * 2.0**self.scale_bits
            wire[f"{name}::fixed"] = torch.round(scaled).to(self.code_dtype)
        return wire, {}

    def decode(self, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> Tensors:
        return {
            name: (wire[f"{name}::fixed"].double() / 2.0**self.scale_bits).to(like.dtype)
            if like.is_floating_point()
            else wire[name]
            for name, like in template.items()
        }

    def bound(self, tensors: Mapping[str, Tensor]) -> Tensors:
        bounds: Tensors = {}
        for name, t in tensors.items():
            if not t.is_floating_point():
                bounds[name] = torch.zeros(t.shape)
                continue
            magnitude = t.abs().double()
            excess = (magnitude - self.clip_range).clamp(min=0)
            rounding = magnitude.clamp(max=self.clip_range) * torch.finfo(t.dtype).eps
            bounds[name] = 2.0 ** -(self.scale_bits + 1) + excess + rounding
        return bounds
