//! Property tests of the KVC codec: round trips over random metadata,
//! tokens across the whole u32 range and payloads from empty to 4 MiB;
//! corruption is always caught and never yields a wrong state.

use erllama_cache::{
    build_header, derive_key, parse_full, parse_meta, parse_meta_with_len, CacheKey,
    FingerprintMode, KvcError, KvcHeaderInput, QuantType, SaveReason, HEADER_FIXED_LEN,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Meta {
    quant_bits: u8,
    reason: u8,
    hit_count: u32,
    context_size: u32,
    creation_time: u64,
    last_used_time: u64,
    prompt: String,
    fingerprint: [u8; 32],
    mode: u8,
    quant: u8,
    ctx: [u8; 32],
    hostname: Option<String>,
    version: Option<String>,
    detail: Option<String>,
    tokens: Vec<u32>,
}

impl Meta {
    fn input(&self) -> KvcHeaderInput<'_> {
        KvcHeaderInput {
            quant_bits: self.quant_bits,
            save_reason: SaveReason::from_byte(self.reason).expect("reason"),
            hit_count: self.hit_count,
            context_size: self.context_size,
            creation_time: self.creation_time,
            last_used_time: self.last_used_time,
            prompt_text: &self.prompt,
            fingerprint: self.fingerprint,
            fingerprint_mode: FingerprintMode::from_byte(self.mode).expect("mode"),
            quant_type: QuantType::from_byte(self.quant).expect("quant"),
            ctx_params_hash: self.ctx,
            hostname: Some(self.hostname.as_deref().unwrap_or("")),
            writer_version: Some(self.version.as_deref().unwrap_or("")),
            save_reason_detail: self.detail.as_deref(),
            tokens: &self.tokens,
            logits_count: 0,
        }
    }

    fn key(&self) -> CacheKey {
        derive_key(&self.fingerprint, self.quant, &self.ctx, &self.tokens).expect("key")
    }
}

fn text() -> impl Strategy<Value = Option<String>> {
    prop::option::of("\\PC{1,24}")
}

fn meta() -> impl Strategy<Value = Meta> {
    (
        (
            any::<u8>(),
            0u8..6,
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
        ),
        (
            "\\PC{0,64}",
            any::<[u8; 32]>(),
            0u8..3,
            0u8..30,
            any::<[u8; 32]>(),
        ),
        (
            text(),
            text(),
            text(),
            prop::collection::vec(any::<u32>(), 0..600),
        ),
    )
        .prop_map(
            |(
                (quant_bits, reason, hit_count, context_size, creation_time, last_used_time),
                (prompt, fingerprint, mode, quant, ctx),
                (hostname, version, detail, tokens),
            )| Meta {
                quant_bits,
                reason,
                hit_count,
                context_size,
                creation_time,
                last_used_time,
                prompt,
                fingerprint,
                mode,
                quant,
                ctx,
                hostname,
                version,
                detail,
                tokens,
            },
        )
}

/// Payload sizes from empty to 4 MiB, mostly small; bytes from a seeded
/// xorshift so multi-MB payloads cost nothing to generate.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![4 => 0usize..64, 3 => 0usize..65_536, 1 => 0usize..=(4 << 20)],
        any::<u64>(),
    )
        .prop_map(|(len, seed)| {
            let mut x = seed | 1;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
}

fn file(m: &Meta, payload: &[u8]) -> Vec<u8> {
    let mut f = build_header(&m.input(), payload).expect("build");
    f.extend_from_slice(payload);
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(m in meta(), payload in payload()) {
        let header = build_header(&m.input(), &payload).expect("build");
        let mut f = header.clone();
        f.extend_from_slice(&payload);
        let meta = parse_full(&f, &m.key()).expect("full parse");

        prop_assert_eq!(meta.payload_offset, header.len() as u64);
        prop_assert_eq!(meta.payload_length, payload.len() as u64);
        prop_assert_eq!(meta.quant_bits, m.quant_bits);
        prop_assert_eq!(meta.save_reason.to_byte(), m.reason);
        prop_assert_eq!(meta.cached_token_count as usize, m.tokens.len());
        prop_assert_eq!(meta.hit_count, m.hit_count);
        prop_assert_eq!(meta.context_size, m.context_size);
        prop_assert_eq!(meta.creation_time, m.creation_time);
        prop_assert_eq!(meta.last_used_time, m.last_used_time);
        prop_assert_eq!(&meta.prompt_text, &m.prompt);
        prop_assert_eq!(meta.fingerprint, m.fingerprint);
        prop_assert_eq!(meta.fingerprint_mode.to_byte(), m.mode);
        prop_assert_eq!(meta.quant_type.to_byte(), m.quant);
        prop_assert_eq!(meta.ctx_params_hash, m.ctx);
        prop_assert_eq!(&meta.hostname, &m.hostname);
        prop_assert_eq!(&meta.writer_version, &m.version);
        prop_assert_eq!(&meta.save_reason_detail, &m.detail);
        prop_assert_eq!(&meta.tokens, &m.tokens);
        prop_assert_eq!(meta.key(), m.key());

        // A startup scan reads just the header.
        let from_prefix = parse_meta_with_len(&header, f.len() as u64).expect("prefix parse");
        prop_assert_eq!(&from_prefix, &meta);
        // The payload can be checked on its own.
        prop_assert_eq!(meta.verify_payload(&payload, &m.key()), Ok(()));
    }

    #[test]
    fn payload_flip_is_a_crc_mismatch(m in meta(), payload in payload(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        prop_assume!(!payload.is_empty());
        let mut f = file(&m, &payload);
        let header_len = f.len() - payload.len();
        f[header_len + at.index(payload.len())] ^= 1 << bit;
        prop_assert!(parse_meta(&f).is_ok());
        let crc_mismatch = matches!(parse_full(&f, &m.key()), Err(KvcError::CrcMismatch { .. }));
        prop_assert!(crc_mismatch, "a flipped payload bit must be a CRC mismatch");
    }

    #[test]
    fn header_flip_never_gives_a_wrong_state(m in meta(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let payload = b"state bytes";
        let mut f = file(&m, payload);
        let header_len = f.len() - payload.len();
        let pos = at.index(header_len);
        f[pos] ^= 1 << bit;
        // Must not panic; if it parses, it is the same state.
        if let Ok(meta) = parse_full(&f, &m.key()) {
            prop_assert_eq!(&meta.tokens, &m.tokens);
            prop_assert_eq!(meta.fingerprint, m.fingerprint);
            prop_assert_eq!(meta.quant_type.to_byte(), m.quant);
            prop_assert_eq!(meta.ctx_params_hash, m.ctx);
            prop_assert_eq!(meta.payload_length, payload.len() as u64);
        }
        // Magic, version, reserved fields, counts, lengths, offset and CRC
        // are always checked.
        let checked = [0..4, 6..12, 20..24, 40..72];
        if checked.iter().any(|r| r.contains(&pos)) {
            prop_assert!(parse_full(&f, &m.key()).is_err(), "flip at byte {} went unnoticed", pos);
        }
    }

    #[test]
    fn truncation_is_always_an_error(m in meta(), payload in payload(), at in any::<prop::sample::Index>()) {
        let f = file(&m, &payload);
        let cut = at.index(f.len());
        prop_assert!(parse_meta(&f[..cut]).is_err());
        if cut >= HEADER_FIXED_LEN {
            prop_assert!(parse_full(&f[..cut], &m.key()).is_err());
        }
    }

    #[test]
    fn extension_is_trailing_bytes(m in meta(), extra in prop::collection::vec(any::<u8>(), 1..64)) {
        let mut f = file(&m, b"p");
        f.extend_from_slice(&extra);
        let trailing = matches!(parse_meta(&f), Err(KvcError::TrailingBytes { .. }));
        prop_assert!(trailing, "extra bytes must be trailing bytes");
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), file_len in any::<u64>()) {
        let _ = parse_meta(&bytes);
        let _ = parse_meta_with_len(&bytes, file_len);
        let mut b = bytes.clone();
        if b.len() >= 4 {
            b[..4].copy_from_slice(b"KVC\x01");
        }
        let _ = parse_full(&b, &CacheKey([0; 32]));
    }
}
