"""What a served model hands dialects: scores JSON can hold, or a clear model fault."""

from __future__ import annotations

import numpy as np
import pytest

from openrerank.engine.errors import ModelOutputError
from openrerank.engine.served import _reportable


def test_infinities_become_the_largest_float32_and_nan_is_a_fault():
    out = _reportable(np.array([1.5, np.inf, -np.inf], dtype=np.float32))
    assert np.isfinite(out).all() and out[0] == 1.5 and out[1] == -out[2] == np.finfo(np.float32).max
    with pytest.raises(ModelOutputError, match="passage 1"):
        _reportable(np.array([0.0, np.nan], dtype=np.float32))
