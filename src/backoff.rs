//! Exponential backoff, computed in one place: the delay before retry number `attempt` is
//! `min × 2^attempt`, capped at `max`, optionally shortened by a random fraction (jitter) so
//! that many instances restarting together do not retry in lockstep.
//!
//! [`Backoff::base`] and [`Backoff::delay_with`] are pure functions of their arguments (tests
//! pin exact values); [`Backoff::delay`] draws the jitter from a non-cryptographic generator.
//! Jitter only ever shortens a delay, so no delay exceeds `max`.
//!
//! ```
//! use canal_consumer::backoff::Backoff;
//! use std::time::Duration;
//! let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
//! assert_eq!(b.base(0), Duration::from_millis(100));
//! assert_eq!(b.base(3), Duration::from_millis(800));
//! assert_eq!(b.base(4), Duration::from_secs(1)); // capped
//! let j = b.with_jitter(0.2);
//! assert_eq!(j.delay_with(3, 0.5), Duration::from_millis(720)); // 800 × (1 − 0.2 × 0.5)
//! ```

use std::time::Duration;

/// Growth stops doubling after this many attempts (2^16 × min); the cap usually binds long
/// before.
const MAX_DOUBLINGS: u32 = 16;

/// An exponential backoff policy: `min`, `max` and a jitter fraction in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: f64,
}

impl Backoff {
    /// No jitter. A `max` below `min` is taken as `min` (every delay is then `min`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            jitter: 0.0,
        }
    }

    /// Shorten each delay by up to `fraction` of it (clamped to `[0, 1]`; NaN means none).
    pub fn with_jitter(self, fraction: f64) -> Backoff {
        let jitter = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        Backoff { jitter, ..self }
    }

    pub fn min(&self) -> Duration {
        self.min
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay before retry `attempt` (0 for the first), without jitter:
    /// `min × 2^attempt`, at most `max`.
    pub fn base(&self, attempt: u32) -> Duration {
        self.min
            .saturating_mul(1u32 << attempt.min(MAX_DOUBLINGS))
            .min(self.max)
    }

    /// The delay with jitter taken from `unit` in `[0, 1)` (clamped):
    /// `base(attempt) × (1 − jitter × unit)`.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base(attempt);
        if self.jitter == 0.0 {
            return base;
        }
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        base.mul_f64(1.0 - self.jitter * unit)
    }

    /// The delay with random jitter (none if the policy has no jitter).
    pub fn delay(&self, attempt: u32) -> Duration {
        if self.jitter == 0.0 {
            return self.base(attempt);
        }
        self.delay_with(attempt, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_from_min_and_stops_at_max() {
        let b = Backoff::new(ms(50), ms(1000));
        let got: Vec<Duration> = (0..8).map(|a| b.base(a)).collect();
        assert_eq!(
            got,
            [
                ms(50),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000),
                ms(1000)
            ]
        );
        // no jitter configured: delay is the base
        assert_eq!(b.delay(3), ms(400));
        assert_eq!(b.delay_with(3, 0.9), ms(400));
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        let b = Backoff::new(Duration::from_secs(3600), Duration::MAX);
        assert_eq!(b.base(u32::MAX), Duration::from_secs(3600 << MAX_DOUBLINGS));
        let b = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(b.base(40), Duration::MAX);
    }

    #[test]
    fn max_below_min_means_min() {
        let b = Backoff::new(ms(500), ms(100));
        assert_eq!(b.max(), ms(500));
        assert_eq!(b.base(0), ms(500));
        assert_eq!(b.base(5), ms(500));
    }

    #[test]
    fn jitter_only_shortens_and_is_bounded() {
        let b = Backoff::new(ms(100), ms(1000)).with_jitter(0.25);
        assert_eq!(b.delay_with(2, 0.0), ms(400));
        assert_eq!(b.delay_with(2, 1.0), ms(300));
        assert_eq!(b.delay_with(2, 0.5), ms(350));
        // out-of-range inputs are clamped
        assert_eq!(b.delay_with(2, 7.0), ms(300));
        assert_eq!(b.delay_with(2, -1.0), ms(400));
        assert_eq!(b.delay_with(2, f64::NAN), ms(400));
        for attempt in 0..10 {
            for _ in 0..50 {
                let d = b.delay(attempt);
                let base = b.base(attempt);
                assert!(d <= base && d >= base.mul_f64(0.75), "{d:?} vs {base:?}");
            }
        }
    }

    #[test]
    fn jitter_fraction_is_clamped() {
        let b = Backoff::new(ms(100), ms(100));
        assert_eq!(b.with_jitter(3.0).delay_with(0, 1.0), ms(0));
        assert_eq!(b.with_jitter(-1.0).delay_with(0, 1.0), ms(100));
        assert_eq!(b.with_jitter(f64::NAN).delay_with(0, 1.0), ms(100));
    }
}
