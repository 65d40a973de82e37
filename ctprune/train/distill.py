"""Knowledge distillation from the dense model (Hinton et al.): KL between temperature-softened outputs,
plus cross-entropy on labels when there are any.

Models exported with a final Softmax output probabilities, not logits; log(p) is a valid logit vector for them
(softmax(log p) = p), so such outputs are turned into log-probabilities first. Outputs with more than two dims
(N, C, ...) are treated as a class distribution over dim 1 at every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["looks_like_probabilities", "as_logits", "distillation_loss", "combined_loss"]

_EPS = 1e-12


def looks_like_probabilities(output: torch.Tensor, atol: float = 1e-3) -> bool:
    """True when every slice over dim 1 is non-negative and sums to 1 (the model ends in a Softmax)."""
    if output.ndim < 2 or not output.is_floating_point():
        return False
    out = output.detach().float()
    return bool((out >= 0).all() and (out <= 1 + atol).all() and torch.allclose(out.sum(1), torch.ones(()), atol=atol))


def as_logits(output: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """(N, C, positions) logits from a model output, taking log of probabilities when the model outputs them."""
    out = output.float()
    if probabilities:
        out = torch.log(out.clamp_min(_EPS))
    return out.reshape(out.shape[0], out.shape[1], -1) if out.ndim > 2 else out


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over samples (and positions).

    The T² keeps its gradient on the same scale as cross-entropy's (Hinton et al., 2015).
    """
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=1)
    log_p_teacher = F.log_softmax(teacher / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)  # per sample (and position)
    return kl.mean() * (t * t)


def combined_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                  temperature: float, alpha: float) -> torch.Tensor:
    """alpha · distillation + (1 - alpha) · cross-entropy; either part alone when the other is missing.

    `student` and `teacher` are logits as returned by `as_logits`.
    """
    if teacher is None and labels is None:
        raise ValueError("combined_loss needs a teacher output, labels, or both")
    if teacher is None:
        return F.cross_entropy(student, labels)
    kd = distillation_loss(student, teacher, temperature)
    if labels is None or student.ndim != 2:
        return kd
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(student, labels)
