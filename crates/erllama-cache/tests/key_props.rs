//! Property tests of key derivation.

use erllama_cache::{derive_key, effective_fingerprint, CacheKey, KeyHasher, QuantType};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_one_shot(
        fp in any::<[u8; 32]>(),
        quant in any::<u8>(),
        ctx in any::<[u8; 32]>(),
        tokens in prop::collection::vec(any::<u32>(), 0..3000),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let whole = derive_key(&fp, quant, &ctx, &tokens).expect("key");
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(tokens.len() + 1)).collect();
        points.push(0);
        points.push(tokens.len());
        points.sort_unstable();
        let mut h = KeyHasher::from_parts(&fp, quant, &ctx);
        for w in points.windows(2) {
            h.update(&tokens[w[0]..w[1]]);
        }
        prop_assert_eq!(h.token_count(), tokens.len() as u64);
        prop_assert_eq!(h.finish(), whole);
    }

    #[test]
    fn prefix_keys_match_each_prefix(
        tokens in prop::collection::vec(any::<u32>(), 0..3000),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let lengths: Vec<usize> = picks.iter().map(|p| p.index(tokens.len() + 1)).collect();
        let h = KeyHasher::new(&[3; 32], 7, &[4; 32]).expect("hasher");
        let keys = h.prefix_keys(&tokens, &lengths).expect("keys");
        for (len, key) in lengths.iter().zip(&keys) {
            prop_assert_eq!(*key, derive_key(&[3; 32], 7, &[4; 32], &tokens[..*len]).expect("key"));
        }
    }

    #[test]
    fn distinct_token_lists_get_distinct_keys(
        a in prop::collection::vec(any::<u32>(), 0..64),
        b in prop::collection::vec(any::<u32>(), 0..64),
    ) {
        prop_assume!(a != b);
        prop_assert_ne!(
            derive_key(&[0; 32], 1, &[0; 32], &a).expect("key"),
            derive_key(&[0; 32], 1, &[0; 32], &b).expect("key")
        );
    }

    #[test]
    fn hex_round_trip(bytes in any::<[u8; 32]>()) {
        let key = CacheKey(bytes);
        let hex = key.to_string();
        prop_assert_eq!(hex.len(), 64);
        prop_assert!(hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        prop_assert_eq!(CacheKey::from_hex(&hex), Ok(key));
    }

    #[test]
    fn quant_bytes(byte in any::<u8>()) {
        match QuantType::from_byte(byte) {
            Ok(q) => {
                prop_assert!(byte <= 29);
                prop_assert_eq!(QuantType::from_label(q.label()), Ok(q));
                prop_assert_eq!(QuantType::from_label(&q.label().to_uppercase()), Ok(q));
            }
            Err(_) => prop_assert!(byte > 29),
        }
    }

    #[test]
    fn effective_fingerprint_ignores_adapter_order(
        base in any::<[u8; 32]>(),
        adapters in prop::collection::vec((any::<[u8; 4]>(), -4.0f64..4.0), 1..6),
        seed in any::<u64>(),
    ) {
        let adapters: Vec<([u8; 32], f64)> = adapters
            .into_iter()
            .map(|(prefix, scale)| {
                let mut sha = [0u8; 32];
                sha[..4].copy_from_slice(&prefix);
                (sha, scale)
            })
            .collect();
        let mut shuffled = adapters.clone();
        // A seeded rotation + reversal is enough to move every element.
        let rot = (seed as usize) % shuffled.len();
        shuffled.rotate_left(rot);
        if seed & 1 == 1 {
            shuffled.reverse();
        }
        let a = effective_fingerprint(&base, &adapters).expect("fingerprint");
        prop_assert_eq!(effective_fingerprint(&base, &shuffled).expect("fingerprint"), a);
        prop_assert_ne!(a, base);
    }
}
