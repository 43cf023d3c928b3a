//! Receive-window auto-tuning.
//!
//! A receive window much larger than the path needs lets a fast sender put more datagrams in
//! flight than the receiver's socket buffer holds whenever the receiver is the slower end (a
//! loopback or LAN path, where the "network" is that buffer): the kernel drops them, and loss
//! is the only signal the congestion controller gets. Measured on loopback with a 1 GiB window:
//! 2–3.6 % QUIC loss and chunk latencies of seconds; with 32 MiB: no loss (bench/README.md).
//! Whatever the window lets in flight also waits in line: at 5.7 Gbit/s on loopback, 32 MiB
//! is about 45 ms of queue, and chunk p99 was 51–77 ms; with 8 MiB it was 26–35 ms at the
//! same rate and less CPU (bench/README.md, "third round").
//! A small window, though, caps a long fat path at `window / RTT`.
//!
//! So the window starts at [`WindowTuner::INITIAL`] and grows, never shrinks, to twice the
//! bandwidth-delay product measured at the receiver: the delivery rate times the lowest RTT
//! seen. The lowest RTT, not the smoothed one, so that a queue building in the socket buffer
//! (which inflates the RTT) does not grow the window that feeds it.
//!
//! Sans-IO: the caller passes the time and its counters; nothing here reads a clock.

use std::time::{Duration, Instant};

/// Decides the connection-level receive window of a receiving connection.
#[derive(Clone, Debug)]
pub struct WindowTuner {
    window: u64,
    max: u64,
    min_rtt: Option<Duration>,
    last: Option<(Instant, u64)>,
}

impl WindowTuner {
    /// The window every connection starts with (or the configured maximum, if lower).
    pub const INITIAL: u64 = 8 << 20;
    /// How often the delivery rate is sampled.
    pub const INTERVAL: Duration = Duration::from_millis(100);

    /// A tuner that grows the window up to `max` bytes.
    pub fn new(max: u64) -> Self {
        Self {
            window: Self::INITIAL.min(max),
            max,
            min_rtt: None,
            last: None,
        }
    }

    /// The current window.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// When [`sample`](Self::sample) should next be called.
    pub fn next_sample(&self) -> Option<Instant> {
        self.last.map(|(t, _)| t + Self::INTERVAL)
    }

    /// Feeds the bytes received on the connection so far and its current RTT estimate; returns
    /// a new, larger window when the connection should get one.
    pub fn sample(&mut self, now: Instant, received: u64, rtt: Duration) -> Option<u64> {
        if !rtt.is_zero() {
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        let Some((t0, b0)) = self.last else {
            self.last = Some((now, received));
            return None;
        };
        let dt = now.saturating_duration_since(t0);
        if dt < Self::INTERVAL {
            return None;
        }
        self.last = Some((now, received));
        let rate = received.saturating_sub(b0) as f64 / dt.as_secs_f64();
        let bdp = rate * self.min_rtt?.as_secs_f64();
        let want = ((2.0 * bdp) as u64).min(self.max);
        if want > self.window {
            // Grow by at most doubling per sample: the rate measured under the old window
            // then has time to show whether more helps.
            self.window = want.min(self.window.saturating_mul(2));
            Some(self.window)
        } else {
            None
        }
    }
}

#[cfg(test)]
// Tests need one real instant to count virtual time from.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Feeds `secs` of samples at `rate` bytes/s, with the window capping what arrives when
    /// `window_limited` (rate ≤ window / rtt), and returns the final window.
    fn run(t: &mut WindowTuner, rate: f64, rtt: Duration, secs: u64, window_limited: bool) -> u64 {
        let start = Instant::now();
        let mut received = 0u64;
        let mut now = start;
        for _ in 0..secs * 10 {
            t.sample(now, received, rtt);
            let r = if window_limited {
                rate.min(t.window() as f64 / rtt.as_secs_f64())
            } else {
                rate
            };
            now += WindowTuner::INTERVAL;
            received += (r * WindowTuner::INTERVAL.as_secs_f64()) as u64;
        }
        t.window()
    }

    #[test]
    fn a_short_path_keeps_the_initial_window() {
        // Loopback: 6 Gbit/s at 0.2 ms is a BDP of 150 KB.
        let mut t = WindowTuner::new(1 << 30);
        let w = run(&mut t, 750e6, Duration::from_micros(200), 5, false);
        assert_eq!(w, WindowTuner::INITIAL);
    }

    #[test]
    fn a_long_fat_path_grows_the_window_until_the_rate_is_reached() {
        // 10 Gbit/s at 100 ms: a BDP of 125 MB, which the 8 MiB start would cap at 0.67 Gbit/s.
        let mut t = WindowTuner::new(1 << 30);
        let w = run(&mut t, 1.25e9, Duration::from_millis(100), 10, true);
        assert!(w >= 125_000_000, "window {} MiB", w / MIB);
        assert!(w <= 2 * 125_000_000 + MIB, "window {} MiB", w / MIB);
    }

    #[test]
    fn the_window_never_passes_the_configured_maximum() {
        let mut t = WindowTuner::new(64 * MIB);
        let w = run(&mut t, 1.25e9, Duration::from_millis(100), 10, true);
        assert_eq!(w, 64 * MIB);
        assert_eq!(WindowTuner::new(8 * MIB).window(), 8 * MIB);
    }

    #[test]
    fn queueing_delay_does_not_grow_the_window() {
        // The base RTT is 1 ms; a queue then inflates the smoothed RTT to 50 ms.
        let mut t = WindowTuner::new(1 << 30);
        let start = Instant::now();
        t.sample(start, 0, Duration::from_millis(1));
        let mut received = 0;
        for i in 1..50 {
            received += 60_000_000; // 600 MB/s
            let r = t.sample(
                start + WindowTuner::INTERVAL * i,
                received,
                Duration::from_millis(50),
            );
            assert_eq!(r, None, "sample {i}");
        }
        assert_eq!(t.window(), WindowTuner::INITIAL);
    }
}
