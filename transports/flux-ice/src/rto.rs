//! Retransmission timing for connectivity checks, from the round-trip times we measure.
//!
//! RFC 8445 §14.3 and RFC 8489 §6.2.1 both allow the check RTO to follow a measured RTT
//! (RFC 6298) instead of the fixed 500 ms / 250 ms starting points, which are tuned for
//! unknown internet paths. On a 1 ms path a lost check then costs one short retransmission
//! instead of seconds of backoff.
//!
//! Samples come from Binding transactions whose request and response we both saw once:
//! STUN-server queries answered on their first transmission (Karn's rule) and connectivity
//! checks (every `is` retransmission is a new transaction, so a response is never ambiguous).

use std::time::Duration;

/// RFC 6298 smoothed RTT and variance, with the RTO clamped to `[floor, ceiling]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    floor: Duration,
    ceiling: Duration,
}

impl RttEstimator {
    pub(crate) fn new(floor: Duration, ceiling: Duration) -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            floor,
            ceiling: ceiling.max(floor),
        }
    }

    /// Feeds one round-trip sample.
    pub(crate) fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let err = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + err) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// The smoothed RTT, once a sample arrived.
    pub(crate) fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// `srtt + 4·rttvar`, clamped; `None` before the first sample.
    pub(crate) fn rto(&self) -> Option<Duration> {
        let srtt = self.srtt?;
        Some((srtt + self.rttvar * 4).clamp(self.floor, self.ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_sample_no_rto() {
        assert_eq!(RttEstimator::new(50 * MS, 500 * MS).rto(), None);
    }

    #[test]
    fn low_rtt_paths_get_the_floor() {
        let mut e = RttEstimator::new(50 * MS, 500 * MS);
        e.sample(MS);
        assert_eq!(e.rto(), Some(50 * MS));
    }

    #[test]
    fn first_sample_is_three_rtts() {
        let mut e = RttEstimator::new(10 * MS, 5000 * MS);
        e.sample(100 * MS);
        assert_eq!(e.rto(), Some(300 * MS));
    }

    #[test]
    fn long_paths_are_capped() {
        let mut e = RttEstimator::new(50 * MS, 500 * MS);
        e.sample(400 * MS);
        assert_eq!(e.rto(), Some(500 * MS));
    }

    #[test]
    fn steady_samples_converge_towards_the_rtt() {
        let mut e = RttEstimator::new(MS, 5000 * MS);
        for _ in 0..50 {
            e.sample(80 * MS);
        }
        let rto = e.rto().unwrap_or_default();
        assert!(rto >= 80 * MS && rto < 90 * MS, "{rto:?}");
        assert_eq!(e.srtt(), Some(80 * MS));
    }
}
