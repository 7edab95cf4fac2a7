"""User-level differential privacy: DP-FedAvg around any strategy, and its (ε, δ) accounting.

Clipping and noise themselves are codecs (``coevo.codecs.ClipNorm``, ``GaussianNoise``), so
they also chain with quantisation on a device's uplink (local DP).
"""

from coevo.privacy.accountant import PrivacyAccountant, calibrate_noise, rdp_epsilon
from coevo.privacy.callback import PrivacyReport, with_epsilon
from coevo.privacy.dp_fedavg import DPFedAvg, DPFedAvgConfig

__all__ = [
    "DPFedAvg",
    "DPFedAvgConfig",
    "PrivacyAccountant",
    "PrivacyReport",
    "calibrate_noise",
    "rdp_epsilon",
    "with_epsilon",
]
