"""Tests for adaptive per-link timeouts: RFC 6298 arithmetic, per-MiB samples, clamping."""

from __future__ import annotations

import threading

import pytest

from multicloud.core.config import TimeoutConfig
from multicloud.pipeline.timeouts import MIB, AdaptiveTimeouts

LINK = "aws/us-east-1->gcp/us-central1"


def wide() -> AdaptiveTimeouts:
    """Estimators whose clamp never gets in the way of the arithmetic."""
    return AdaptiveTimeouts(TimeoutConfig(min_s=0.001, max_s=10_000))


def test_before_any_sample_the_initial_rto_applies() -> None:
    t = wide()
    assert t.timeout(LINK, MIB) == pytest.approx(1.0)
    assert t.timeout(LINK, 10 * MIB) == pytest.approx(10.0)
    # Under 1 MiB counts as 1 MiB.
    assert t.timeout(LINK, 1) == pytest.approx(1.0)
    assert t.timeout(LINK, 0) == pytest.approx(1.0)


def test_rfc6298_arithmetic_against_hand_computed_numbers() -> None:
    t = wide()  # alpha 1/8, beta 1/4, k 4
    # First sample R=2.0 s/MiB: SRTT=R, RTTVAR=R/2, RTO=SRTT+4*RTTVAR = 2 + 4 = 6.
    t.observe(LINK, 2.0, MIB)
    snap = t.snapshot()[LINK]
    assert snap["srtt_s_per_mib"] == pytest.approx(2.0)
    assert snap["rttvar_s_per_mib"] == pytest.approx(1.0)
    assert snap["rto_s_per_mib"] == pytest.approx(6.0)
    assert t.timeout(LINK, MIB) == pytest.approx(6.0)

    # 4 s for 2 MiB is R=2.0 again: RTTVAR = 3/4*1 + 1/4*|2-2| = 0.75; SRTT = 2; RTO = 5.
    t.observe(LINK, 4.0, 2 * MIB)
    snap = t.snapshot()[LINK]
    assert snap["srtt_s_per_mib"] == pytest.approx(2.0)
    assert snap["rttvar_s_per_mib"] == pytest.approx(0.75)
    assert snap["rto_s_per_mib"] == pytest.approx(5.0)

    # 1 s for 512 KiB counts as 1 MiB, R=1.0: RTTVAR = 0.5625 + 0.25 = 0.8125 (with the old
    # SRTT), SRTT = 0.875*2 + 0.125*1 = 1.875, RTO = 1.875 + 3.25 = 5.125.
    t.observe(LINK, 1.0, 512 * 1024)
    snap = t.snapshot()[LINK]
    assert snap["srtt_s_per_mib"] == pytest.approx(1.875)
    assert snap["rttvar_s_per_mib"] == pytest.approx(0.8125)
    assert snap["rto_s_per_mib"] == pytest.approx(5.125)
    assert snap["samples"] == 3
    assert t.timeout(LINK, 4 * MIB) == pytest.approx(4 * 5.125)


def test_custom_gains_are_used() -> None:
    t = AdaptiveTimeouts(TimeoutConfig(min_s=0.001, max_s=1000, alpha=0.5, beta=0.5, k=2))
    t.observe(LINK, 4.0, MIB)  # SRTT 4, RTTVAR 2, RTO 8
    t.observe(LINK, 2.0, MIB)  # RTTVAR 0.5*2 + 0.5*2 = 2, SRTT 3, RTO 3 + 4 = 7
    snap = t.snapshot()[LINK]
    assert (snap["srtt_s_per_mib"], snap["rttvar_s_per_mib"], snap["rto_s_per_mib"]) == \
        pytest.approx((3.0, 2.0, 7.0))


def test_samples_are_normalised_per_mib() -> None:
    small, big = wide(), wide()
    small.observe(LINK, 0.5, 8 * MIB)
    big.observe(LINK, 5.0, 80 * MIB)
    assert small.snapshot() == big.snapshot()
    # One estimator serves every size: the timeout scales with the bytes to move.
    assert small.timeout(LINK, 80 * MIB) == pytest.approx(10 * small.timeout(LINK, 8 * MIB))


def test_timeouts_are_clamped_to_min_and_max() -> None:
    t = AdaptiveTimeouts(TimeoutConfig())  # min 5 s, max 120 s
    assert t.timeout(LINK, MIB) == 5.0  # initial 1 s/MiB, raised to min_s
    t.observe(LINK, 0.01, MIB)
    assert t.timeout(LINK, 100 * MIB) == 5.0
    t.observe("slow", 10.0, MIB)  # RTO 30 s/MiB
    assert t.timeout("slow", MIB) == pytest.approx(30.0)
    assert t.timeout("slow", 100 * MIB) == 120.0


def test_backoff_doubles_and_is_bounded() -> None:
    t = wide()
    t.backoff(LINK)
    assert t.timeout(LINK, MIB) == pytest.approx(2.0)
    t.backoff(LINK)
    assert t.timeout(LINK, MIB) == pytest.approx(4.0)
    bounded = AdaptiveTimeouts(TimeoutConfig(min_s=0.001, max_s=3.0))
    for _ in range(5):
        bounded.backoff(LINK)
    assert bounded.snapshot()[LINK]["rto_s_per_mib"] == 3.0


def test_backoff_gives_no_sample_and_next_sample_recomputes() -> None:
    t = wide()
    t.observe(LINK, 2.0, MIB)  # RTO 6
    t.backoff(LINK)
    snap = t.snapshot()[LINK]
    assert snap["rto_s_per_mib"] == pytest.approx(12.0)
    assert snap["samples"] == 1  # Karn: the timed-out try is not measured
    assert snap["srtt_s_per_mib"] == pytest.approx(2.0)
    t.observe(LINK, 2.0, MIB)  # RTTVAR 0.75, SRTT 2, RTO 5: back from the back-off
    assert t.snapshot()[LINK]["rto_s_per_mib"] == pytest.approx(5.0)


def test_slow_link_gets_a_longer_timeout_than_a_fast_one() -> None:
    t = AdaptiveTimeouts()
    for elapsed in (0.010, 0.012, 0.011, 0.009):
        t.observe("aws/us-east-1->aws/us-east-1", elapsed * 10, 10 * MIB)
    for elapsed in (0.40, 0.50, 0.45, 0.55):
        t.observe(LINK, elapsed * 10, 10 * MIB)
    assert t.timeout(LINK, 100 * MIB) > t.timeout("aws/us-east-1->aws/us-east-1", 100 * MIB)
    snap = t.snapshot()
    assert snap[LINK]["rto_s_per_mib"] > snap["aws/us-east-1->aws/us-east-1"]["rto_s_per_mib"]


def test_links_are_independent() -> None:
    t = wide()
    t.observe("a", 3.0, MIB)
    t.backoff("b")
    assert t.snapshot()["a"]["rto_s_per_mib"] == pytest.approx(9.0)
    assert t.snapshot()["b"]["rto_s_per_mib"] == pytest.approx(2.0)


def test_snapshot_contents() -> None:
    t = wide()
    assert t.snapshot() == {}
    t.observe("b-link", 2.0, MIB)
    t.backoff("a-link")
    snap = t.snapshot()
    assert list(snap) == ["a-link", "b-link"]  # sorted
    assert snap["b-link"] == {"srtt_s_per_mib": 2.0, "rttvar_s_per_mib": 1.0,
                              "rto_s_per_mib": 6.0, "samples": 1.0}
    # A link never measured reports srtt 0.0 and no samples.
    assert snap["a-link"] == {"srtt_s_per_mib": 0.0, "rttvar_s_per_mib": 0.0,
                              "rto_s_per_mib": 2.0, "samples": 0.0}
    # a copy: later samples do not change it
    t.observe("b-link", 1.0, MIB)
    assert snap["b-link"]["samples"] == 1.0


def test_default_config_is_used_when_none_given() -> None:
    assert AdaptiveTimeouts().config == TimeoutConfig()


def test_concurrent_observations_are_all_counted() -> None:
    t = wide()

    def feed() -> None:
        for _ in range(500):
            t.observe(LINK, 1.0, MIB)

    threads = [threading.Thread(target=feed) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = t.snapshot()[LINK]
    assert snap["samples"] == 4000
    assert snap["srtt_s_per_mib"] == pytest.approx(1.0)
