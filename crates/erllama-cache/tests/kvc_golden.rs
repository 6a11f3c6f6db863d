//! Golden test: a header for fixed inputs, checked byte by byte against
//! docs/cache-format.md's table (offsets and values worked out by hand from the
//! documented layout, not from the builder's output). CRC32C and key values were
//! computed independently (a bitwise Castagnoli CRC and hashlib in
//! Python).

use erllama_cache::{
    build_header, parse_full, CacheKey, FingerprintMode, KvcHeaderInput, QuantType, SaveReason,
    HEADER_FIXED_LEN, HIT_COUNT_OFFSET,
};

const TOKENS: [u32; 2] = [0x0102_0304, 0xFFFF_FFFF];
const PAYLOAD: &[u8] = b"xyz";

fn input() -> KvcHeaderInput<'static> {
    KvcHeaderInput {
        quant_bits: 4,
        save_reason: SaveReason::Evict,
        hit_count: 7,
        context_size: 8192,
        creation_time: 0x1122_3344_5566_7788,
        last_used_time: 0x0102_0304_0506_0708,
        prompt_text: "ab",
        fingerprint: [0x11; 32],
        fingerprint_mode: FingerprintMode::Safe,
        quant_type: QuantType::Q8_0,
        ctx_params_hash: [0x22; 32],
        hostname: Some("h"),
        writer_version: Some("v1"),
        save_reason_detail: Some("d"),
        tokens: &TOKENS,
        logits_count: 0,
    }
}

/// The expected header, written out field by field.
fn expected() -> Vec<u8> {
    let mut e: Vec<u8> = Vec::new();
    e.extend_from_slice(b"KVC"); // 0: magic
    e.push(1); // 3: version
    e.push(4); // 4: quant_bits
    e.push(3); // 5: save_reason evict
    e.extend_from_slice(&[0, 0]); // 6: reserved
    e.extend_from_slice(&[2, 0, 0, 0]); // 8: cached_token_count
    e.extend_from_slice(&[7, 0, 0, 0]); // 12: hit_count
    e.extend_from_slice(&[0x00, 0x20, 0, 0]); // 16: context_size 8192
    e.extend_from_slice(&[0; 4]); // 20: reserved
    e.extend_from_slice(&[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]); // 24: creation_time
    e.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]); // 32: last_used_time
    e.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // 40: payload_byte_count
                                                    // payload_offset = 72 + (4 + 2) prompt + (4 + 127) TLVs = 209 = 0xD1
    e.extend_from_slice(&[0xD1, 0, 0, 0, 0, 0, 0, 0]); // 48
    e.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // 56: payload_length
    e.extend_from_slice(&[0x85, 0x68, 0x23, 0x25]); // 64: CRC32C("xyz") = 0x25236885
    e.extend_from_slice(&[0; 4]); // 68: reserved
    assert_eq!(e.len(), 72);
    e.extend_from_slice(&[2, 0, 0, 0]); // 72: prompt length
    e.extend_from_slice(b"ab"); // 76
                                // TLV section: 37 + 6 + 6 + 37 + 9 + 13 + 6 + 7 + 6 = 127 = 0x7F
    e.extend_from_slice(&[0x7F, 0, 0, 0]); // 78
    e.extend_from_slice(&[0x01, 32, 0, 0, 0]); // 82: fingerprint
    e.extend_from_slice(&[0x11; 32]);
    e.extend_from_slice(&[0x02, 1, 0, 0, 0, 0]); // 119: mode safe
    e.extend_from_slice(&[0x03, 1, 0, 0, 0, 6]); // 125: quant q8_0
    e.extend_from_slice(&[0x04, 32, 0, 0, 0]); // 131: ctx_params_hash
    e.extend_from_slice(&[0x22; 32]);
    e.extend_from_slice(&[0x08, 4, 0, 0, 0, 2, 0, 0, 0]); // 168: token count
    e.extend_from_slice(&[0x09, 8, 0, 0, 0, 4, 3, 2, 1, 0xFF, 0xFF, 0xFF, 0xFF]); // 177: token ids
    e.extend_from_slice(&[0x05, 1, 0, 0, 0, b'h']); // 190: hostname
    e.extend_from_slice(&[0x06, 2, 0, 0, 0, b'v', b'1']); // 196: writer version
    e.extend_from_slice(&[0x07, 1, 0, 0, 0, b'd']); // 203: save_reason_detail
    assert_eq!(e.len(), 209);
    e
}

#[test]
fn golden_header_bytes() {
    let header = build_header(&input(), PAYLOAD).expect("build");
    assert_eq!(header, expected());
    // Spot checks of the landmarks.
    assert_eq!(&header[..3], b"KVC");
    assert_eq!(header[HIT_COUNT_OFFSET], 7);
    assert_eq!(header[HEADER_FIXED_LEN], 2);
    let tags: Vec<u8> = [82, 119, 125, 131, 168, 177, 190, 196, 203]
        .iter()
        .map(|&i| header[i])
        .collect();
    assert_eq!(tags, [1, 2, 3, 4, 8, 9, 5, 6, 7]);
}

#[test]
fn golden_file_parses_with_known_key() {
    let mut file = expected();
    file.extend_from_slice(PAYLOAD);
    // hashlib.sha256(b'\x11'*32 + bytes([6]) + b'\x22'*32 +
    //   struct.pack('<2I', 0x01020304, 0xffffffff)).hexdigest()
    let key: CacheKey = "7f6e8de424f034ca944026880a466984327576f849c6e909bde89a6589a4e366"
        .parse()
        .expect("hex");
    let meta = parse_full(&file, &key).expect("parse");
    assert_eq!(meta.tokens, TOKENS);
    assert_eq!(meta.save_reason, SaveReason::Evict);
    assert_eq!(meta.payload_offset, 209);
    assert_eq!(meta.payload_crc, 0x2523_6885);
    assert_eq!(meta.hostname.as_deref(), Some("h"));
    assert_eq!(meta.key(), key);
}
