//! Throttled log lines for events a guest can provoke at will (malformed requests, bad queue
//! setups): the first few occurrences are logged, then every thousandth, each with its count,
//! so a hostile guest cannot flood the log. [`warn_limited!`](crate::warn_limited) is the way
//! to use it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Occurrences logged before thinning out.
const FIRST: u64 = 10;
/// After that, one occurrence in this many is logged.
const EVERY: u64 = 1000;

/// A per-call-site occurrence counter (see [`warn_limited!`](crate::warn_limited)).
#[derive(Debug)]
pub struct LogLimit {
    count: AtomicU64,
}

impl LogLimit {
    /// A counter at zero.
    pub const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; returns its number when it should be logged.
    pub fn allow(&self) -> Option<u64> {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= FIRST || n.is_multiple_of(EVERY)).then_some(n)
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::warn!` for guest-provoked events, throttled per call site (see [`throttle`](crate::throttle)).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::throttle::LogLimit = $crate::throttle::LogLimit::new();
        if let Some(n) = LIMIT.allow() {
            $crate::__log::warn!("{} (occurrence {n})", format_args!($($arg)*));
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_ten_then_every_thousandth() {
        let l = LogLimit::new();
        let allowed: Vec<u64> = (0..3000).filter_map(|_| l.allow()).collect();
        let mut want: Vec<u64> = (1..=10).collect();
        want.extend([1000, 2000, 3000]);
        assert_eq!(allowed, want);
    }
}
