"""Distill: the large cloud model taught to a small device model, which is then shipped.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (NIPS 2014 workshop);
for recommendation, Tang & Wang, "Ranking Distillation", KDD 2018. Cloud: trains the large
model (the teacher) on pooled cloud-period data, then trains the small device model (the
student, of width ``dim``) on the same data with ``alpha * CE(next item) + (1 - alpha) * T^2 *
KL(teacher || student)`` over the whole catalogue at temperature ``T``. Device: downloads the
student; with ``mode`` ``full`` or ``head`` it then fine-tunes it on its device-period rows as
cloud + fine-tune does. Wire: the student down, nothing up. ``dim`` trades device size (see
``model_facts``) against quality.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from coevo.strategies.base import DeviceBatch, Strategy, score_per_device, seeded_model
from coevo.strategies.cloud_only import CentralTraining, validation_hr10
from coevo.strategies.local_training import LocalTraining, personal_finetune
from coevo.tasks.models import CloudModel, DeviceModel
from coevo.tasks.protocol import P1Split
from coevo.tasks.recommendation import RecommendationTask, state_of
from coevo.tasks.train import FitConfig, fit, windows
from coevo.types import CloudState, DeviceState, Metrics, Payload

TEACHER = "teacher/"


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["distill"] = "distill"
    # Student (device model) width, None: the task's; smaller is cheaper on the device and
    # usually worse.
    dim: int | None = Field(None, ge=1, le=4096)
    # Softens both distributions: higher passes more of the teacher's ranking of non-targets.
    temperature: float = Field(2.0, gt=0, le=100.0)
    # Weight of the true next item; 1 - alpha goes to matching the teacher (0: pure KD).
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    # Training of the teacher (the cloud model) on cloud-period data.
    train: CentralTraining = CentralTraining()
    # Distillation of the student on cloud-period data, early-stopped on validation HR@10.
    pretrain: CentralTraining = CentralTraining()
    # After shipping: none keeps the student as is; full or head fine-tune it per device.
    mode: Literal["none", "full", "head"] = "none"
    # Pull of the fine-tuned weights towards the shipped ones; 0 is plain fine-tuning.
    l2: float = Field(0.0, ge=0)
    local: LocalTraining = LocalTraining()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Mean over real positions of ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)``.

    Logits are ``[..., num_items]``; ``target`` is ``[...]`` with the padding item
    ``num_items`` at positions that do not count.
    """
    num_items = student_logits.shape[-1]
    valid = (target < num_items).float()
    hard = F.cross_entropy(
        student_logits.flatten(0, -2), target.clamp(max=num_items - 1).flatten(), reduction="none"
    ).view_as(valid)
    teacher_log = F.log_softmax(teacher_logits / temperature, dim=-1)
    student_log = F.log_softmax(student_logits / temperature, dim=-1)
    soft = (teacher_log.exp() * (teacher_log - student_log)).sum(-1) * temperature**2
    per_position = alpha * hard + (1.0 - alpha) * soft
    return (per_position * valid).sum() / valid.sum().clamp(min=1.0)


def distill_fit(
    student: DeviceModel,
    teacher: CloudModel,
    split: P1Split,
    rows: torch.Tensor,
    config: FitConfig,
    generator: torch.Generator,
    *,
    temperature: float,
    alpha: float,
    validate: Callable[[nn.Module], float] | None = None,
) -> DeviceModel:
    """Train ``student`` towards ``teacher`` (frozen) on the windows of ``rows`` with Adam.

    Keeps the weights of the best validation score (the last epoch's without ``validate``).
    """
    inputs, targets = windows(split, rows, config.window)
    teacher.eval()
    optimizer = torch.optim.Adam(
        student.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    best_score, best_state, stale = -float("inf"), copy.deepcopy(student.state_dict()), 0
    for epoch in range(config.epochs):
        student.train()
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            with torch.no_grad():
                teacher_logits = teacher.sequence_logits(inputs[batch])
            loss = distillation_loss(
                student.sequence_logits(inputs[batch]),
                teacher_logits,
                targets[batch],
                temperature=temperature,
                alpha=alpha,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if validate is None or ((epoch + 1) % config.eval_every and epoch + 1 != config.epochs):
            continue
        student.eval()
        with torch.no_grad():
            score = validate(student)
        if score > best_score:
            best_score, best_state, stale = score, copy.deepcopy(student.state_dict()), 0
        else:
            stale += 1
        if stale >= config.patience:
            break
    if validate is not None:
        student.load_state_dict(best_state)
    student.eval()
    return student


class Distill(Strategy):
    name = "distill"
    Config: ClassVar[type[BaseModel]] = DistillConfig

    def __init__(self, task: RecommendationTask, config: DistillConfig | None = None) -> None:
        config = config or DistillConfig()
        # The student's width is this strategy's own: its task builds the device model so.
        if config.dim is not None:
            shapes = replace(task.shapes, device_dim=config.dim)
            task = RecommendationTask(task.log, task.split, shapes)
        super().__init__(task, config)
        self.model = task.device_model()
        names = [name for name, _ in self.model.named_parameters()]
        self.personal = {
            "none": [],
            "full": names,
            "head": [n for n in names if n.startswith("head.")],
        }[config.mode]

    def model_facts(self) -> dict[str, dict[str, float]]:
        """Parameters and FLOPs per request of the student (``device``) and teacher (``cloud``)."""
        return self.task.model_facts()

    def init(self, rng: torch.Generator) -> CloudState:
        return self.distil(self.train_teacher(rng), rng)

    def train_teacher(self, rng: torch.Generator) -> dict[str, torch.Tensor]:
        """The cloud model's weights, trained on cloud-period data (early-stopped)."""
        task = self.task
        teacher = seeded_model(task.cloud_model, rng)
        fit_config = self.config.train.fit_config(task.shapes.cloud_history)
        fit(
            teacher, task.split, task.rows("cloud"), fit_config, rng, validate=validation_hr10(task)
        )
        return state_of(teacher)

    def distil(
        self, teacher_weights: Mapping[str, torch.Tensor], rng: torch.Generator
    ) -> CloudState:
        """The cloud state: a student distilled from a trained teacher, and the teacher.

        A sweep over student widths trains the teacher once and calls this per width.
        """
        task, config = self.task, self.config
        teacher = task.cloud_model()
        teacher.load_state_dict(dict(teacher_weights))
        student = seeded_model(task.device_model, rng)
        distill_fit(
            student,
            teacher,
            task.split,
            task.rows("cloud"),
            config.pretrain.fit_config(task.shapes.cloud_history),
            rng,
            temperature=config.temperature,
            alpha=config.alpha,
            validate=validation_hr10(task),
        )
        teacher_state = {TEACHER + k: v.detach().clone() for k, v in teacher_weights.items()}
        return CloudState({**state_of(student), **teacher_state})

    def init_devices(self, cloud: CloudState, num_devices: int) -> DeviceState:
        return DeviceState(
            {k: cloud[k].expand(num_devices, *cloud[k].shape).clone() for k in self.personal}
        )

    def downlink(self, cloud: CloudState, round: int) -> Payload:
        return Payload({k: v for k, v in cloud.tensors.items() if not k.startswith(TEACHER)})

    def local(
        self, payload: Payload, device_state: DeviceState, batch: DeviceBatch
    ) -> tuple[Payload, DeviceState, Metrics]:
        if not self.personal:
            return Payload(), DeviceState(), {"loss": torch.zeros(())}
        return personal_finetune(
            self.model,
            dict(payload.tensors),
            self.personal,
            batch,
            self.config.local,
            loss=self.task.batch_loss,
            l2=self.config.l2,
        )

    def score(
        self,
        cloud: CloudState,
        device_state: DeviceState,
        history: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        shared = {
            k: v
            for k, v in cloud.tensors.items()
            if not k.startswith(TEACHER) and k not in device_state
        }
        return score_per_device(self.model, shared, device_state.tensors, history, candidates)
