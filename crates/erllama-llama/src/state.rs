//! Structural validation of llama.cpp per-sequence state bytes, and the
//! state layout a context writes.
//!
//! llama.cpp's state reader trusts parts of its input: crafted cell metadata
//! can trip its internal asserts, which abort the whole process. Before any
//! bytes reach `llama_state_seq_set_data_ext` we walk the layout it will
//! read and reject anything that is not exactly what this context's own pack
//! produces for the expected tokens.
//!
//! What "exactly" means is learned from the context itself: when a session
//! starts it packs a two-token probe sequence and records the
//! [`StateLayout`] — how many memory sections the state has, and for each its
//! layer count, V layout, rotation sizes and every layer's tensor types and
//! row sizes. A state is then valid when it has the same sections, each with
//! those same per-layer shapes, and cells that fit the tokens:
//!
//! - a **full** section (a plain KV cache, or the full-attention layers of a
//!   sliding-window model) holds one cell per token: each of the positions
//!   `0..n` once (in cell order, which in a context of several sequences
//!   need not be position order);
//! - a **sliding** section (the sliding-window layers of an iSWA model such
//!   as Gemma 2/3) holds only the cells inside the window: distinct
//!   positions forming a contiguous run that ends at `n - 1`, no longer than
//!   the window.
//!
//! The sections' layer counts must add up to the model's layer count.
//! Recurrent and hybrid memories (Mamba, RWKV, Jamba, ...), cells with
//! extra per-cell data (M-RoPE) and any other layout do not pass the probe:
//! such a model is reported not cacheable at load time
//! ([`CacheSupport`]) and saves nothing.
//!
//! Layout (little-endian), as written by `llama_context::state_seq_get_data`,
//! `llama_kv_cache::state_write` and `llama_kv_cache_iswa::state_write`:
//!
//! ```text
//! u32 magic 0xaf143cd8 | i32 seq_id
//! per memory section (base, then sliding window for iSWA):
//!   u32 n_stream (= 1 in the stored form; see below)
//!   u32 cell_count
//!   cell_count x { i32 pos | u32 n_seq_id (= 1) | i32 seq_id }
//!   if cell_count > 0:
//!     u32 v_trans | u32 n_layer | u32 n_rot_k | u32 n_rot_v
//!     n_layer x { i32 k_type | u64 k_row_bytes | cell_count * k_row_bytes }
//!     if !v_trans: n_layer x { i32 v_type | u64 v_row_bytes | cell_count * v_row_bytes }
//!     else:        n_layer x { i32 v_type | u32 v_elem_bytes | u32 n_embd_v | n_embd_v * cell_count * v_elem_bytes }
//! ```

//! A context of several sequences, each in a stream of its own (non-unified
//! cache), writes `n_stream` streams per section: the sequence's own stream
//! holds its cells and every other one just `u32 cell_count = 0`. Rows are
//! stored in the one-stream form whatever the context that wrote them
//! ([`compact_streams`]), and expanded for a context of several streams
//! when restored ([`expand_streams_into`]), so a row restores into a context of
//! any number of sequences.

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

/// What cells a memory section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// Every token's cell, at positions `0..n`.
    Full,
    /// The cells inside a sliding window of `window` positions: a
    /// contiguous run of positions ending at the last token.
    Sliding {
        /// The window (llama.cpp's `n_swa`).
        window: u32,
    },
}

/// One layer's tensor shape in the state: type and bytes per cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorShape {
    /// ggml type id.
    pub ty: i32,
    /// Bytes per cell (row size; for a transposed V, element size × width).
    pub bytes_per_cell: u64,
}

/// The shape of one memory section, as this context writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionLayout {
    /// Which cells it holds.
    pub kind: SectionKind,
    /// Whether V is stored transposed (no flash attention).
    pub v_trans: bool,
    /// llama.cpp's `n_rot_k` / `n_rot_v` for the section.
    pub n_rot: (u32, u32),
    /// Per layer: the K tensor.
    pub k: Vec<TensorShape>,
    /// Per layer: the V tensor (transposed V: element size × `n_embd_v`,
    /// with the element size and width kept in `v_trans_dims`).
    pub v: Vec<TensorShape>,
    /// Per layer, transposed V only: (element bytes, `n_embd_v`).
    pub v_trans_dims: Vec<(u32, u32)>,
}

impl SectionLayout {
    /// Layers in the section.
    #[must_use]
    pub fn n_layer(&self) -> usize {
        self.k.len()
    }
}

/// The state layout of a context: its memory sections, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    /// The sections, as llama.cpp writes them.
    pub sections: Vec<SectionLayout>,
}

impl StateLayout {
    /// `"kv"` for one full section, `"kv_iswa"` for full + sliding.
    #[must_use]
    pub fn memory_label(&self) -> &'static str {
        if self.sections.len() == 1 {
            "kv"
        } else {
            "kv_iswa"
        }
    }
}

/// Whether a model's state can be cached, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSupport {
    /// Rows can be saved and restored.
    pub cacheable: bool,
    /// The model's memory kind: `kv`, `kv_iswa` (sliding window),
    /// `recurrent`, `hybrid` or `unknown`.
    pub memory: String,
    /// Why the state is not cacheable (`None` when it is).
    pub reason: Option<String>,
}

impl CacheSupport {
    pub(crate) fn yes(layout: &StateLayout) -> Self {
        Self {
            cacheable: true,
            memory: layout.memory_label().into(),
            reason: None,
        }
    }

    pub(crate) fn no(memory: &str, reason: String) -> Self {
        Self {
            cacheable: false,
            memory: memory.into(),
            reason: Some(reason),
        }
    }
}

/// A parsed section: its cells' positions and its tensor shapes.
struct ParsedSection {
    positions: Vec<i32>,
    /// `None` for an empty section (llama.cpp writes no tensor header then).
    shape: Option<SectionLayout>,
}

fn parse(bytes: &[u8]) -> Result<Vec<ParsedSection>> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let magic = r.u32("magic")?;
    if magic != SEQ_STATE_MAGIC {
        return Err(bad(format!(
            "bad magic {magic:#010x} (expected {SEQ_STATE_MAGIC:#010x}); not llama.cpp sequence state"
        )));
    }
    let _seq_id = r.i32("sequence id")?;
    let mut sections = Vec::new();
    while !r.at_end() {
        if sections.len() == 4 {
            return Err(bad("more than four memory sections".into()));
        }
        sections.push(parse_section(&mut r, sections.len())?);
    }
    if sections.is_empty() {
        return Err(bad("no memory section".into()));
    }
    Ok(sections)
}

fn parse_section(r: &mut Reader<'_>, index: usize) -> Result<ParsedSection> {
    let n_stream = r.u32("stream count")?;
    if n_stream != 1 {
        return Err(bad(format!(
            "section {index}: stream count {n_stream}, expected 1"
        )));
    }
    parse_stream(r, index)
}

/// Byte spans of a state's sections and, in each, of its streams (each
/// from its `cell_count`).
struct Spans {
    sections: Vec<(usize, Vec<(usize, usize)>)>,
}

fn stream_spans(bytes: &[u8], max_streams: u32) -> Result<Spans> {
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.u32("magic")? != SEQ_STATE_MAGIC {
        return Err(bad("not llama.cpp sequence state".into()));
    }
    let _seq_id = r.i32("sequence id")?;
    let mut sections = Vec::new();
    while !r.at_end() {
        if sections.len() == 4 {
            return Err(bad("more than four memory sections".into()));
        }
        let header = r.pos;
        let n_stream = r.u32("stream count")?;
        if n_stream == 0 || n_stream > max_streams {
            return Err(bad(format!(
                "section {}: stream count {n_stream}, expected 1..={max_streams}",
                sections.len()
            )));
        }
        let mut streams = Vec::with_capacity(n_stream as usize);
        for _ in 0..n_stream {
            let start = r.pos;
            parse_stream(&mut r, sections.len())?;
            streams.push((start, r.pos));
        }
        sections.push((header, streams));
    }
    Ok(Spans { sections })
}

/// Rewrites, in place, the state of one sequence of a context of several
/// streams into the one-stream form (its own stream only); returns the new
/// length. A one-stream state is left as it is.
///
/// # Errors
///
/// [`LlamaError::KvState`] for bytes that are not such a state, or one
/// whose cells are in more than one stream.
pub fn compact_streams(buf: &mut [u8]) -> Result<usize> {
    let spans = stream_spans(buf, 256)?;
    let mut out = 8usize;
    for (i, (header, streams)) in spans.sections.iter().enumerate() {
        let full: Vec<&(usize, usize)> = streams.iter().filter(|(a, b)| b - a > 4).collect();
        let keep = match full.as_slice() {
            [] => streams[0],
            [one] => **one,
            _ => return Err(bad(format!("section {i}: cells in several streams"))),
        };
        buf[out..out + 4].copy_from_slice(&1u32.to_le_bytes());
        debug_assert!(out <= *header);
        out += 4;
        buf.copy_within(keep.0..keep.1, out);
        out += keep.1 - keep.0;
    }
    Ok(out)
}

/// The one-stream state `bytes` for a context of `n_stream` streams, into
/// `out` (cleared first): each section's stream first, then `n_stream - 1`
/// empty ones (llama.cpp restores a sequence's cells into its own stream
/// whichever the state names). A copy (`n_stream == 1` needs none) into a
/// kept buffer: one already faulted in copies at memory speed, where a
/// fresh one pays a page fault per 4 KiB (about 20 ms for a 47 MB state
/// on the bench machine, four times the rest of the restore).
///
/// # Errors
///
/// [`LlamaError::KvState`] for bytes that are not a one-stream state.
pub fn expand_streams_into(bytes: &[u8], n_stream: u32, out: &mut Vec<u8>) -> Result<()> {
    let spans = stream_spans(bytes, 1)?;
    let extra = 4 * (n_stream as usize).saturating_sub(1);
    out.clear();
    out.reserve(bytes.len() + extra * spans.sections.len());
    out.extend_from_slice(&bytes[..8]);
    for (_, streams) in &spans.sections {
        let (a, b) = streams[0];
        out.extend_from_slice(&n_stream.to_le_bytes());
        out.extend_from_slice(&bytes[a..b]);
        out.resize(out.len() + extra, 0);
    }
    Ok(())
}

/// One stream's cells and tensors, from its `cell_count`.
fn parse_stream(r: &mut Reader<'_>, index: usize) -> Result<ParsedSection> {
    let cell_count = r.u32("cell count")? as usize;
    // Each cell takes 12 bytes: a count beyond the buffer is garbage (and
    // must not size an allocation).
    if cell_count > (r.buf.len() - r.pos) / 12 {
        return Err(bad(format!(
            "section {index}: {cell_count} cells cannot fit in the state"
        )));
    }
    let mut positions = Vec::with_capacity(cell_count);
    for i in 0..cell_count {
        let pos = r.i32("cell position")?;
        let n_seq = r.u32("cell sequence count")?;
        let _seq = r.i32("cell sequence id")?;
        if n_seq != 1 {
            return Err(bad(format!(
                "section {index}: cell {i} belongs to {n_seq} sequences, expected 1"
            )));
        }
        positions.push(pos);
    }
    if cell_count == 0 {
        return Ok(ParsedSection {
            positions,
            shape: None,
        });
    }
    let v_trans = r.u32("v_trans")?;
    if v_trans > 1 {
        return Err(bad(format!(
            "section {index}: v_trans flag {v_trans} is not 0 or 1"
        )));
    }
    let n_layer = r.u32("layer count")? as usize;
    if n_layer > 4096 {
        return Err(bad(format!("section {index}: {n_layer} layers")));
    }
    let n_rot = (r.u32("n_rot_k")?, r.u32("n_rot_v")?);
    let cells = cell_count as u64;
    let mut k = Vec::with_capacity(n_layer);
    for _ in 0..n_layer {
        let ty = r.i32("key type")?;
        let row = r.u64("key row size")?;
        let size = row
            .checked_mul(cells)
            .ok_or_else(|| bad(format!("key row size {row} overflows")))?;
        r.skip(size, "key data")?;
        k.push(TensorShape {
            ty,
            bytes_per_cell: row,
        });
    }
    let mut v = Vec::with_capacity(n_layer);
    let mut v_trans_dims = Vec::new();
    for _ in 0..n_layer {
        let ty = r.i32("value type")?;
        let per_cell = if v_trans == 0 {
            r.u64("value row size")?
        } else {
            let el = r.u32("value element size")?;
            let n_embd = r.u32("value width")?;
            v_trans_dims.push((el, n_embd));
            u64::from(el) * u64::from(n_embd)
        };
        let size = per_cell
            .checked_mul(cells)
            .ok_or_else(|| bad("value section size overflows".into()))?;
        r.skip(size, "value data")?;
        v.push(TensorShape {
            ty,
            bytes_per_cell: per_cell,
        });
    }
    Ok(ParsedSection {
        positions,
        shape: Some(SectionLayout {
            // Decided by the caller (the probe knows the model).
            kind: SectionKind::Full,
            v_trans: v_trans == 1,
            n_rot,
            k,
            v,
            v_trans_dims,
        }),
    })
}

/// Learns the layout from a probe state of `n_tokens` tokens (positions
/// `0..n_tokens`, fewer than any sliding window) packed by this context.
///
/// `n_layer` is the model's layer count; `n_swa` its sliding window (0 for
/// none).
///
/// # Errors
///
/// [`LlamaError::KvState`] saying why the layout is not one erllama can
/// validate.
pub fn learn_layout(
    bytes: &[u8],
    n_tokens: usize,
    n_layer: u32,
    n_swa: u32,
) -> Result<StateLayout> {
    let parsed = parse(bytes)?;
    let kinds: Vec<SectionKind> = match (parsed.len(), n_swa) {
        (1, _) => vec![SectionKind::Full],
        (2, w) if w > 0 => vec![SectionKind::Full, SectionKind::Sliding { window: w }],
        (n, w) => {
            return Err(bad(format!(
                "{n} memory sections (sliding window {w}): a layout erllama does not validate"
            )))
        }
    };
    let mut sections = Vec::with_capacity(parsed.len());
    for (i, (p, kind)) in parsed.into_iter().zip(kinds).enumerate() {
        let want: Vec<i32> = (0..n_tokens)
            .map(|t| i32::try_from(t).unwrap_or(i32::MAX))
            .collect();
        if p.positions != want {
            return Err(bad(format!(
                "section {i} of the probe holds positions {:?}, expected {want:?}",
                p.positions
            )));
        }
        let mut shape = p
            .shape
            .ok_or_else(|| bad(format!("section {i} of the probe is empty")))?;
        shape.kind = kind;
        sections.push(shape);
    }
    let total: usize = sections.iter().map(SectionLayout::n_layer).sum();
    if total != n_layer as usize {
        return Err(bad(format!(
            "the memory sections hold {total} layers, the model has {n_layer} \
             (layers without or sharing KV memory)"
        )));
    }
    Ok(StateLayout { sections })
}

/// Validates sequence-state bytes holding `n_tokens` tokens against the
/// context's layout. Returns the smallest position llama.cpp will report
/// for the sequence once restored (`llama_memory_seq_pos_min`: 0 for a
/// plain cache; for a sliding-window model, the first position still in
/// the window, since that memory answers from its sliding section).
///
/// # Errors
///
/// [`LlamaError::KvState`] describing the first mismatch.
pub fn validate_seq_state(bytes: &[u8], n_tokens: usize, layout: &StateLayout) -> Result<i32> {
    let parsed = parse(bytes)?;
    if parsed.len() != layout.sections.len() {
        return Err(bad(format!(
            "state has {} memory sections, this context writes {}",
            parsed.len(),
            layout.sections.len()
        )));
    }
    let mut pos_min = 0;
    for (i, (p, want)) in parsed.iter().zip(&layout.sections).enumerate() {
        check_cells(i, &p.positions, n_tokens, want.kind)?;
        match (&p.shape, n_tokens) {
            (None, 0) => {}
            (None, _) => return Err(bad(format!("section {i} is empty"))),
            (Some(shape), _) => check_shape(i, shape, want)?,
        }
        pos_min = pos_min.max(p.positions.iter().copied().min().unwrap_or(0));
    }
    Ok(pos_min)
}

fn check_cells(section: usize, positions: &[i32], n: usize, kind: SectionKind) -> Result<()> {
    match kind {
        SectionKind::Full => {
            if positions.len() != n {
                return Err(bad(format!(
                    "section {section} holds {} cells but {n} tokens were given",
                    positions.len()
                )));
            }
            // Each of the positions 0..n once. In a context of several
            // sequences a sequence's cells need not lie in position order
            // (a later token can fill a cell another sequence freed), and
            // llama.cpp packs them in cell order.
            let mut seen = vec![false; n];
            for (i, &p) in positions.iter().enumerate() {
                match usize::try_from(p).ok().filter(|&p| p < n) {
                    Some(p) if !seen[p] => seen[p] = true,
                    _ => {
                        return Err(bad(format!(
                            "section {section}: cell {i} has position {p}, outside 0..{n} or \
                             repeated"
                        )))
                    }
                }
            }
        }
        SectionKind::Sliding { window } => {
            let count = positions.len();
            if count > n || count > window as usize || (n > 0 && count == 0) {
                return Err(bad(format!(
                    "sliding section {section} holds {count} cells for {n} tokens and a \
                     window of {window}"
                )));
            }
            // Exactly the positions n - count .. n, each once.
            let start = (n - count) as i64;
            let mut seen = vec![false; count];
            for (i, &p) in positions.iter().enumerate() {
                let off = i64::from(p) - start;
                let slot = usize::try_from(off).ok().filter(|&o| o < count);
                match slot {
                    Some(o) if !seen[o] => seen[o] = true,
                    _ => {
                        return Err(bad(format!(
                            "sliding section {section}: cell {i} has position {p}, outside \
                             the window {start}..{n} or repeated"
                        )))
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_shape(section: usize, got: &SectionLayout, want: &SectionLayout) -> Result<()> {
    if got.n_layer() != want.n_layer() {
        return Err(bad(format!(
            "section {section} has {} layers, this context's has {}",
            got.n_layer(),
            want.n_layer()
        )));
    }
    if got.v_trans != want.v_trans || got.n_rot != want.n_rot {
        return Err(bad(format!(
            "section {section}: V layout or rotation differs from this context's \
             (v_trans {} vs {}, n_rot {:?} vs {:?})",
            got.v_trans, want.v_trans, got.n_rot, want.n_rot
        )));
    }
    for (l, (g, w)) in got.k.iter().zip(&want.k).enumerate() {
        if g != w {
            return Err(bad(format!(
                "section {section} layer {l}: key type/row {g:?}, this context writes {w:?}"
            )));
        }
    }
    for (l, (g, w)) in got.v.iter().zip(&want.v).enumerate() {
        if g != w {
            return Err(bad(format!(
                "section {section} layer {l}: value type/row {g:?}, this context writes {w:?}"
            )));
        }
    }
    if got.v_trans_dims != want.v_trans_dims {
        return Err(bad(format!(
            "section {section}: transposed value dimensions differ from this context's"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_u32(v: &mut Vec<u8>, x: u32) {
        v.extend_from_slice(&x.to_le_bytes());
    }

    /// A section of cells at `positions` with `layers` layers, 8-byte rows.
    fn section(v: &mut Vec<u8>, positions: &[u32], layers: u32) {
        push_u32(v, 1);
        push_u32(v, positions.len() as u32);
        for &p in positions {
            push_u32(v, p);
            push_u32(v, 1);
            push_u32(v, 0);
        }
        if positions.is_empty() {
            return;
        }
        for x in [0, layers, 64, 64] {
            push_u32(v, x);
        }
        for _ in 0..2 {
            for _ in 0..layers {
                push_u32(v, 1);
                v.extend_from_slice(&8u64.to_le_bytes());
                v.extend(std::iter::repeat_n(0xAB, 8 * positions.len()));
            }
        }
    }

    fn state(sections: &[(&[u32], u32)]) -> Vec<u8> {
        let mut v = Vec::new();
        push_u32(&mut v, SEQ_STATE_MAGIC);
        push_u32(&mut v, 0);
        for (pos, layers) in sections {
            section(&mut v, pos, *layers);
        }
        v
    }

    fn range(a: u32, b: u32) -> Vec<u32> {
        (a..b).collect()
    }

    fn plain() -> StateLayout {
        learn_layout(&state(&[(&range(0, 2), 3)]), 2, 3, 0).unwrap()
    }

    fn iswa(window: u32) -> StateLayout {
        learn_layout(
            &state(&[(&range(0, 2), 1), (&range(0, 2), 5)]),
            2,
            6,
            window,
        )
        .unwrap()
    }

    #[test]
    fn accepts_well_formed_state() {
        let l = plain();
        assert_eq!(l.memory_label(), "kv");
        validate_seq_state(&state(&[(&range(0, 5), 3)]), 5, &l).unwrap();
    }

    #[test]
    fn rejects_random_and_truncated_bytes() {
        let l = plain();
        assert!(validate_seq_state(b"", 5, &l).is_err());
        assert!(validate_seq_state(&[7u8; 100], 5, &l).is_err());
        let good = state(&[(&range(0, 5), 3)]);
        for cut in [4, 12, 20, 40, good.len() - 1] {
            assert!(
                validate_seq_state(&good[..cut], 5, &l).is_err(),
                "cut {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(validate_seq_state(&longer, 5, &l).is_err());
    }

    #[test]
    fn rejects_wrong_shape() {
        let l = plain();
        assert!(validate_seq_state(&state(&[(&range(0, 4), 3)]), 5, &l).is_err());
        assert!(validate_seq_state(&state(&[(&range(0, 5), 2)]), 5, &l).is_err());
        let mut bad_pos = state(&[(&range(0, 5), 3)]);
        // cell 1's position lives at 16 + 12 bytes
        bad_pos[28] = 9;
        assert!(validate_seq_state(&bad_pos, 5, &l).is_err());
        let mut bad_nseq = state(&[(&range(0, 5), 3)]);
        bad_nseq[20] = 2;
        assert!(validate_seq_state(&bad_nseq, 5, &l).is_err());
        // Another row size than the context writes.
        let mut other_row = state(&[(&range(0, 5), 3)]);
        let at = 8 + 8 + 5 * 12 + 16 + 4;
        other_row[at] = 9;
        assert!(validate_seq_state(&other_row, 5, &l).is_err());
    }

    #[test]
    fn learns_sliding_window_layouts() {
        let l = iswa(4);
        assert_eq!(l.memory_label(), "kv_iswa");
        assert_eq!(l.sections[0].kind, SectionKind::Full);
        assert_eq!(l.sections[1].kind, SectionKind::Sliding { window: 4 });
        // The sections must add up to the model's layers.
        let probe = state(&[(&range(0, 2), 1), (&range(0, 2), 5)]);
        assert!(learn_layout(&probe, 2, 7, 4).is_err());
        // Two sections without a window, or three sections: not ours.
        assert!(learn_layout(&probe, 2, 6, 0).is_err());
        let three = state(&[(&range(0, 2), 1), (&range(0, 2), 1), (&range(0, 2), 4)]);
        assert!(learn_layout(&three, 2, 6, 4).is_err());
    }

    #[test]
    fn sliding_section_holds_the_window() {
        let l = iswa(4);
        // Shorter than the window: every cell in both sections.
        validate_seq_state(&state(&[(&range(0, 3), 1), (&range(0, 3), 5)]), 3, &l).unwrap();
        // Longer: the last four positions, in any order, each once.
        let min = validate_seq_state(&state(&[(&range(0, 9), 1), (&range(5, 9), 5)]), 9, &l);
        assert_eq!(
            min.unwrap(),
            5,
            "llama.cpp reports the window's first position"
        );
        validate_seq_state(&state(&[(&range(0, 9), 1), (&[7, 8, 5, 6], 5)]), 9, &l).unwrap();
        for bad in [
            range(4, 9),      // more than the window
            vec![5, 6, 7],    // does not end at the last token
            vec![6, 6, 7, 8], // repeated
            vec![5, 6, 7, 9], // beyond the tokens
            range(0, 0),      // empty for a non-empty sequence
        ] {
            let s = state(&[(&range(0, 9), 1), (&bad, 5)]);
            assert!(validate_seq_state(&s, 9, &l).is_err(), "{bad:?}");
        }
        // The sections in the other order, or one missing.
        let swapped = state(&[(&range(5, 9), 5), (&range(0, 9), 1)]);
        assert!(validate_seq_state(&swapped, 9, &l).is_err());
        assert!(validate_seq_state(&state(&[(&range(0, 9), 1)]), 9, &l).is_err());
    }

    fn expand_streams(bytes: &[u8], n_stream: u32) -> Result<Vec<u8>> {
        let mut out = vec![0xEE; 3]; // cleared first
        expand_streams_into(bytes, n_stream, &mut out)?;
        Ok(out)
    }

    #[test]
    fn several_streams_compact_to_one_and_expand_back() {
        let one = state(&[(&range(0, 5), 2), (&range(2, 5), 3)]);
        // A context of three streams whose sequence is in stream 1.
        let mut three = expand_streams(&one, 3).expect("expand");
        assert_eq!(three.len(), one.len() + 2 * 2 * 4);
        let n = compact_streams(&mut three).expect("compact");
        assert_eq!(&three[..n], &one[..]);
        // Moved to stream 1 of 3 by hand: compacts to the same bytes.
        let spans = stream_spans(&one, 1).expect("spans");
        let mut moved = one[..8].to_vec();
        for (_, streams) in &spans.sections {
            let (a, b) = streams[0];
            moved.extend_from_slice(&3u32.to_le_bytes());
            moved.extend_from_slice(&0u32.to_le_bytes());
            moved.extend_from_slice(&one[a..b]);
            moved.extend_from_slice(&0u32.to_le_bytes());
        }
        let n = compact_streams(&mut moved).expect("compact");
        assert_eq!(&moved[..n], &one[..]);
        // A one-stream state is its own compact form; an empty one too.
        let mut same = one.clone();
        assert_eq!(compact_streams(&mut same).expect("same"), one.len());
        assert_eq!(same, one);
        // Garbage and a multi-stream state where one is expected fail.
        assert!(compact_streams(&mut [1u8, 2, 3]).is_err());
        let three = expand_streams(&one, 3).expect("expand");
        assert!(expand_streams(&three, 3).is_err());
        let mut truncated = three[..three.len() - 1].to_vec();
        assert!(compact_streams(&mut truncated).is_err());
    }

    #[test]
    fn absurd_cell_counts_are_refused_before_allocating() {
        let mut v = Vec::new();
        push_u32(&mut v, SEQ_STATE_MAGIC);
        push_u32(&mut v, 0);
        push_u32(&mut v, 1);
        push_u32(&mut v, u32::MAX);
        assert!(validate_seq_state(&v, 5, &plain()).is_err());
    }
}
