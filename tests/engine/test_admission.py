"""Admission's arithmetic: work, and a rate timed on some shapes as work per second."""

from __future__ import annotations

import pytest

from openrerank.engine.admission import finish_estimate, work_of, work_rate


def test_work_counts_each_token_of_an_l_token_sequence_one_plus_l_over_the_knee():
    assert work_of([100, 300], 100.0) == pytest.approx(100 * 2 + 300 * 4)
    assert work_of([100, 300], None) == 400  # the shape unknown: tokens


def test_a_rate_timed_on_two_shapes_becomes_work_per_second():
    # the engine choice's shapes: 8 x 128 and 4 x 256 tokens, at 1,000 tokens/s over the two
    knee = 6 * 384
    rate = work_rate(1000.0, ((8, 128), (4, 256)), knee)
    assert rate == pytest.approx(1000 * (1024 * (1 + 128 / knee) + 1024 * (1 + 256 / knee)) / 2048)
    assert work_rate(1000.0, ((8, 128), (4, 256)), None) == 1000.0
    # so a request of 512-token pairs is expected to take (1 + 512/knee) / (1 + 192/knee) of what its tokens
    # at the timed rate would say: 1.13x for MiniLM
    seconds = finish_estimate(work_of([512] * 10, knee), 0, 0, rate)
    assert seconds / (5120 / 1000) == pytest.approx((1 + 512 / knee) / (1 + 192 / knee))
