//! LoRA adapters: loading one for a [`Model`] and the handle contexts apply.
//!
//! `llama-cpp-2` 0.1.160 loads adapters only through `&mut LlamaModel`,
//! which a shared [`Model`] never hands out, so [`Model::load_lora`] calls
//! `llama_adapter_lora_init` itself on the model's raw pointer, serialised
//! with everything else that touches llama.cpp's per-model adapter set (see
//! `ModelInner::new_context_lock`).
//!
//! Before llama.cpp sees a file, its GGUF header is walked here: llama.cpp
//! reads `general.type`, `general.architecture`, `adapter.type` and
//! `adapter.lora.alpha` with type assertions that abort the process on a
//! value of the wrong type. Everything else llama.cpp checks itself and
//! reports (tensor names, pairs and shapes, file bounds), which surfaces as
//! [`LlamaError::LoraLoad`].

use std::ffi::CString;
use std::fs::File;
use std::io::{BufReader, Read};
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_sys_2::{llama_adapter_lora, llama_model};

use crate::error::{LlamaError, Result};
use crate::model::{check_gguf, Model};

// `LlamaModel` (0.1.160) is `#[repr(transparent)] struct { model:
// Ptr<llama_model> }` and `Ptr<T>` is `#[repr(transparent)] struct
// (NonNull<T>)`; `LlamaLoraAdapter` is the same around
// `Ptr<llama_adapter_lora>`. The exact crate version is pinned (`=0.1.160`
// in the workspace manifest); these size checks fail the build should a
// field ever be added.
const _: () = assert!(size_of::<LlamaModel>() == size_of::<NonNull<llama_model>>());
const _: () = assert!(size_of::<LlamaLoraAdapter>() == size_of::<NonNull<llama_adapter_lora>>());

/// The raw `llama_model *` behind a loaded model.
pub(crate) fn raw_model(model: &LlamaModel) -> NonNull<llama_model> {
    // SAFETY: `LlamaModel` has exactly one field, a `Ptr<llama_model>`, and
    // both it and `Ptr` are `#[repr(transparent)]` over `NonNull<llama_model>`
    // (llama-cpp-2 =0.1.160, pinned; the sizes are asserted equal at compile
    // time above), so its bytes are that one pointer at offset 0.
    // `transmute_copy` only reads them (unaligned-safe); `LlamaModel` is not
    // duplicated and its `Drop` is unaffected.
    unsafe { std::mem::transmute_copy::<LlamaModel, NonNull<llama_model>>(model) }
}

/// The raw `llama_adapter_lora *` behind an adapter wrapper.
fn raw_adapter(adapter: &LlamaLoraAdapter) -> NonNull<llama_adapter_lora> {
    // SAFETY: as for `raw_model`: `LlamaLoraAdapter` is a `#[repr(transparent)]`
    // single field `Ptr<llama_adapter_lora>`, itself transparent over
    // `NonNull<llama_adapter_lora>` (sizes asserted above); only the pointer
    // value is read.
    unsafe { std::mem::transmute_copy::<LlamaLoraAdapter, NonNull<llama_adapter_lora>>(adapter) }
}

/// A LoRA adapter loaded for one [`Model`]. Cheap to clone; the adapter is
/// freed when the last clone (and the last [`crate::Session`] it is applied
/// to) is gone. It keeps its model alive.
#[derive(Clone)]
pub struct LoraAdapter {
    inner: Arc<LoraInner>,
}

struct LoraInner {
    // Field order matters: `Drop for LoraInner` frees the adapter first;
    // `model`, whose weights and adapter set the adapter belongs to, drops
    // last.
    /// The wrapper `llama-cpp-2` wants as `&mut` to apply or remove it.
    /// llama.cpp only reads the adapter once loaded; the lock exists only
    /// to hand out that `&mut`.
    adapter: Mutex<LlamaLoraAdapter>,
    path: PathBuf,
    alpha: Option<f32>,
    model: Model,
}

impl Drop for LoraInner {
    fn drop(&mut self) {
        let raw = raw_adapter(
            self.adapter
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let _guard = self.model.inner.lock_model_state();
        // SAFETY: `raw` came from a successful `llama_adapter_lora_init` on
        // `self.model`, which is still alive (dropped after this), and is
        // freed exactly once, here: `LlamaLoraAdapter` has no `Drop` of its
        // own. No context still applies it: every `Session` that applies an
        // adapter holds a clone of its `LoraAdapter`, so the last clone goes
        // only after those sessions dropped it. The model's adapter set,
        // which this erases from, is guarded by `new_context_lock`.
        unsafe { llama_cpp_sys_2::llama_adapter_lora_free(raw.as_ptr()) };
    }
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("path", &self.inner.path)
            .field("alpha", &self.inner.alpha)
            .finish_non_exhaustive()
    }
}

impl LoraAdapter {
    /// The file the adapter was loaded from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `adapter.lora.alpha` from the file, when it has one (llama.cpp then
    /// scales the update by `alpha / rank` on top of the applied scale).
    #[must_use]
    pub fn alpha(&self) -> Option<f32> {
        self.inner.alpha
    }

    /// The model the adapter belongs to.
    #[must_use]
    pub fn model(&self) -> &Model {
        &self.inner.model
    }

    /// Whether the adapter was loaded for `model` (the same loaded
    /// instance, not merely the same file).
    #[must_use]
    pub fn belongs_to(&self, model: &Model) -> bool {
        Arc::ptr_eq(&self.inner.model.inner, &model.inner)
    }

    /// Whether `self` and `other` are the same loaded adapter.
    #[must_use]
    pub fn same_as(&self, other: &LoraAdapter) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Runs `f` with the `llama-cpp-2` wrapper (for `lora_adapter_set` /
    /// `lora_adapter_remove`).
    pub(crate) fn with_raw<T>(&self, f: impl FnOnce(&mut LlamaLoraAdapter) -> T) -> T {
        let mut guard = self
            .inner
            .adapter
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }
}

impl Model {
    /// Loads a LoRA adapter (a llama.cpp LoRA GGUF, `general.type =
    /// "adapter"`, `adapter.type = "lora"`) for this model. Apply it to a
    /// session with [`crate::Session::set_lora`].
    ///
    /// # Errors
    ///
    /// [`LlamaError::LoraLoad`] for a path that is missing or unreadable, a
    /// file that is not GGUF or not a LoRA adapter, an adapter of another
    /// architecture, or one whose tensors do not match this model (llama.cpp
    /// logs the details through `tracing`).
    pub fn load_lora(&self, path: impl AsRef<Path>) -> Result<LoraAdapter> {
        let path = path.as_ref();
        let fail = |reason: String| LlamaError::LoraLoad {
            path: path.to_path_buf(),
            reason,
        };
        check_gguf(path).map_err(|e| {
            fail(match e {
                LlamaError::ModelNotFound(_) => "file not found".into(),
                LlamaError::ModelUnreadable { source, .. } => format!("cannot read it: {source}"),
                LlamaError::NotGguf { reason, .. } => format!("not a GGUF file: {reason}"),
                other => other.to_string(),
            })
        })?;
        let header = read_adapter_header(path).map_err(fail)?;
        let arch = &self.meta().architecture;
        if &header.architecture != arch {
            return Err(fail(format!(
                "the adapter is for architecture {:?}, the model is {arch:?}",
                header.architecture
            )));
        }
        let cpath = path
            .to_str()
            .ok_or_else(|| fail("the path is not valid UTF-8".into()))
            .and_then(|s| {
                CString::new(s).map_err(|_| fail("the path contains a NUL byte".into()))
            })?;
        let model_ptr = raw_model(&self.inner.model);
        let raw = {
            let _guard = self.inner.lock_model_state();
            // SAFETY: `model_ptr` is the live model owned by `self.inner`
            // (kept alive by `&self`); `cpath` is a NUL-terminated path that
            // outlives the call. llama.cpp reads the file, validates it
            // (reporting failures as NULL) and inserts the adapter into the
            // model's adapter set — a mutation of C++ state that is
            // serialised with context creation and the other adapter calls
            // by `new_context_lock`, held here. The header check above ruled
            // out the metadata llama.cpp would abort on.
            unsafe { llama_cpp_sys_2::llama_adapter_lora_init(model_ptr.as_ptr(), cpath.as_ptr()) }
        };
        let raw = NonNull::new(raw).ok_or_else(|| {
            fail(
                "llama.cpp rejected it (its tensors do not match this model, or the file is \
                 damaged; the llama.cpp log has details)"
                    .into(),
            )
        })?;
        // SAFETY: `LlamaLoraAdapter` is a `#[repr(transparent)]` wrapper of
        // one `Ptr<llama_adapter_lora>`, itself transparent over
        // `NonNull<llama_adapter_lora>` (llama-cpp-2 =0.1.160; `transmute`
        // checks the sizes), so this builds exactly the value its own
        // `lora_adapter_init` returns. It has no `Drop`: `LoraInner` frees
        // the adapter, once.
        let adapter =
            unsafe { std::mem::transmute::<NonNull<llama_adapter_lora>, LlamaLoraAdapter>(raw) };
        tracing::debug!(path = %path.display(), "loaded LoRA adapter");
        Ok(LoraAdapter {
            inner: Arc::new(LoraInner {
                adapter: Mutex::new(adapter),
                path: path.to_path_buf(),
                alpha: header.alpha,
                model: self.clone(),
            }),
        })
    }
}

/// What the GGUF header of an adapter declares.
#[derive(Debug, Default)]
struct AdapterHeader {
    architecture: String,
    alpha: Option<f32>,
}

/// GGUF value types.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Longest key or string value read into memory.
const MAX_STRING: u64 = 1 << 20;
/// Most metadata pairs accepted.
const MAX_KV: u64 = 1 << 16;

/// Walks the metadata of the GGUF at `path` and checks the keys llama.cpp
/// reads with type assertions: `general.type` must be the string
/// `"adapter"`, `adapter.type` the string `"lora"`, `general.architecture`
/// a string, `adapter.lora.alpha` (optional) an f32.
fn read_adapter_header(path: &Path) -> std::result::Result<AdapterHeader, String> {
    let file = File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut r = BufReader::new(file);
    let truncated = |_| "the GGUF header is truncated".to_string();
    let u32_ = |r: &mut BufReader<File>| -> std::result::Result<u32, String> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(truncated)?;
        Ok(u32::from_le_bytes(b))
    };
    let u64_ = |r: &mut BufReader<File>| -> std::result::Result<u64, String> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).map_err(truncated)?;
        Ok(u64::from_le_bytes(b))
    };
    let string = |r: &mut BufReader<File>| -> std::result::Result<String, String> {
        let n = u64_(r)?;
        if n > MAX_STRING {
            return Err(format!("a GGUF string of {n} bytes is implausibly long"));
        }
        let mut b = vec![0u8; usize::try_from(n).unwrap_or(0)];
        r.read_exact(&mut b).map_err(truncated)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    };
    let skip = |r: &mut BufReader<File>, n: u64| -> std::result::Result<(), String> {
        let n = i64::try_from(n).map_err(|_| "a GGUF array is implausibly large".to_string())?;
        r.seek_relative(n)
            .map_err(|e| format!("cannot read it: {e}"))
    };
    let scalar_size = |t: u32| -> Option<u64> {
        match t {
            T_U8 | T_I8 | T_BOOL => Some(1),
            T_U16 | T_I16 => Some(2),
            T_U32 | T_I32 | T_F32 => Some(4),
            T_U64 | T_I64 | T_F64 => Some(8),
            _ => None,
        }
    };

    let _magic_and_version = u64_(&mut r)?;
    let _n_tensors = u64_(&mut r)?;
    let n_kv = u64_(&mut r)?;
    if n_kv > MAX_KV {
        return Err(format!("{n_kv} metadata pairs is implausibly many"));
    }
    let mut general_type = None;
    let mut adapter_type = None;
    let mut architecture = None;
    let mut alpha = None;
    for _ in 0..n_kv {
        let key = string(&mut r)?;
        let ty = u32_(&mut r)?;
        let wants = |want: u32, name: &str| {
            if ty == want {
                Ok(())
            } else {
                Err(format!(
                    "metadata {key:?} must be {name} (GGUF type {want}), got type {ty}"
                ))
            }
        };
        match key.as_str() {
            "general.type" | "adapter.type" | "general.architecture" => {
                wants(T_STRING, "a string")?;
                let v = string(&mut r)?;
                match key.as_str() {
                    "general.type" => general_type = Some(v),
                    "adapter.type" => adapter_type = Some(v),
                    _ => architecture = Some(v),
                }
                continue;
            }
            "adapter.lora.alpha" => {
                wants(T_F32, "an f32")?;
                let bits = u32_(&mut r)?;
                alpha = Some(f32::from_bits(bits));
                continue;
            }
            _ => {}
        }
        match ty {
            T_STRING => {
                let n = u64_(&mut r)?;
                skip(&mut r, n)?;
            }
            T_ARRAY => {
                let et = u32_(&mut r)?;
                let n = u64_(&mut r)?;
                if et == T_STRING {
                    for _ in 0..n {
                        let len = u64_(&mut r)?;
                        skip(&mut r, len)?;
                    }
                } else {
                    let size = scalar_size(et)
                        .ok_or_else(|| format!("metadata {key:?} is an array of type {et}"))?;
                    let bytes = n
                        .checked_mul(size)
                        .ok_or_else(|| format!("metadata {key:?} is implausibly large"))?;
                    skip(&mut r, bytes)?;
                }
            }
            t => {
                let size =
                    scalar_size(t).ok_or_else(|| format!("metadata {key:?} has type {t}"))?;
                skip(&mut r, size)?;
            }
        }
    }
    match general_type.as_deref() {
        Some("adapter") => {}
        Some(other) => {
            return Err(format!(
                "not an adapter (general.type is {other:?}, expected \"adapter\")"
            ))
        }
        None => return Err("not an adapter (no general.type)".into()),
    }
    match adapter_type.as_deref() {
        Some("lora") => {}
        Some(other) => {
            return Err(format!(
                "not a LoRA adapter (adapter.type is {other:?}, expected \"lora\")"
            ))
        }
        None => return Err("not a LoRA adapter (no adapter.type)".into()),
    }
    let architecture =
        architecture.ok_or_else(|| "the adapter has no general.architecture".to_string())?;
    Ok(AdapterHeader {
        architecture,
        alpha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf(kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for (k, t, v) in kvs {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        b
    }

    fn s(v: &str) -> Vec<u8> {
        let mut b = (v.len() as u64).to_le_bytes().to_vec();
        b.extend(v.as_bytes());
        b
    }

    fn check(bytes: &[u8]) -> std::result::Result<AdapterHeader, String> {
        let dir = std::env::temp_dir().join(format!(
            "erllama-lora-hdr-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.gguf");
        std::fs::write(&p, bytes).unwrap();
        let r = read_adapter_header(&p);
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    #[test]
    fn adapter_headers_are_checked() {
        let mut arr = T_U32.to_le_bytes().to_vec();
        arr.extend(2u64.to_le_bytes());
        arr.extend([0u8; 8]);
        let mut sarr = T_STRING.to_le_bytes().to_vec();
        sarr.extend(2u64.to_le_bytes());
        sarr.extend(s("x"));
        sarr.extend(s("yz"));
        let good = gguf(&[
            ("general.architecture", T_STRING, s("llama")),
            ("some.array", T_ARRAY, arr),
            ("some.strings", T_ARRAY, sarr),
            ("some.u64", T_U64, vec![0; 8]),
            ("general.type", T_STRING, s("adapter")),
            ("adapter.type", T_STRING, s("lora")),
            ("adapter.lora.alpha", T_F32, 8.0f32.to_le_bytes().to_vec()),
        ]);
        let h = check(&good).unwrap();
        assert_eq!(h.architecture, "llama");
        assert_eq!(h.alpha, Some(8.0));

        let model = gguf(&[
            ("general.architecture", T_STRING, s("llama")),
            ("general.type", T_STRING, s("model")),
        ]);
        assert!(check(&model).unwrap_err().contains("not an adapter"));
        let wrong_type = gguf(&[("general.type", T_U32, vec![0; 4])]);
        assert!(check(&wrong_type).unwrap_err().contains("must be a string"));
        let bad_alpha = gguf(&[("adapter.lora.alpha", T_F64, vec![0; 8])]);
        assert!(check(&bad_alpha).unwrap_err().contains("must be an f32"));
        let not_lora = gguf(&[
            ("general.architecture", T_STRING, s("llama")),
            ("general.type", T_STRING, s("adapter")),
            ("adapter.type", T_STRING, s("control_vector")),
        ]);
        assert!(check(&not_lora).unwrap_err().contains("not a LoRA"));
        let truncated = &good[..good.len() - 3];
        assert!(check(truncated).unwrap_err().contains("truncated"));
        let mut huge = gguf(&[]);
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check(&huge).unwrap_err().contains("implausibly"));
    }
}
