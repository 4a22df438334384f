"""Knowledge distillation: the compressed student learns from the labels and from the original network.

Hinton et al.'s loss ``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(p_teacher^T || p_student^T)``,
where ``p^T`` is the softmax at temperature ``T``; the ``T^2`` keeps the soft term's gradients on the
scale of the hard one's as ``T`` grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tlc.errors import SpecError


@dataclass(frozen=True)
class DistillConfig:
    """Weight `alpha` of the teacher term (0 = labels only, 1 = teacher only) and softmax `temperature`."""

    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SpecError(f"DistillConfig.alpha={self.alpha} must lie in [0, 1], e.g. 0.5")
        if not self.temperature > 0.0:
            raise SpecError(f"DistillConfig.temperature={self.temperature} must be positive, e.g. 4.0")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: DistillConfig,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The distillation loss of a batch (a scalar), computed in float32 whatever the logits' dtype.

    The KL term is summed over classes and averaged over the batch ("batchmean"), as the KL divergence
    is defined; the teacher logits are detached.
    """
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    if student.shape != teacher.shape:
        raise SpecError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in shape; "
            "the teacher must predict the same classes"
        )
    hard = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    t = config.temperature
    soft = F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean", log_target=True
    )
    return (1.0 - config.alpha) * hard + config.alpha * t * t * soft
