//! Weighted ordering of an answer set.
//!
//! Every multi-record answer is put in a fresh order per response with
//! Efraimidis–Spirakis weighted sampling without replacement: each record
//! gets the key `E / w` (with `E` exponentially distributed) and records are
//! taken by ascending key. With equal weights this is a uniform shuffle; with
//! registry weights, the record in first place is `w_i / Σw` likely, and so
//! is the chance of a record surviving when a UDP answer must be cut. Clients
//! that take the first address, and clients that only see the records that
//! fit, both follow the weights the operators set.

use std::cell::RefCell;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

thread_local! {
    /// A fast, non-cryptographic generator per thread: answer order needs
    /// spread, not secrecy, and a per-thread state needs no lock on the hot path.
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// Runs `f` with this thread's fast generator.
pub(crate) fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|rng| f(&mut rng.borrow_mut()))
}

/// Writes into `order` the indices `0..weights.len()` in a weighted random
/// order (Efraimidis–Spirakis). A zero weight counts as one: the catalog
/// never stores zero, and a record must stay reachable.
pub(crate) fn weighted_order<R: Rng + ?Sized>(
    weights: &[u32],
    rng: &mut R,
    order: &mut Vec<usize>,
) {
    weighted_order_with(weights.iter().copied(), rng, &mut Vec::new(), order);
}

/// [`weighted_order`] with a scratch buffer for the keys, so that a caller
/// answering many queries allocates nothing.
pub(crate) fn weighted_order_with<R: Rng + ?Sized>(
    weights: impl ExactSizeIterator<Item = u32>,
    rng: &mut R,
    keyed: &mut Vec<(f64, usize)>,
    order: &mut Vec<usize>,
) {
    order.clear();
    match weights.len() {
        0 => return,
        1 => {
            order.push(0);
            return;
        }
        _ => {}
    }
    keyed.clear();
    keyed.extend(weights.enumerate().map(|(i, w)| {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u: f64 = 1.0 - rng.random::<f64>();
        (-u.ln() / f64::from(w.max(1)), i)
    }));
    keyed.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    order.extend(keyed.iter().map(|&(_, i)| i));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_appears_once() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut order = Vec::new();
        for n in 0..20 {
            let weights: Vec<u32> = (0..n).map(|i| i * 3).collect();
            weighted_order(&weights, &mut rng, &mut order);
            let mut seen = order.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..n as usize).collect::<Vec<_>>());
        }
    }

    #[test]
    fn first_place_follows_weights() {
        // Weights 100, 300, 600: first place should be won 10%, 30%, 60% of
        // the time. With 60 000 draws the standard error is under 0.2%, so
        // a 1.5% tolerance fails only on a real bias.
        let weights = [100, 300, 600];
        let mut rng = SmallRng::seed_from_u64(42);
        let mut firsts = [0u32; 3];
        let mut order = Vec::new();
        let draws = 60_000;
        for _ in 0..draws {
            weighted_order(&weights, &mut rng, &mut order);
            firsts[order[0]] += 1;
        }
        for (i, &w) in weights.iter().enumerate() {
            let seen = f64::from(firsts[i]) / f64::from(draws);
            let want = f64::from(w) / 1000.0;
            assert!((seen - want).abs() < 0.015, "index {i}: {seen} vs {want}");
        }
    }

    #[test]
    fn sampling_two_of_four_follows_weights() {
        // Inclusion probability when keeping the first 2 of weights
        // 1, 1, 1, 7 (sampling without replacement): the heavy record is
        // almost always kept, each light one about a third of the time
        // (exact: heavy 0.7 + 0.3 * 7/9 = 0.9333, light (2 - 0.9333) / 3 = 0.3556).
        let weights = [1, 1, 1, 7];
        let mut rng = SmallRng::seed_from_u64(3);
        let mut kept = [0u32; 4];
        let mut order = Vec::new();
        let draws = 40_000;
        for _ in 0..draws {
            weighted_order(&weights, &mut rng, &mut order);
            for &i in &order[..2] {
                kept[i] += 1;
            }
        }
        let heavy = f64::from(kept[3]) / f64::from(draws);
        assert!((heavy - 0.9333).abs() < 0.01, "heavy kept {heavy}");
        for (i, &k) in kept.iter().enumerate().take(3) {
            let light = f64::from(k) / f64::from(draws);
            assert!((light - 0.3556).abs() < 0.015, "light {i} kept {light}");
        }
    }

    #[test]
    fn equal_weights_shuffle_uniformly() {
        let weights = [5; 4];
        let mut rng = SmallRng::seed_from_u64(11);
        let mut firsts = [0u32; 4];
        let mut order = Vec::new();
        for _ in 0..40_000 {
            weighted_order(&weights, &mut rng, &mut order);
            firsts[order[0]] += 1;
        }
        for f in firsts {
            let share = f64::from(f) / 40_000.0;
            assert!((share - 0.25).abs() < 0.015, "{share}");
        }
    }
}
