//! Shared fixtures of the cache integration tests.
#![allow(dead_code, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use erllama_cache::{
    Cache, CacheConfig, FileLoad, FileTierConfig, FingerprintMode, ModelIdentity, QuantType,
    SaveReason, SaveRequest, TierKind,
};

/// A model identity with a fixed fingerprint.
pub fn identity() -> Arc<ModelIdentity> {
    Arc::new(ModelIdentity {
        fingerprint: [0x11; 32],
        fingerprint_mode: FingerprintMode::Safe,
        quant_type: QuantType::Q4_1,
        ctx_params_hash: [0x22; 32],
        context_size: 4096,
    })
}

/// A deterministic payload of `len` bytes seeded by `seed`.
pub fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A save of `tokens` with a `len`-byte payload seeded by the first token.
pub fn request(tier: TierKind, tokens: &[u32], len: usize) -> SaveRequest {
    SaveRequest {
        identity: identity(),
        tier,
        tokens: tokens.into(),
        payload: payload(len, tokens.first().copied().unwrap_or(7)),
        logits_count: 0,
        reason: SaveReason::Finish,
        prompt_text: "test prompt".into(),
        detail: None,
    }
}

/// Token list `[base, base+1, …]` of `n` tokens.
pub fn toks(base: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| base.wrapping_add(i)).collect()
}

/// A config with every tier under `root` and the given quotas.
pub fn config(root: &Path, ram: u64, ram_file: u64, disk: u64) -> CacheConfig {
    CacheConfig {
        ram_quota: ram,
        ram_file: Some(FileTierConfig {
            dir: root.join("shm"),
            quota: ram_file,
            load: FileLoad::Read,
        }),
        disk: Some(FileTierConfig::new(root.join("disk"), disk)),
        ..CacheConfig::default()
    }
}

/// Opens a cache with every tier under `root`, 64 MiB each.
pub fn open(root: &Path) -> Cache {
    Cache::open(config(root, 64 << 20, 64 << 20, 64 << 20)).expect("open cache")
}

/// Offset of the value of the first TLV record with `tag`.
pub fn tlv_value_offset(bytes: &[u8], tag: u8) -> usize {
    let u32_at =
        |off: usize| u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as usize;
    let prompt_len = u32_at(72);
    let tlv_start = 72 + 4 + prompt_len;
    let tlv_end = tlv_start + 4 + u32_at(tlv_start);
    let mut at = tlv_start + 4;
    while at < tlv_end {
        let len = u32_at(at + 1);
        if bytes[at] == tag {
            return at + 5;
        }
        at += 5 + len;
    }
    panic!("no TLV with tag {tag:#04x}");
}
