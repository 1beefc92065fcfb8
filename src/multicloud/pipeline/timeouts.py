"""Adaptive per-link timeouts, RFC 6298 style, measured in seconds per MiB.

Each link keeps a smoothed round-trip estimate (SRTT) and its variation (RTTVAR);
RTO = SRTT + k * RTTVAR. Samples are normalised per MiB moved (a transfer of less than
1 MiB counts as 1 MiB, so latency-bound small chunks do not explode the estimate), and
the timeout for a transfer is RTO times its size, clamped to [min_s, max_s]. Cross-cloud
links end up with longer timeouts because they are measured slower, not by a constant.
A timeout doubles the link's RTO (back-off) and, as in Karn's algorithm, the timed-out
attempt gives no sample.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from multicloud.core.config import TimeoutConfig

MIB = 1024 * 1024


@dataclass(slots=True)
class LinkEstimate:
    """One link's estimator state, seconds per MiB."""

    srtt: float | None
    rttvar: float
    rto: float
    samples: int = 0


class AdaptiveTimeouts:
    """Per-link RTO estimators."""

    def __init__(self, config: TimeoutConfig | None = None) -> None:
        self.config = config or TimeoutConfig()
        self._links: dict[str, LinkEstimate] = {}
        self._lock = threading.Lock()

    def timeout(self, link: str, nbytes: int) -> float:
        """Seconds to allow for moving nbytes over link."""
        with self._lock:
            rto = self._estimate(link).rto
        return self._clamp(rto * _mib(nbytes))

    def observe(self, link: str, elapsed_s: float, nbytes: int) -> None:
        """Feed one successful transfer's duration."""
        sample = elapsed_s / _mib(nbytes)
        cfg = self.config
        with self._lock:
            est = self._estimate(link)
            if est.srtt is None:
                est.srtt, est.rttvar = sample, sample / 2
            else:
                est.rttvar = (1 - cfg.beta) * est.rttvar + cfg.beta * abs(est.srtt - sample)
                est.srtt = (1 - cfg.alpha) * est.srtt + cfg.alpha * sample
            est.rto = est.srtt + cfg.k * est.rttvar
            est.samples += 1

    def backoff(self, link: str) -> None:
        """A transfer timed out: double the link's RTO (the per-transfer clamp still applies)."""
        with self._lock:
            est = self._estimate(link)
            # Bound the per-MiB figure too, so a run of timeouts cannot overflow it.
            est.rto = min(est.rto * 2, self.config.max_s)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Current estimates per link, for metrics: srtt, rttvar, rto (s/MiB), samples."""
        with self._lock:
            return {
                name: {"srtt_s_per_mib": est.srtt or 0.0, "rttvar_s_per_mib": est.rttvar,
                       "rto_s_per_mib": est.rto, "samples": float(est.samples)}
                for name, est in sorted(self._links.items())
            }

    def _estimate(self, link: str) -> LinkEstimate:
        est = self._links.get(link)
        if est is None:
            est = self._links[link] = LinkEstimate(srtt=None, rttvar=0.0,
                                                   rto=self.config.initial_s)
        return est

    def _clamp(self, seconds: float) -> float:
        return min(max(seconds, self.config.min_s), self.config.max_s)


def _mib(nbytes: int) -> float:
    return max(nbytes / MIB, 1.0)
