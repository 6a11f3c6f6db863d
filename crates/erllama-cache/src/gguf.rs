//! A small GGUF (v2/v3) reader: just enough of the format to find the
//! metadata and tensor-info sections, the data section and the first
//! tensor, and to read `general.file_type`.
//!
//! The cache never needs tensor values, only a cheap identity for a model
//! file (`gguf_chunked` fingerprint) and its quantisation, so this reader
//! streams the header once, skipping values it does not need without
//! allocating for them. Every length read from the file is checked against
//! the file length before it is used, so a corrupt or hostile file fails
//! fast with a typed error instead of a huge allocation or a long read.
//!
//! Layout (little-endian, as written by llama.cpp's `gguf.cpp`):
//! `"GGUF"`, u32 version, u64 tensor_count, u64 kv_count, then kv_count
//! pairs (gguf string key = u64 length + bytes, u32 value type, value;
//! an array is u32 element type + u64 count + elements), then tensor_count
//! tensor infos (name string, u32 n_dims, u64 dims[n_dims], u32 ggml type,
//! u64 offset relative to the data section), then padding up to
//! `general.alignment` (u32, default 32), then the data section.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const GGUF_MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Tensor names are below `GGML_MAX_NAME` (64) bytes in valid files; longer
/// names are skipped rather than read (they only ever appear in errors).
const MAX_NAME_READ: u64 = 256;
/// Both keys the cache reads have this length, which lets the reader skip
/// every other key without allocating for it.
const KEY_ALIGNMENT: &[u8] = b"general.alignment";
const KEY_FILE_TYPE: &[u8] = b"general.file_type";

/// GGUF value types (`enum gguf_type`).
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_UINT32: u32 = 4;

/// Errors from reading a GGUF model file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the `GGUF` magic (or is shorter than it).
    #[error("{path} is not a GGUF file (starts with {found:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// The first (up to 4) bytes of the file.
        found: Vec<u8>,
    },
    /// The GGUF version is not 2 or 3 (v1 files and byte-swapped files
    /// land here too).
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version field as read (little-endian).
        version: u32,
    },
    /// The file ends inside a structure the header says is there.
    #[error("{path}: file ends inside {what} (at byte {offset}, file is {file_len} bytes)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: &'static str,
        /// Byte offset where the read started.
        offset: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A metadata value has a type outside the GGUF type table (or is a
    /// nested array, which llama.cpp rejects too).
    #[error("{path}: metadata value #{index} has invalid type {value_type}")]
    BadValueType {
        /// The file.
        path: PathBuf,
        /// Index of the key/value pair.
        index: u64,
        /// The type code found.
        value_type: u32,
    },
    /// `general.alignment` is not a `u32`.
    #[error("{path}: general.alignment must have type u32 (4), found type {value_type}")]
    AlignmentNotU32 {
        /// The file.
        path: PathBuf,
        /// The type code found.
        value_type: u32,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("{path}: general.alignment {alignment} is not a power of two")]
    AlignmentNotPowerOfTwo {
        /// The file.
        path: PathBuf,
        /// The alignment found.
        alignment: u32,
    },
    /// A tensor info declares more than 4 dimensions.
    #[error("{path}: tensor {tensor:?} has {n_dims} dimensions (at most 4)")]
    TooManyDims {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The dimension count found.
        n_dims: u32,
    },
    /// The first tensor's ggml type is not one this reader knows the block
    /// size of, so its byte length cannot be computed.
    #[error("{path}: tensor {tensor:?} has unknown ggml type {ggml_type}")]
    UnknownTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The ggml type code found.
        ggml_type: u32,
    },
    /// The first tensor's shape does not fit its type (row length not a
    /// multiple of the block size) or its byte size overflows.
    #[error("{path}: tensor {tensor:?} has invalid shape {dims:?} for ggml type {ggml_type}")]
    BadTensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The dimensions found.
        dims: Vec<u64>,
        /// The ggml type code.
        ggml_type: u32,
    },
    /// The first tensor's data lies (partly) outside the file.
    #[error(
        "{path}: tensor {tensor:?} data [{start}, {end}) lies outside the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Absolute start offset of its data.
        start: u64,
        /// Absolute end offset of its data (saturated on overflow).
        end: u64,
        /// Length of the file.
        file_len: u64,
    },
}

/// `(block size in elements, bytes per block)` for a ggml type, as in
/// ggml.c's `type_traits` (checked against the llama.cpp vendored by
/// `llama-cpp-sys-2` 0.1.161). Removed types (4, 5, 31–33, 36–38) are
/// unknown.
fn ggml_type_block(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        40 => (64, 36),   // NVFP4
        41 => (128, 18),  // Q1_0
        42 => (64, 18),   // Q2_0
        _ => return None,
    })
}

/// Byte size of a scalar GGUF value type, `None` for string, array and
/// unknown types.
fn scalar_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

/// Where the pieces of a GGUF file are, as far as the scan got.
#[derive(Debug)]
pub(crate) struct GgufLayout {
    /// Raw `general.file_type` when present as a non-negative integer.
    pub file_type: Option<u64>,
    /// Absolute offset just past the last tensor info.
    pub tensor_infos_end: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
    /// The first tensor info, in file order.
    pub first_tensor: Option<FirstTensor>,
}

/// The first tensor info of a file.
#[derive(Debug)]
pub(crate) struct FirstTensor {
    pub name: String,
    /// Offset relative to the data section.
    pub offset: u64,
    /// Byte size of its data.
    pub nbytes: u64,
}

/// How far [`scan`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    AfterMetadata,
    AfterTensorInfos,
}

/// A counting reader that optionally feeds every byte it reads to a hasher.
struct Reader<'p, R> {
    inner: R,
    pos: u64,
    file_len: u64,
    hasher: Option<Sha256>,
    path: &'p Path,
}

impl<R: Read> Reader<'_, R> {
    fn truncated(&self, what: &'static str) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what,
            offset: self.pos,
            file_len: self.file_len,
        }
    }

    /// Fails fast when fewer than `n` bytes remain, so a bogus length never
    /// turns into a long read or a big allocation.
    fn ensure(&self, n: u64, what: &'static str) -> Result<(), GgufError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.file_len => Ok(()),
            _ => Err(self.truncated(what)),
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(self.truncated(what)),
            Err(source) => {
                return Err(GgufError::Io {
                    path: self.path.to_path_buf(),
                    source,
                })
            }
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&*buf);
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), GgufError> {
        self.ensure(n, what)?;
        let mut buf = [0u8; 8192];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            self.fill(&mut buf[..k], what)?;
            left -= k as u64;
        }
        Ok(())
    }

    /// Reads a gguf string's bytes if it is at most `max` bytes long,
    /// otherwise skips it; returns `(length, bytes if read)`.
    fn string_upto(
        &mut self,
        max: u64,
        what: &'static str,
    ) -> Result<(u64, Option<Vec<u8>>), GgufError> {
        let len = self.u64(what)?;
        self.ensure(len, what)?;
        if len <= max {
            let mut bytes = vec![0u8; len as usize];
            self.fill(&mut bytes, what)?;
            Ok((len, Some(bytes)))
        } else {
            self.skip(len, what)?;
            Ok((len, None))
        }
    }

    /// Reads a scalar integer value of any width; `None` (value consumed)
    /// for negative numbers and non-integer types.
    fn int_value(&mut self, value_type: u32, index: u64) -> Result<Option<u64>, GgufError> {
        const WHAT: &str = "metadata value";
        Ok(match value_type {
            0 => Some(u64::from(self.byte(WHAT)?)),
            1 => u64::try_from(i8::from_le_bytes([self.byte(WHAT)?])).ok(),
            2 => Some(u64::from(u16::from_le_bytes(self.array(WHAT)?))),
            3 => u64::try_from(i16::from_le_bytes(self.array(WHAT)?)).ok(),
            4 => Some(u64::from(u32::from_le_bytes(self.array(WHAT)?))),
            5 => u64::try_from(i32::from_le_bytes(self.array(WHAT)?)).ok(),
            10 => Some(u64::from_le_bytes(self.array(WHAT)?)),
            11 => u64::try_from(i64::from_le_bytes(self.array(WHAT)?)).ok(),
            other => {
                self.skip_value(other, index)?;
                None
            }
        })
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, GgufError> {
        let [b] = self.array(what)?;
        Ok(b)
    }

    fn skip_value(&mut self, value_type: u32, index: u64) -> Result<(), GgufError> {
        let path = self.path;
        let bad_type = |value_type| GgufError::BadValueType {
            path: path.to_path_buf(),
            index,
            value_type,
        };
        if let Some(size) = scalar_size(value_type) {
            return self.skip(size, "metadata value");
        }
        match value_type {
            TYPE_STRING => {
                let len = self.u64("metadata string length")?;
                self.skip(len, "metadata string")
            }
            TYPE_ARRAY => {
                let elem_type = self.u32("metadata array type")?;
                let count = self.u64("metadata array length")?;
                if let Some(size) = scalar_size(elem_type) {
                    // An overflowing byte count cannot fit in any file.
                    let total = count.saturating_mul(size);
                    self.skip(total, "metadata array")
                } else if elem_type == TYPE_STRING {
                    // Each element needs at least its 8-byte length.
                    self.ensure(count.saturating_mul(8), "metadata string array")?;
                    for _ in 0..count {
                        let len = self.u64("metadata string length")?;
                        self.skip(len, "metadata string")?;
                    }
                    Ok(())
                } else {
                    Err(bad_type(elem_type))
                }
            }
            other => Err(bad_type(other)),
        }
    }
}

/// Opens `path` and returns a buffered reader plus the file length.
fn open(path: &Path) -> Result<(BufReader<File>, u64), GgufError> {
    let io_err = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    Ok((BufReader::with_capacity(1 << 16, file), file_len))
}

/// Streams the header of a GGUF file up to `stop`.
fn scan<R: Read>(reader: &mut Reader<'_, R>, stop: Stop) -> Result<GgufLayout, GgufError> {
    let path = reader.path;
    let mut magic = [0u8; 4];
    let got = read_upto(&mut reader.inner, &mut magic).map_err(|source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if got < magic.len() || magic != GGUF_MAGIC {
        return Err(GgufError::NotGguf {
            path: path.to_path_buf(),
            found: magic[..got].to_vec(),
        });
    }
    if let Some(hasher) = &mut reader.hasher {
        hasher.update(magic);
    }
    reader.pos = 4;

    let version = reader.u32("GGUF version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let tensor_count = reader.u64("tensor count")?;
    let kv_count = reader.u64("metadata count")?;
    // Each pair needs at least a key length and a value type.
    reader.ensure(kv_count.saturating_mul(12), "metadata")?;

    let mut alignment = DEFAULT_ALIGNMENT;
    let mut file_type = None;
    for index in 0..kv_count {
        let (_, key) = reader.string_upto(KEY_ALIGNMENT.len() as u64, "metadata key")?;
        let value_type = reader.u32("metadata value type")?;
        match key.as_deref() {
            Some(KEY_ALIGNMENT) => {
                if value_type != TYPE_UINT32 {
                    return Err(GgufError::AlignmentNotU32 {
                        path: path.to_path_buf(),
                        value_type,
                    });
                }
                let value = reader.u32("general.alignment")?;
                if !value.is_power_of_two() {
                    return Err(GgufError::AlignmentNotPowerOfTwo {
                        path: path.to_path_buf(),
                        alignment: value,
                    });
                }
                alignment = u64::from(value);
            }
            Some(KEY_FILE_TYPE) => file_type = reader.int_value(value_type, index)?,
            _ => reader.skip_value(value_type, index)?,
        }
    }

    let mut layout = GgufLayout {
        file_type,
        tensor_infos_end: reader.pos,
        data_start: reader.pos,
        first_tensor: None,
    };
    if stop == Stop::AfterMetadata {
        return Ok(layout);
    }

    // name length + n_dims + type + offset, at the least.
    reader.ensure(tensor_count.saturating_mul(24), "tensor infos")?;
    for i in 0..tensor_count {
        let (name_len, name_bytes) = reader.string_upto(MAX_NAME_READ, "tensor name")?;
        let n_dims = reader.u32("tensor dimension count")?;
        let name = || match &name_bytes {
            Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            None => format!("<{name_len}-byte name>"),
        };
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                path: path.to_path_buf(),
                tensor: name(),
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(reader.u64("tensor dimension")?);
        }
        let ggml_type = reader.u32("tensor type")?;
        let offset = reader.u64("tensor offset")?;
        if i == 0 {
            let nbytes = tensor_nbytes(path, &name(), &dims, ggml_type)?;
            layout.first_tensor = Some(FirstTensor {
                name: name(),
                offset,
                nbytes,
            });
        }
    }
    layout.tensor_infos_end = reader.pos;
    // An overflowing data start lies beyond any file; the bounds check on
    // the first tensor reports it.
    layout.data_start = reader
        .pos
        .checked_next_multiple_of(alignment)
        .unwrap_or(u64::MAX);
    Ok(layout)
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_upto(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// `ggml_nbytes` for a contiguous tensor: bytes per row times rows.
fn tensor_nbytes(path: &Path, name: &str, dims: &[u64], ggml_type: u32) -> Result<u64, GgufError> {
    let (block, type_size) =
        ggml_type_block(ggml_type).ok_or_else(|| GgufError::UnknownTensorType {
            path: path.to_path_buf(),
            tensor: name.to_owned(),
            ggml_type,
        })?;
    let bad_shape = || GgufError::BadTensorShape {
        path: path.to_path_buf(),
        tensor: name.to_owned(),
        dims: dims.to_vec(),
        ggml_type,
    };
    // Missing dimensions are 1, as in gguf.cpp.
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % block != 0 {
        return Err(bad_shape());
    }
    dims.iter()
        .skip(1)
        .try_fold((ne0 / block).checked_mul(type_size), |acc, &d| {
            acc.map(|a| a.checked_mul(d))
        })
        .flatten()
        .ok_or_else(bad_shape)
}

/// Reads `general.file_type` (a `llama_ftype` number) from a GGUF file;
/// `None` when the key is absent, negative or not an integer.
pub(crate) fn read_file_type(path: &Path) -> Result<Option<u64>, GgufError> {
    let (inner, file_len) = open(path)?;
    let mut reader = Reader {
        inner,
        pos: 0,
        file_len,
        hasher: None,
        path,
    };
    Ok(scan(&mut reader, Stop::AfterMetadata)?.file_type)
}

/// SHA-256 over bytes `[0, tensor_infos_end)` (header, metadata, tensor
/// infos; not the alignment padding) followed by the first tensor's data
/// bytes `[data_start + offset, data_start + offset + nbytes)`. A file with
/// no tensors hashes its header sections only.
pub(crate) fn chunked_digest(path: &Path) -> Result<[u8; 32], GgufError> {
    let (inner, file_len) = open(path)?;
    let mut reader = Reader {
        inner,
        pos: 0,
        file_len,
        hasher: Some(Sha256::new()),
        path,
    };
    let layout = scan(&mut reader, Stop::AfterTensorInfos)?;
    let mut hasher = reader.hasher.take().unwrap_or_default();
    if let Some(first) = &layout.first_tensor {
        let start = layout.data_start.saturating_add(first.offset);
        let end = start.saturating_add(first.nbytes);
        if end > file_len {
            return Err(GgufError::TensorOutOfBounds {
                path: path.to_path_buf(),
                tensor: first.name.clone(),
                start,
                end,
                file_len,
            });
        }
        let io_err = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = reader.inner.into_inner();
        file.seek(SeekFrom::Start(start)).map_err(io_err)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = first.nbytes;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..k]).map_err(|source| {
                if source.kind() == io::ErrorKind::UnexpectedEof {
                    GgufError::TensorOutOfBounds {
                        path: path.to_path_buf(),
                        tensor: first.name.clone(),
                        start,
                        end,
                        file_len,
                    }
                } else {
                    io_err(source)
                }
            })?;
            hasher.update(&buf[..k]);
            left -= k as u64;
        }
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A little GGUF writer for tests.
    #[derive(Default)]
    pub(crate) struct GgufBuilder {
        pub version: u32,
        kvs: Vec<u8>,
        kv_count: u64,
        infos: Vec<u8>,
        tensor_count: u64,
        pub alignment: u64,
    }

    impl GgufBuilder {
        pub fn new() -> Self {
            GgufBuilder {
                version: 3,
                alignment: 32,
                ..Default::default()
            }
        }

        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }

        /// Adds a raw key/value: `value` is the encoded value after the type.
        pub fn kv_raw(&mut self, key: &str, value_type: u32, value: &[u8]) -> &mut Self {
            Self::string(&mut self.kvs, key);
            self.kvs.extend_from_slice(&value_type.to_le_bytes());
            self.kvs.extend_from_slice(value);
            self.kv_count += 1;
            self
        }

        pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
            if key == "general.alignment" {
                self.alignment = u64::from(v);
            }
            self.kv_raw(key, 4, &v.to_le_bytes())
        }

        pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
            let mut value = Vec::new();
            Self::string(&mut value, v);
            self.kv_raw(key, 8, &value)
        }

        pub fn kv_str_array(&mut self, key: &str, items: &[&str]) -> &mut Self {
            let mut value = Vec::new();
            value.extend_from_slice(&8u32.to_le_bytes());
            value.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                Self::string(&mut value, item);
            }
            self.kv_raw(key, 9, &value)
        }

        pub fn tensor(
            &mut self,
            name: &str,
            dims: &[u64],
            ggml_type: u32,
            offset: u64,
        ) -> &mut Self {
            Self::string(&mut self.infos, name);
            self.infos
                .extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend_from_slice(&d.to_le_bytes());
            }
            self.infos.extend_from_slice(&ggml_type.to_le_bytes());
            self.infos.extend_from_slice(&offset.to_le_bytes());
            self.tensor_count += 1;
            self
        }

        /// Returns (file bytes, tensor_infos_end, data_start).
        pub fn build(&self, data: &[u8]) -> (Vec<u8>, usize, usize) {
            let mut out = Vec::new();
            out.extend_from_slice(b"GGUF");
            out.extend_from_slice(&self.version.to_le_bytes());
            out.extend_from_slice(&self.tensor_count.to_le_bytes());
            out.extend_from_slice(&self.kv_count.to_le_bytes());
            out.extend_from_slice(&self.kvs);
            out.extend_from_slice(&self.infos);
            let infos_end = out.len();
            // gguf.cpp pads only when there is a data section.
            while self.tensor_count > 0 && out.len() as u64 % self.alignment != 0 {
                out.push(0);
            }
            let data_start = out.len();
            out.extend_from_slice(data);
            (out, infos_end, data_start)
        }
    }

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write");
        f.flush().expect("flush");
        f
    }

    fn sha(parts: &[&[u8]]) -> [u8; 32] {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }

    fn sample() -> (Vec<u8>, usize, usize) {
        let mut b = GgufBuilder::new();
        b.kv_str("general.architecture", "llama")
            .kv_u32("general.file_type", 15)
            .kv_str_array("tokenizer.ggml.tokens", &["a", "bb", "ccc"])
            .kv_u32("general.alignment", 64)
            // f32 [4, 2] = 32 bytes, then q4_0 [64] = 2 blocks = 36 bytes.
            .tensor("token_embd.weight", &[4, 2], 0, 0)
            .tensor("output.weight", &[64], 2, 64);
        let data: Vec<u8> = (0..100u8).collect();
        b.build(&data)
    }

    #[test]
    fn chunked_hashes_header_sections_and_first_tensor() {
        let (bytes, infos_end, data_start) = sample();
        assert_eq!(data_start % 64, 0);
        let f = write(&bytes);
        let expected = sha(&[&bytes[..infos_end], &bytes[data_start..data_start + 32]]);
        assert_eq!(chunked_digest(f.path()).expect("digest"), expected);
        assert_eq!(read_file_type(f.path()).expect("file type"), Some(15));
    }

    #[test]
    fn chunked_changes_with_first_tensor_bytes_only() {
        let (mut bytes, _, data_start) = sample();
        let base = chunked_digest(write(&bytes).path()).expect("digest");
        // A byte of the second tensor does not count ...
        bytes[data_start + 64] ^= 1;
        assert_eq!(chunked_digest(write(&bytes).path()).expect("digest"), base);
        // ... a byte of the first one does.
        bytes[data_start + 31] ^= 1;
        assert_ne!(chunked_digest(write(&bytes).path()).expect("digest"), base);
    }

    #[test]
    fn no_tensors_hashes_metadata_only() {
        let mut b = GgufBuilder::new();
        b.kv_str("general.name", "x");
        let (bytes, infos_end, _) = b.build(&[]);
        assert_eq!(infos_end, bytes.len());
        let f = write(&bytes);
        assert_eq!(chunked_digest(f.path()).expect("digest"), sha(&[&bytes]));
        assert_eq!(read_file_type(f.path()).expect("file type"), None);
    }

    #[test]
    fn default_alignment_is_32_and_v2_is_accepted() {
        let mut b = GgufBuilder::new();
        b.version = 2;
        b.tensor("t", &[3], 0, 0);
        let (bytes, infos_end, data_start) = b.build(&[7u8; 12]);
        assert_eq!(data_start % 32, 0);
        let expected = sha(&[&bytes[..infos_end], &bytes[data_start..data_start + 12]]);
        assert_eq!(
            chunked_digest(write(&bytes).path()).expect("digest"),
            expected
        );
    }

    #[test]
    fn file_type_accepts_other_integer_widths() {
        let mut b = GgufBuilder::new();
        b.kv_raw("general.file_type", 5, &7i32.to_le_bytes());
        assert_eq!(
            read_file_type(write(&b.build(&[]).0).path()).expect("ok"),
            Some(7)
        );
        let mut b = GgufBuilder::new();
        b.kv_raw("general.file_type", 5, &(-1i32).to_le_bytes());
        assert_eq!(
            read_file_type(write(&b.build(&[]).0).path()).expect("ok"),
            None
        );
        let mut b = GgufBuilder::new();
        b.kv_str("general.file_type", "q4");
        assert_eq!(
            read_file_type(write(&b.build(&[]).0).path()).expect("ok"),
            None
        );
    }

    #[test]
    fn errors() {
        let check = |bytes: &[u8]| chunked_digest(write(bytes).path());

        assert!(matches!(check(b"GGU"), Err(GgufError::NotGguf { found, .. }) if found == b"GGU"));
        assert!(matches!(
            check(b"KVC\x01...."),
            Err(GgufError::NotGguf { .. })
        ));

        let mut b = GgufBuilder::new();
        b.version = 1;
        assert!(matches!(
            check(&b.build(&[]).0),
            Err(GgufError::UnsupportedVersion { version: 1, .. })
        ));
        b.version = 0x0300_0000;
        assert!(matches!(
            check(&b.build(&[]).0),
            Err(GgufError::UnsupportedVersion { .. })
        ));

        let (bytes, _, _) = sample();
        for cut in [5, 20, 30, 60, 200] {
            assert!(
                matches!(check(&bytes[..cut]), Err(GgufError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        // Data shorter than the first tensor.
        let (_, _, data_start) = sample();
        assert!(matches!(
            check(&bytes[..data_start + 31]),
            Err(GgufError::TensorOutOfBounds { .. })
        ));

        let mut b = GgufBuilder::new();
        b.kv_raw("x", 13, &[]);
        assert!(matches!(
            check(&b.build(&[]).0),
            Err(GgufError::BadValueType {
                index: 0,
                value_type: 13,
                ..
            })
        ));
        let mut b = GgufBuilder::new();
        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend_from_slice(&0u64.to_le_bytes());
        b.kv_raw("x", 9, &nested);
        assert!(matches!(
            check(&b.build(&[]).0),
            Err(GgufError::BadValueType { value_type: 9, .. })
        ));

        let mut b = GgufBuilder::new();
        b.kv_raw("general.alignment", 10, &32u64.to_le_bytes());
        assert!(matches!(
            check(&b.build(&[]).0),
            Err(GgufError::AlignmentNotU32 { value_type: 10, .. })
        ));
        let mut b = GgufBuilder::new();
        b.kv_raw("general.alignment", 4, &24u32.to_le_bytes());
        assert!(matches!(
            check(&b.build(&[]).0),
            Err(GgufError::AlignmentNotPowerOfTwo { alignment: 24, .. })
        ));

        let mut b = GgufBuilder::new();
        b.tensor("t", &[1, 1, 1, 1, 1], 0, 0);
        assert!(matches!(
            check(&b.build(&[0; 4]).0),
            Err(GgufError::TooManyDims { n_dims: 5, .. })
        ));
        let mut b = GgufBuilder::new();
        b.tensor("t", &[1], 4, 0);
        assert!(matches!(
            check(&b.build(&[0; 4]).0),
            Err(GgufError::UnknownTensorType { ggml_type: 4, .. })
        ));
        let mut b = GgufBuilder::new();
        b.tensor("t", &[33], 2, 0);
        assert!(matches!(
            check(&b.build(&[0; 64]).0),
            Err(GgufError::BadTensorShape { .. })
        ));
        let mut b = GgufBuilder::new();
        b.tensor("t", &[u64::MAX, 4], 0, 0);
        assert!(matches!(
            check(&b.build(&[0; 64]).0),
            Err(GgufError::BadTensorShape { .. })
        ));

        // A string length far beyond the file fails fast.
        let mut b = GgufBuilder::new();
        b.kv_raw("x", 8, &u64::MAX.to_le_bytes());
        assert!(matches!(
            check(&b.build(&[]).0),
            Err(GgufError::Truncated { .. })
        ));

        assert!(matches!(
            chunked_digest(Path::new("/nonexistent/erllama/model.gguf")),
            Err(GgufError::Io { .. })
        ));
    }

    #[test]
    fn type_table_spot_checks() {
        // Values from sizeof(block_*) in ggml-common.h.
        assert_eq!(ggml_type_block(2), Some((32, 18)));
        assert_eq!(ggml_type_block(12), Some((256, 144)));
        assert_eq!(ggml_type_block(14), Some((256, 210)));
        assert_eq!(ggml_type_block(30), Some((1, 2)));
        assert_eq!(ggml_type_block(4), None);
        assert_eq!(ggml_type_block(43), None);
    }
}
