"""The attention knee fitted from served batches (engine/knee_fit.py), and admission weighing by it."""

from __future__ import annotations

import random

import pytest

from openrerank.engine.admission import AdmissionQueue, SchedulerConfig
from openrerank.engine.batching import BatchPolicy
from openrerank.engine.knee_fit import KNEE_RANGE, KneeFit
from openrerank.engine.rates import work_of

MAX_TOKENS = 8192
SEC_PER_TOKEN = 1e-4  # of a short sequence


def batches(knee: float, widths=(128, 256, 512, 1024, 2048), rounds: int = 4, noise: float = 0.03, seed: int = 0):
    """(lengths, seconds) of MAX_TOKENS-token batches on a machine whose true knee is `knee`, timing noise
    of +-`noise`, widths interleaved round by round as a server sees mixed traffic."""
    rng = random.Random(seed)
    out = []
    for _ in range(rounds):
        for w in widths:
            lengths = [w] * (MAX_TOKENS // w)
            out.append((lengths, SEC_PER_TOKEN * work_of(lengths, knee) * (1 + rng.uniform(-noise, noise))))
    return out


def fit_of(prior: float, data) -> KneeFit:
    fit = KneeFit(prior)
    for lengths, seconds in data:
        fit.add(lengths, seconds)
    return fit


@pytest.mark.parametrize("true_knee", [1000.0, 2304.0, 5000.0])
def test_batches_of_mixed_lengths_give_the_knee_the_machine_shows(true_knee):
    assert fit_of(2304.0, batches(true_knee)).knee == pytest.approx(true_knee, rel=0.1)


def test_traffic_of_one_length_says_nothing_about_the_knee():
    fit = fit_of(2304.0, batches(1000.0, widths=(512,), rounds=40))
    assert fit.batches > 20 and fit.knee is None


def test_too_few_batches_fit_nothing():
    assert fit_of(2304.0, batches(1000.0, rounds=1)).knee is None  # 5 batches
    assert fit_of(2304.0, batches(1000.0, rounds=2)).knee is not None  # 10


def test_noise_that_hides_the_slope_fits_nothing():
    """Times that do not grow with the length (noise of +-40%) leave the slope unknown: the FLOP knee stands."""
    rng = random.Random(1)
    data = [([w] * (MAX_TOKENS // w), MAX_TOKENS * SEC_PER_TOKEN * rng.uniform(0.6, 1.4))
            for _ in range(6) for w in (128, 256, 512, 1024, 2048)]
    assert fit_of(2304.0, data).knee is None


def test_the_fit_stays_within_range_of_the_flop_knee():
    assert fit_of(2304.0, batches(1e6, noise=0)).knee == pytest.approx(2304.0 * KNEE_RANGE)
    assert fit_of(2304.0, batches(100.0, noise=0)).knee == pytest.approx(2304.0 / KNEE_RANGE)


def admission(knee: float, short_rate: float) -> AdmissionQueue:
    adm = AdmissionQueue(SchedulerConfig(BatchPolicy(max_tokens=MAX_TOKENS)))
    adm.set_knee(knee)
    adm.work_per_second = short_rate
    return adm


def predicted_over_taken(adm: AdmissionQueue, width: int, true_knee: float) -> float:
    lengths = [width] * (MAX_TOKENS // width)
    return work_of(lengths, adm.knee) / adm.work_per_second / (SEC_PER_TOKEN * work_of(lengths, true_knee))


def test_admission_weighs_by_the_knee_the_served_batches_show():
    """An engine whose attention runs slower than its FLOPs say (OpenVINO's: ~1,100 against 2,304): weighed by
    the FLOP knee, 2,048-token batches take far longer than planned; after the served batches, within 10%."""
    adm = admission(2304.0, 1 / SEC_PER_TOKEN)
    assert predicted_over_taken(adm, 2048, true_knee=1000.0) < 0.75
    moved = [adm.record_speed(seconds, lengths) for lengths, seconds in batches(1000.0)]
    assert adm.knee == pytest.approx(1000.0, rel=0.1) and any(moved)
    for width in (128, 512, 2048):
        assert predicted_over_taken(adm, width, true_knee=1000.0) == pytest.approx(1.0, rel=0.1), width
    assert adm.knee_fit.prior == 2304.0


def test_small_batches_and_one_length_leave_the_knee_alone():
    adm = admission(2304.0, 1 / SEC_PER_TOKEN)
    for _ in range(6):  # under a quarter of the batch token limit: mostly overhead, not fitted
        for width in (128, 256, 512, 1024):
            lengths = [width] * (MAX_TOKENS // width // 8)
            assert adm.record_speed(SEC_PER_TOKEN * work_of(lengths, 1000.0), lengths) is None
    for lengths, seconds in batches(1000.0, widths=(256,), rounds=30):
        assert adm.record_speed(seconds, lengths) is None
    assert adm.knee == 2304.0


def test_a_model_without_a_knee_counts_tokens_and_fits_nothing():
    adm = admission(None, 1 / SEC_PER_TOKEN)
    for lengths, seconds in batches(1000.0):
        assert adm.record_speed(seconds, lengths) is None
    assert adm.knee is None and adm.knee_fit is None
