"""Per-token confidence from the model itself.

For token t with log-probability lp_t (the probability the model gave the token it produced):

    p_t = exp(lp_t)
    s_t = mean(p_{t-W+1} .. p_t)              (W = 4: a short window smooths single odd tokens)
    confidence_t = A * s_t + (1 - A) * prior  (A = 0.8; prior = the stage's configured prior)

A backend that gives no log-probabilities gets the stage's prior. The prior says how far a stage
is trusted in general (quick < deep < synthesis); the model's own probabilities say how sure it
is right now, so confidence varies token by token within a stage and stays in [0, 1].
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 4
MODEL_WEIGHT = 0.8


class ConfidenceTracker:
    """Turns one generation's stream of log-probabilities into confidences."""

    def __init__(self, prior: float):
        self.prior = min(1.0, max(0.0, prior))
        self._recent: deque[float] = deque(maxlen=WINDOW)

    def update(self, logprob: float | None) -> float:
        if logprob is None:
            return self.prior
        self._recent.append(min(1.0, math.exp(logprob)))
        smoothed = sum(self._recent) / len(self._recent)
        return MODEL_WEIGHT * smoothed + (1 - MODEL_WEIGHT) * self.prior
