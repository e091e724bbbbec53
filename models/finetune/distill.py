"""Knowledge distillation (Hinton, Vinyals & Dean 2015) and teacher-free KD (Yuan, Tay, Li, Wang &
Feng, "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020).

Notation: student logits ``z`` (N, K), teacher logits ``z_t``, temperature τ, ``p^τ = softmax(z/τ)``,
``CE(z, y) = −log softmax(z)_y``, ``u`` the uniform distribution ``1/K``, and
``LS_ε(z, y) = (1 − ε)·CE(z, y) + ε·H(u, softmax(z))`` torch's label smoothing (see
:mod:`models.finetune.classification`). All losses are batch means.

**KD** (:func:`kd_loss`)::

    KD_{α,τ}(z, z_t, y) = (1 − α)·CE(z, y) + α·τ²·KL(p_t^τ ‖ p^τ)

τ² keeps the soft term's gradient on the scale of the hard one as τ grows (Hinton et al. §2). The
teacher's logits are constants (detached). ``y`` may be class indices or soft rows (mixup).

**Tf-KD-self** is the same loss with a previously trained copy of the student as the teacher
(Yuan et al.): load it and pass it through :func:`freeze_teacher`; :class:`TeacherLogitCache`
stores a teacher's logits per sample so a fixed input is not run through it every epoch.

**Tf-KD-reg** (:func:`tfkd_reg_loss`) distils from Yuan et al.'s hand-designed virtual teacher
``p^d(k) = a`` for the true class and ``(1 − a)/(K − 1)`` for every other class, softened at
temperature τ, in place of a real teacher: ``(1 − α)·CE + α·KL(p^d_τ ‖ p_τ)``. We give the virtual
teacher the logits ``log p^d`` (:func:`virtual_teacher_logits`), so softening is the usual
``softmax(log p^d / τ) ∝ (p^d)^{1/τ}`` (τ = 1 is ``p^d`` itself), and keep Hinton's τ² on the soft
term as in :func:`kd_loss` (1 at τ = 1; otherwise it only rescales α). The authors' released code
(``loss_kd_regularization`` in yuanli2333/Teacher-free-Knowledge-Distillation) differs: it
softens the probabilities as if they were logits, ``softmax(p^d / τ)``, leaves the student
unsoftened, averages the KL over all N·K elements and scales it by a separate ``multiplier``.

**Identity 1 — KD with a uniform teacher is label smoothing.** A teacher with equal logits gives
``p_t^τ = u`` at every τ, and ``KL(u ‖ q) = H(u, q) − log K``, so::

    KD_{α,τ}(z, const, y) = (1 − α)·CE(z, y) + α·τ²·[H(u, softmax(z/τ)) − log K].

At τ = 1 this is ``(1 − α)·CE + α·H(u, p) − α·log K = LS_{ε=α}(z, y) − α·log K``: the same
gradients as label smoothing with **ε = α** (the loss differs by the constant ``α·log K``). For
τ ≠ 1 no ε matches: the soft term's gradient is ``α·τ·(softmax(z/τ) − u)`` against LS's
``ε·(softmax(z) − u)``; as τ → ∞ the soft term tends to ``(α/2)·Var_k(z_k)`` (a penalty on the
spread of the logits, from ``logsumexp(z/τ) = log K + mean(z)/τ + Var(z)/(2τ²) + O(τ⁻³)``).

**Identity 2 — Tf-KD-reg at τ = 1 is label smoothing.** At τ = 1 the virtual teacher *is* the
label-smoothed target ``q_ε`` with ``ε = K(1 − a)/(K − 1)`` (``a = 1 − ε(K − 1)/K``), and
``KL(q_ε ‖ p) = LS_ε(z, y) − H(q_ε)``. Since LS is linear in ε::

    TfKDreg_{α,τ=1,a}(z, y) = (1 − α)·CE + α·LS_ε − α·H(q_ε) = LS_{α·ε}(z, y) − α·H(q_ε).

Limits: α = 1 gives ``LS_ε`` (up to the constant); ``a = 1/K`` (uniform virtual teacher, ε = 1)
gives ``LS_α``, identity 1; ``a = 1`` (one-hot teacher, ε = 0) gives plain cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits (autocast); float32/float64 unchanged (gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"KD alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"KD temperature must be > 0, got {temperature}")


def soft_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(softmax(z_t/τ) ‖ softmax(z/τ))`` summed over classes, mean over the batch; the
    teacher side is detached. Teacher probabilities of exactly 0 (logit −inf) contribute 0."""
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student and teacher logits must both be (N, K); got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    p_t = F.softmax(_upcast(teacher_logits.detach()) / temperature, dim=1)
    log_p = F.log_softmax(_upcast(student_logits) / temperature, dim=1)
    return F.kl_div(log_p, p_t, reduction="batchmean")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Hinton KD: ``(1 − α)·CE(z, y) + α·τ²·KL(p_t^τ ‖ p^τ)`` (batch means). ``target`` is (N,)
    class indices or (N, K) soft targets; ``teacher_logits`` is detached."""
    _check(alpha, temperature)
    ce = F.cross_entropy(_upcast(student_logits), target)
    kl = soft_kl(student_logits, teacher_logits, temperature)
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


class KDLoss(nn.Module):
    """:func:`kd_loss` with fixed α and τ: ``forward(student_logits, teacher_logits, target)``.
    Used for KD from any teacher and for Tf-KD-self (the teacher is a trained student)."""

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0) -> None:
        super().__init__()
        _check(alpha, temperature)
        self.alpha = alpha
        self.temperature = temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, target, alpha=self.alpha, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}"


def virtual_teacher_logits(
    target: torch.Tensor, n_classes: int, correct_prob: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Logits ``log p^d`` (N, K) of Yuan et al.'s virtual teacher: ``p^d = a`` on the true class,
    ``(1 − a)/(K − 1)`` elsewhere (``a = correct_prob``; ``a = 1`` gives −inf off the true class)."""
    if n_classes < 2:
        raise ValueError(f"a virtual teacher needs n_classes >= 2, got {n_classes}")
    if not 0.0 < correct_prob <= 1.0:
        raise ValueError(f"correct_prob (a) must be in (0, 1], got {correct_prob}")
    if target.ndim != 1 or target.dtype.is_floating_point:
        raise ValueError("Tf-KD-reg needs class indices (N,) as targets, not soft targets")
    off = (1.0 - correct_prob) / (n_classes - 1)
    log_off = math.log(off) if off > 0 else float("-inf")
    logits = torch.full((target.shape[0], n_classes), log_off, dtype=dtype, device=target.device)
    return logits.scatter_(1, target[:, None], math.log(correct_prob))


def tfkd_reg_loss(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    correct_prob: float,
) -> torch.Tensor:
    """Tf-KD-reg (Yuan et al. 2020): :func:`kd_loss` against :func:`virtual_teacher_logits`."""
    k = student_logits.shape[1]
    teacher = virtual_teacher_logits(target, k, correct_prob, dtype=_upcast(student_logits).dtype)
    return kd_loss(student_logits, teacher, target, alpha=alpha, temperature=temperature)


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put a teacher in eval mode (dropout off, batch-norm statistics fixed) with no gradients;
    returns it. Keep it out of the student's modules so ``student.train()`` does not undo this."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class TeacherLogitCache:
    """Teacher logits per dataset index, computed on first sight and reused afterwards.

    Exact only when the teacher sees the same input for a sample every time (no random
    augmentation on the teacher's view, e.g. it gets the un-augmented tile): with augmented views
    the cache replaces "teacher on this view" by "teacher on the first view it saw". Held on the
    CPU in float32; ``state_dict`` / ``load_state_dict`` let a checkpoint carry it.
    """

    def __init__(self, n_samples: int, n_classes: int) -> None:
        self.logits = torch.zeros(n_samples, n_classes)
        self.filled = torch.zeros(n_samples, dtype=torch.bool)

    def __call__(self, index: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Logits of the samples ``index`` (N,): from the cache when all are there, else from
        ``compute()`` (the teacher's forward on this batch), which are then stored. Returned on
        the device and dtype ``compute`` would give, or the cache's (CPU, float32) on a hit."""
        idx = index.detach().cpu().long()
        if bool(self.filled[idx].all()):
            return self.logits[idx]
        out = compute().detach()
        if out.shape != (idx.shape[0], self.logits.shape[1]):
            raise ValueError(
                f"teacher logits {tuple(out.shape)} do not match ({idx.shape[0]}, {self.logits.shape[1]})"
            )
        self.logits[idx] = out.float().cpu()
        self.filled[idx] = True
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"logits": self.logits.clone(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["logits"].shape != self.logits.shape:
            raise ValueError(f"cached logits {tuple(state['logits'].shape)} != {tuple(self.logits.shape)}")
        self.logits.copy_(state["logits"])
        self.filled.copy_(state["filled"])
