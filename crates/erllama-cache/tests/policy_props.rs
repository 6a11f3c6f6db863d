//! Property tests of the save policy and the longest-prefix walk.

use std::collections::BTreeMap;

use erllama_cache::{
    cold_save_split, longest_prefix_probes, should_continued_save, should_finish_save,
    trim_boundary, validate_config, PolicyConfig,
};
use proptest::prelude::*;

fn config() -> impl Strategy<Value = PolicyConfig> {
    (
        0usize..5000,
        0usize..5000,
        0usize..40_000,
        1usize..5000,
        0usize..200,
        1usize..5000,
    )
        .prop_map(
            |(min, cold_min_extra, cold_max_extra, interval, trim, align)| PolicyConfig {
                min_tokens: min,
                cold_min_tokens: min + cold_min_extra,
                cold_max_tokens: min + cold_min_extra + cold_max_extra,
                continued_interval: interval,
                boundary_trim_tokens: trim,
                boundary_align_tokens: align,
                ..PolicyConfig::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn cold_split_properties(cfg in config(), len in 0usize..50_000) {
        prop_assert_eq!(validate_config(&cfg), Ok(()));
        let tokens: Vec<u32> = (0..len as u32).collect();
        let align = cfg.boundary_align_tokens;
        let trim = cfg.boundary_trim_tokens;
        match cold_save_split(&tokens, &cfg) {
            Some((prefix, rest)) => {
                prop_assert_eq!([prefix, rest].concat(), tokens.clone());
                prop_assert_eq!(prefix.len() % align, 0);
                prop_assert!(prefix.len() >= align);
                prop_assert!(len - prefix.len() >= trim);
                // Maximal: one more stride would cut into the trimmed tail.
                prop_assert!(prefix.len() + align > len - trim);
                prop_assert!(len >= cfg.cold_min_tokens && len <= cfg.cold_max_tokens);
            }
            None => prop_assert!(
                len < cfg.cold_min_tokens || len > cfg.cold_max_tokens || len < trim + align
            ),
        }
    }

    #[test]
    fn trim_boundary_properties(len in 0usize..100_000, trim in 0usize..1000, align in 0usize..5000) {
        match trim_boundary(len, trim, align) {
            Some(at) => {
                prop_assert!(align > 0 && at % align == 0 && at >= align && at + trim <= len);
                prop_assert!(at + align > len - trim);
            }
            None => prop_assert!(align == 0 || len < trim + align),
        }
    }

    #[test]
    fn probe_properties(cfg in config(), len in 0usize..200_000) {
        let stride = cfg.boundary_align_tokens;
        let floor = cfg.min_tokens.max(stride);
        let probes: Vec<usize> = longest_prefix_probes(len, &cfg).collect();
        for p in &probes {
            prop_assert_eq!(p % stride, 0);
            prop_assert!(*p >= floor && *p <= len);
        }
        for w in probes.windows(2) {
            prop_assert_eq!(w[0] - w[1], stride);
        }
        let start = len / stride * stride;
        if start >= floor {
            prop_assert_eq!(probes.first().copied(), Some(start));
            // The walk stops at the last multiple that still reaches the floor.
            let last = *probes.last().expect("non-empty");
            prop_assert!(last < floor + stride);
        } else {
            prop_assert!(probes.is_empty());
        }
    }

    #[test]
    fn save_triggers(cfg in config(), live in 0usize..100_000, last in 0usize..100_000) {
        prop_assert_eq!(
            should_continued_save(live, last, &cfg),
            live >= last && live - last >= cfg.continued_interval && live >= cfg.min_tokens
        );
        prop_assert_eq!(should_finish_save(live, &cfg), live >= cfg.min_tokens);
    }

    #[test]
    fn from_map_accepts_exactly_the_valid(values in prop::collection::vec(-10i64..10_000, 8)) {
        let map: BTreeMap<String, i64> =
            PolicyConfig::KEYS.iter().map(|k| (*k).to_owned()).zip(values.iter().copied()).collect();
        let [min, cold_min, cold_max, interval, trim, align, resume, evict] =
            <[i64; 8]>::try_from(values.as_slice()).expect("8 values");
        let valid = min >= 0
            && cold_min >= min
            && cold_max >= cold_min
            && interval > 0
            && trim >= 0
            && align > 0
            && resume >= 0
            && evict >= 0;
        match PolicyConfig::from_map(&map) {
            Ok(cfg) => {
                prop_assert!(valid);
                prop_assert_eq!(validate_config(&cfg), Ok(()));
                prop_assert_eq!(cfg.to_map(), map);
            }
            Err(_) => prop_assert!(!valid),
        }
    }
}
