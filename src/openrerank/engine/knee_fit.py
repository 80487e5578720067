"""The attention knee as the machine shows it: fitted from the batches a model scores.

Admission weighs a token of an L-token sequence as 1 + L/knee tokens of a short one (`rates.work_of`), with
the knee from the model's FLOPs (`families/cost.py`). Engines do not run attention at the speed of their
matrix products: OpenVINO's 2,048-token batches took 1.5x what the FLOP knee (2,304) planned for a MiniLM-shaped
encoder on a Zen 3 (an effective knee near 1,000), so admission still promised long passages more speed than
they got. A batch's time is a x sum(L) + b x sum(L^2) (`work_of` with knee = a/b); per token,

    seconds / sum(L) = a + b x m,   m = sum(L^2) / sum(L) (the token-weighted mean length),

a line in m. `KneeFit` fits that line over the recent big batches (exponentially weighted, so it follows the
machine) and offers a/b once the batches' lengths vary enough that the slope is known to a third: traffic of
one length says nothing about the knee, and the FLOP knee stands. The fit stays within `KNEE_RANGE` of the
FLOP knee: timing noise does not move it further than engines differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Batches at least this share of --max-batch-tokens are fitted (in smaller ones the per-batch overhead blurs
#: the time a token's length costs).
FIT_BATCH_SHARE = 0.25
#: Weight of the previous batches after each new one (memory of about 1 / (1 - decay) batches).
DECAY = 0.98
#: Batches (effective, after the decay) before a fit is offered.
MIN_BATCHES = 8.0
#: The slope's standard error may be at most this share of the slope.
MAX_SLOPE_ERROR = 1 / 3
#: The fitted knee stays within [FLOP knee / k, FLOP knee x k].
KNEE_RANGE = 4.0


class KneeFit:
    """Least squares of seconds per token on the token-weighted mean length, exponentially weighted."""

    def __init__(self, prior: float) -> None:
        self.prior = prior
        self._w = self._w2 = self._m = self._mm = self._y = self._my = self._yy = 0.0

    def add(self, lengths: Sequence[int], seconds: float) -> None:
        """One batch: its sequences' lengths and the time the model took on it."""
        tokens = sum(lengths)
        if tokens <= 0 or seconds <= 0:
            return
        m = sum(n * n for n in lengths) / tokens
        y = seconds / tokens
        d = DECAY
        self._w, self._w2 = d * self._w + 1, d * d * self._w2 + 1
        self._m, self._mm = d * self._m + m, d * self._mm + m * m
        self._y, self._my, self._yy = d * self._y + y, d * self._my + m * y, d * self._yy + y * y

    @property
    def batches(self) -> float:
        """The effective number of batches behind the fit (Kish's, for the decayed weights)."""
        return self._w * self._w / self._w2 if self._w2 else 0.0

    def line(self) -> tuple[float, float, float] | None:
        """(a, b, standard error of b) of seconds per token = a + b x m; None while it is not determined."""
        n = self.batches
        if n < MIN_BATCHES:
            return None
        mean_m, mean_y = self._m / self._w, self._y / self._w
        var_m = self._mm / self._w - mean_m * mean_m
        if var_m <= (0.01 * mean_m) ** 2:  # lengths this alike (or rounding) say nothing of the slope
            return None
        b = (self._my / self._w - mean_m * mean_y) / var_m
        a = mean_y - b * mean_m
        residual = max(0.0, self._yy / self._w - mean_y * mean_y - b * b * var_m) * n / (n - 2)
        return a, b, math.sqrt(residual / (n * var_m))

    @property
    def knee(self) -> float | None:
        """The fitted knee, or None while the batches do not determine it."""
        fit = self.line()
        if fit is None:
            return None
        a, b, error = fit
        if a <= 0 or b <= 0 or error > MAX_SLOPE_ERROR * b:
            return None
        return min(self.prior * KNEE_RANGE, max(self.prior / KNEE_RANGE, a / b))
