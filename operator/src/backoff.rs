//! The one retry schedule the operator uses after failures in a row: a
//! first pause that doubles with each further failure, up to a bound.

use std::time::Duration;

/// The pause after the `n`-th failure in a row (the first for `n` ≤ 1):
/// `first`, doubled `n - 1` times, at most `max`.
pub fn doubling(first: Duration, n: u32, max: Duration) -> Duration {
    // 2^30 times any pause here is far past every bound; the cap only keeps
    // the shift in range.
    first.saturating_mul(1 << n.saturating_sub(1).min(30)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_doubles_the_pause_up_to_the_bound_and_never_overflows() {
        let s = Duration::from_secs;
        let pauses: Vec<u64> = (0..7).map(|n| doubling(s(1), n, s(20)).as_secs()).collect();
        assert_eq!(pauses, [1, 1, 2, 4, 8, 16, 20]);
        assert_eq!(doubling(s(5), u32::MAX, s(600)), s(600));
        assert_eq!(doubling(Duration::MAX, 40, Duration::MAX), Duration::MAX);
    }
}
