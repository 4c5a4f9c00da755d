"""Step 3 of BAERASE: erase the backdoor by unlearning the recovered triggers, under a guard.

Per batch (x, y) of clean data and fresh triggers x' drawn from each flagged class t:
    L = alpha_u * [CE(f(x), y) + KL(f_0(x) || f(x)) + w * KL(f_0(x~) || f(x~))] - min(CE(f(x'), t), cap)
        + r * CE(f(x'), y) + lambda * ||theta - theta_0||_1
with cap = log(2K); f_0(x) without a flagged target's share on images of other classes where the
backdoor has leaked into the original's clean answers (``leak_ratio``); x~ mixed, moved copies of the
clean images when the clean set is scarce, else (w = 0 otherwise) when every recovered trigger works
anywhere, of the other classes' images only, f_0(x~) without the flagged classes' share (w:
``copy_weight``); x' also over x + u_t, a universal perturbation per target (``universal_eps`` > 0);
clean images of the flagged classes in every batch. The parts:
:class:`TriggeredBatches` builds the inputs, :class:`UnlearnLoss` returns the terms, :class:`Guard` keeps
the best checkpoint within the allowed accuracy loss and stops once fresh recovered triggers no longer
work, and :func:`unlearn` runs the loop.
"""

# The private helpers stay importable here for the tests that exercise them.
from .batch import TriggeredBatch, TriggeredBatches
from .batch import _position_bound as _position_bound
from .batch import _toward_targets as _toward_targets
from .guard import Guard, allowed_drop, clean_accuracy
from .loop import UnlearnOutcome, unlearn
from .loss import LossTerms, UnlearnLoss
from .loss import _mixed_copies as _mixed_copies

__all__ = [
    "Guard",
    "LossTerms",
    "TriggeredBatch",
    "TriggeredBatches",
    "UnlearnLoss",
    "UnlearnOutcome",
    "allowed_drop",
    "clean_accuracy",
    "unlearn",
]
