"""Knowledge distillation as loss functions for the one training loop.

Both losses are `loss_fn(model, batch)` callables handed to `Trainer`; the teacher is frozen
(eval mode, no gradients) and runs on the same inputs as the student.

Convention (Hinton et al. 2015, as the Inheritune paper's baseline uses it):

    loss = alpha * KD + (1 - alpha) * CE
    KD   = tau^2 * mean over tokens of KL( softmax(teacher / tau) || softmax(student / tau) )
    CE   = the student's cross-entropy on the next token

with tau = 1 and alpha = 0.6 by default: 60% of the weight on matching the teacher. The tau^2
factor keeps the gradient scale independent of the temperature (it is 1 at tau = 1).

The DistilBERT-style loss (Sanh et al. 2019) adds a cosine term aligning the student's last
hidden state (the residual stream entering the final norm) with the teacher's:

    loss = alpha * KD + (1 - alpha) * CE + beta * mean over tokens of (1 - cos(h_student, h_teacher))

In eval mode (the loop's validation pass) both losses return the student's plain cross-entropy,
so every run of the comparison reports the same validation metric.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from scion.errors import ScionError
from scion.model import Transformer


def kd_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """tau^2 * KL(teacher || student) at temperature tau, averaged over token positions."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.6,
    temperature: float = 1.0,
) -> torch.Tensor:
    """alpha * KD + (1 - alpha) * CE (see the module docstring)."""
    ce = F.cross_entropy(student_logits.float().flatten(0, -2), targets.reshape(-1))
    return alpha * kd_term(student_logits, teacher_logits, temperature) + (1 - alpha) * ce


def cosine_term(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over token positions of 1 - cos(h_s, h_t)."""
    return (1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


@contextmanager
def capture_final_hidden(model: Transformer):
    """Record the input of the final norm (the last hidden state) during a forward pass."""
    seen: list[torch.Tensor] = []
    handle = model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def _check_pair(student: Transformer, teacher: Transformer, hidden: bool) -> None:
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise ScionError(
            f"the student's vocabulary ({student.cfg.vocab_size}) differs from the teacher's "
            f"({teacher.cfg.vocab_size}); distillation needs the same tokenizer"
        )
    if hidden and student.cfg.d_model != teacher.cfg.d_model:
        raise ScionError(
            f"the hidden-state cosine loss needs the same d_model (student {student.cfg.d_model}, "
            f"teacher {teacher.cfg.d_model})"
        )


def _unwrap(model: torch.nn.Module) -> Transformer:
    while not isinstance(model, Transformer) and hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class DistillLoss:
    """`loss_fn` for logit KD (beta = 0) or DistilBERT-style KD (beta > 0)."""

    def __init__(self, teacher: Transformer, alpha: float = 0.6, temperature: float = 1.0, beta: float = 0.0):
        if not 0 <= alpha <= 1:
            raise ScionError(f"distillation alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ScionError(f"distillation temperature must be positive, got {temperature}")
        if beta < 0:
            raise ScionError(f"the cosine-loss weight must not be negative, got {beta}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature, self.beta = alpha, temperature, beta

    def __call__(self, model: torch.nn.Module, batch) -> torch.Tensor:
        inputs, targets = batch
        if not model.training:
            return model(inputs, targets)
        student = _unwrap(model)
        _check_pair(student, self.teacher, self.beta > 0)
        with torch.no_grad(), capture_final_hidden(self.teacher) as t_hidden:
            teacher_logits = self.teacher(inputs)
        with capture_final_hidden(student) as s_hidden:
            logits = model(inputs)
        loss = kd_loss(logits, teacher_logits, targets, self.alpha, self.temperature)
        if self.beta > 0:
            loss = loss + self.beta * cosine_term(s_hidden[0], t_hidden[0])
        return loss
