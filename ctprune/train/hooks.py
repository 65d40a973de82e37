"""The points where pruning plugs into the training loop.

`fine_tune` calls, in this order:

    begin(total_steps, steps_per_epoch)          once, before the first step; on a resume load_state_dict(d)
                                                 comes first, then begin (so begin must not reset restored state)
    for every step (numbered 0 .. total_steps-1 across epochs):
        extra_loss(step)  -> Tensor | None       added to the distillation loss before backward (e.g. group lasso)
        after_backward(step)                     gradients are ready (all-reduced under DDP): accumulate importance
        after_step(step)                         the optimizer has stepped: re-apply hard masks
    end_epoch(epoch)                             after each epoch's last step (epoch numbered from 0)

`state_dict()` / `load_state_dict(d)` are saved in and restored from every checkpoint, so a resumed run continues
with the same masks and schedule. Under torchrun every rank calls the hooks with the same, all-reduced gradients;
state derived from anything else can be made identical with ctprune.train.distributed.broadcast_tensors.
The base class does nothing; subclasses override what they need.
"""

from __future__ import annotations

__all__ = ["TrainHooks"]


class TrainHooks:
    """No-op hooks: the plain fine-tune."""

    def begin(self, total_steps: int, steps_per_epoch: int) -> None:
        pass

    def extra_loss(self, step: int):
        return None

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def end_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
