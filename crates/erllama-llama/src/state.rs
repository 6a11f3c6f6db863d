//! Structural validation of llama.cpp per-sequence state bytes.
//!
//! llama.cpp's state reader trusts parts of its input: crafted cell metadata
//! can trip its internal asserts, which abort the whole process. Before any
//! bytes reach `llama_state_seq_set_data_ext` we walk the layout it will
//! read (the KV-cache sequence format of the pinned llama.cpp) and reject
//! anything that is not exactly what our own pack produces for the expected
//! tokens: right magic, one stream, one cell per token at positions
//! `0..n`, one sequence id per cell, the model's layer count, and tensor
//! sections that end exactly at the end of the buffer.
//!
//! Layout (little-endian), as written by `llama_context::state_seq_get_data`
//! and `llama_kv_cache::state_write`:
//!
//! ```text
//! u32 magic 0xaf143cd8 | i32 seq_id
//! per memory section (one for a plain KV cache, two for base + sliding window):
//!   u32 n_stream (= 1, unified cache)
//!   u32 cell_count
//!   cell_count x { i32 pos | u32 n_seq_id (= 1) | i32 seq_id }
//!   u32 v_trans | u32 n_layer | u32 n_rot_k | u32 n_rot_v
//!   n_layer x { i32 k_type | u64 k_row_bytes | cell_count * k_row_bytes }
//!   if !v_trans: n_layer x { i32 v_type | u64 v_row_bytes | cell_count * v_row_bytes }
//!   else:        n_layer x { i32 v_type | u32 v_elem_bytes | u32 n_embd_v | n_embd_v * cell_count * v_elem_bytes }
//! ```
//! Models whose cells carry extra per-cell data (M-RoPE, PLE) or whose
//! layers lack value tensors are not accepted by this validator: their
//! state is rejected, never restored (the request falls back to prefill).

use crate::error::{LlamaError, Result};

/// The magic llama.cpp writes at the start of sequence state.
pub const SEQ_STATE_MAGIC: u32 = 0xaf14_3cd8;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                bad(format!(
                    "truncated at byte {} reading {what} ({n} bytes, {} left)",
                    self.pos,
                    self.buf.len() - self.pos
                ))
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self, what: &str) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        let n = usize::try_from(n).map_err(|_| bad(format!("{what} size {n} is too large")))?;
        self.take(n, what).map(|_| ())
    }
    fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }
}

fn bad(msg: String) -> LlamaError {
    LlamaError::KvState(msg)
}

/// What the validator expects of the state.
#[derive(Debug, Clone, Copy)]
pub struct StateExpectation {
    /// Tokens the state must hold (cells at positions `0..n_tokens`).
    pub n_tokens: usize,
    /// The model's layer count.
    pub n_layer: u32,
}

/// Validates sequence-state bytes against what this context can restore.
///
/// # Errors
///
/// [`LlamaError::KvState`] describing the first mismatch.
pub fn validate_seq_state(bytes: &[u8], expect: StateExpectation) -> Result<()> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let magic = r.u32("magic")?;
    if magic != SEQ_STATE_MAGIC {
        return Err(bad(format!(
            "bad magic {magic:#010x} (expected {SEQ_STATE_MAGIC:#010x}); not llama.cpp sequence state"
        )));
    }
    let _seq_id = r.i32("sequence id")?;
    let mut section = 0usize;
    while !r.at_end() {
        validate_section(&mut r, section, expect)?;
        section += 1;
        if section > 2 {
            return Err(bad("more than two memory sections".into()));
        }
    }
    if section == 0 {
        return Err(bad("no memory section".into()));
    }
    Ok(())
}

fn validate_section(r: &mut Reader<'_>, section: usize, expect: StateExpectation) -> Result<()> {
    let n_stream = r.u32("stream count")?;
    if n_stream != 1 {
        return Err(bad(format!("stream count {n_stream}, expected 1")));
    }
    let cell_count = r.u32("cell count")? as usize;
    if section == 0 && cell_count != expect.n_tokens {
        return Err(bad(format!(
            "state holds {cell_count} cells but {} tokens were given",
            expect.n_tokens
        )));
    }
    if cell_count > expect.n_tokens {
        return Err(bad(format!(
            "section {section} holds {cell_count} cells, more than the {} tokens",
            expect.n_tokens
        )));
    }
    if cell_count == 0 {
        return Ok(());
    }
    let mut last_pos: i64 = -1;
    for i in 0..cell_count {
        let pos = r.i32("cell position")?;
        let n_seq = r.u32("cell sequence count")?;
        let _seq = r.i32("cell sequence id")?;
        if n_seq != 1 {
            return Err(bad(format!(
                "cell {i} belongs to {n_seq} sequences, expected 1"
            )));
        }
        let pos = i64::from(pos);
        // The primary cache holds the whole prefix; a sliding-window section
        // holds an increasing subset of it.
        let ok = if section == 0 {
            pos == i as i64
        } else {
            pos > last_pos && pos < expect.n_tokens as i64
        };
        if !ok {
            return Err(bad(format!("cell {i} has position {pos}, out of order")));
        }
        last_pos = pos;
    }
    let v_trans = r.u32("v_trans")?;
    if v_trans > 1 {
        return Err(bad(format!("v_trans flag {v_trans} is not 0 or 1")));
    }
    let n_layer = r.u32("layer count")?;
    if n_layer != expect.n_layer {
        return Err(bad(format!(
            "state has {n_layer} layers, the model has {}",
            expect.n_layer
        )));
    }
    let _n_rot_k = r.u32("n_rot_k")?;
    let _n_rot_v = r.u32("n_rot_v")?;
    let cells = cell_count as u64;
    for _ in 0..n_layer {
        let _k_type = r.i32("key type")?;
        let row = r.u64("key row size")?;
        let size = row
            .checked_mul(cells)
            .ok_or_else(|| bad(format!("key row size {row} overflows")))?;
        r.skip(size, "key data")?;
    }
    for _ in 0..n_layer {
        let _v_type = r.i32("value type")?;
        let size = if v_trans == 0 {
            let row = r.u64("value row size")?;
            row.checked_mul(cells)
        } else {
            let el = u64::from(r.u32("value element size")?);
            let n_embd = u64::from(r.u32("value width")?);
            el.checked_mul(n_embd).and_then(|s| s.checked_mul(cells))
        }
        .ok_or_else(|| bad("value section size overflows".into()))?;
        r.skip(size, "value data")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_u32(v: &mut Vec<u8>, x: u32) {
        v.extend_from_slice(&x.to_le_bytes());
    }

    /// A well-formed state of `n` cells and `layers` layers, 8-byte rows.
    fn synth(n: u32, layers: u32) -> Vec<u8> {
        let mut v = Vec::new();
        push_u32(&mut v, SEQ_STATE_MAGIC);
        push_u32(&mut v, 0);
        push_u32(&mut v, 1);
        push_u32(&mut v, n);
        for i in 0..n {
            push_u32(&mut v, i);
            push_u32(&mut v, 1);
            push_u32(&mut v, 0);
        }
        for x in [0, layers, 64, 64] {
            push_u32(&mut v, x);
        }
        for _ in 0..2 {
            for _ in 0..layers {
                push_u32(&mut v, 1);
                v.extend_from_slice(&8u64.to_le_bytes());
                v.extend(std::iter::repeat_n(0xAB, 8 * n as usize));
            }
        }
        v
    }

    const EXP: StateExpectation = StateExpectation {
        n_tokens: 5,
        n_layer: 3,
    };

    #[test]
    fn accepts_well_formed_state() {
        validate_seq_state(&synth(5, 3), EXP).unwrap();
    }

    #[test]
    fn rejects_random_and_truncated_bytes() {
        assert!(validate_seq_state(b"", EXP).is_err());
        assert!(validate_seq_state(&[7u8; 100], EXP).is_err());
        let good = synth(5, 3);
        for cut in [4, 12, 20, 40, good.len() - 1] {
            assert!(validate_seq_state(&good[..cut], EXP).is_err(), "cut {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(validate_seq_state(&longer, EXP).is_err());
    }

    #[test]
    fn rejects_wrong_shape() {
        assert!(validate_seq_state(&synth(4, 3), EXP).is_err());
        assert!(validate_seq_state(&synth(5, 2), EXP).is_err());
        let mut bad_pos = synth(5, 3);
        // cell 1's position lives at 16 + 12 bytes
        bad_pos[28] = 9;
        assert!(validate_seq_state(&bad_pos, EXP).is_err());
        let mut bad_nseq = synth(5, 3);
        bad_nseq[20] = 2;
        assert!(validate_seq_state(&bad_nseq, EXP).is_err());
    }
}
