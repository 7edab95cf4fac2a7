"""Central oracle: the cloud model trained on cloud- AND device-period data.

A privacy-free upper bound, not a deployable method: it assumes every device uploaded its raw
private data. Device and wire as cloud-only.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from coevo.strategies.cloud_only import CentralTraining, CloudOnly
from coevo.tasks.protocol import Period


class CentralOracleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["central_oracle"] = "central_oracle"
    train: CentralTraining = CentralTraining()


class CentralOracle(CloudOnly):
    name = "central_oracle"
    note = "privacy-free upper bound"
    Config: ClassVar[type[BaseModel]] = CentralOracleConfig
    train_period: ClassVar[Period] = "cloud+device"
