//! Loading a GGUF model, its metadata, and its vocabulary.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use crate::backend::backend;
use crate::error::{LlamaError, Result};

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct ModelParams {
    /// Layers to offload to a GPU (0 on a CPU-only build).
    pub n_gpu_layers: u32,
    /// Map the file instead of reading it into memory.
    pub use_mmap: bool,
    /// Lock the model's memory so it cannot be swapped out.
    pub use_mlock: bool,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self {
            n_gpu_layers: 0,
            use_mmap: true,
            use_mlock: false,
        }
    }
}

/// Metadata read from a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMeta {
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// `general.name`, or the file stem when absent.
    pub name: String,
    /// Quantisation label in the cache's spelling (`q4_1`, `q4_k_m`, `f16`, ...),
    /// or `unknown`.
    pub quant_type: String,
    /// Context length the model was trained with.
    pub n_ctx_train: u32,
    /// Vocabulary size; valid token ids are `0..n_vocab`.
    pub n_vocab: u32,
    /// Number of transformer layers.
    pub n_layer: u32,
    /// Embedding width.
    pub n_embd: u32,
    /// Parameter count.
    pub n_params: u64,
    /// Size of the weights in bytes.
    pub size_bytes: u64,
    /// Whether the GGUF carries a chat template.
    pub has_chat_template: bool,
}

pub(crate) struct ModelInner {
    pub(crate) model: LlamaModel,
    path: PathBuf,
    meta: ModelMeta,
    /// Serialises what touches llama.cpp's mutable per-model state (the
    /// set of loaded LoRA adapters, which context creation and a context's
    /// first decode after an adapter change read): context creation,
    /// adapter load and free, and that first decode.
    pub(crate) new_context_lock: Mutex<()>,
    /// Whether the model's state can be cached (probed once, on demand).
    cache_support: std::sync::OnceLock<crate::state::CacheSupport>,
}

impl ModelInner {
    /// Holds [`ModelInner::new_context_lock`] (recovered if poisoned: it
    /// guards no data of its own).
    pub(crate) fn lock_model_state(&self) -> std::sync::MutexGuard<'_, ()> {
        self.new_context_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A loaded GGUF model. Cheap to clone; the weights are shared and freed when
/// the last clone (and the last session using it) is dropped.
#[derive(Clone)]
pub struct Model {
    pub(crate) inner: Arc<ModelInner>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.inner.path)
            .field("meta", &self.inner.meta)
            .finish()
    }
}

/// Checks that `path` names a readable GGUF file before llama.cpp sees it.
///
/// The path must be a regular file (after following symlinks): a FIFO, a
/// device, a socket or a directory is refused from its metadata alone,
/// without opening it (opening a FIFO for reading blocks until a writer
/// comes). The file is then opened non-blocking and checked again through
/// the descriptor, so a path swapped in between cannot block either.
pub(crate) fn check_gguf(path: &Path) -> Result<()> {
    let not_regular = || LlamaError::NotGguf {
        path: path.to_path_buf(),
        reason: "not a regular file (a FIFO, device, socket or directory)".into(),
    };
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Err(not_regular()),
        Ok(_) => {}
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(LlamaError::ModelNotFound(path.to_path_buf()))
        }
        Err(source) => {
            return Err(LlamaError::ModelUnreadable {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => LlamaError::ModelNotFound(path.to_path_buf()),
            _ => LlamaError::ModelUnreadable {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let not_gguf = |reason: &str| LlamaError::NotGguf {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let is_file = file
        .metadata()
        .map_err(|source| LlamaError::ModelUnreadable {
            path: path.to_path_buf(),
            source,
        })?
        .is_file();
    if !is_file {
        return Err(not_gguf("not a regular file"));
    }
    let mut head = [0u8; 8];
    file.read_exact(&mut head)
        .map_err(|_| not_gguf("file is shorter than a GGUF header"))?;
    if &head[..4] != b"GGUF" {
        return Err(not_gguf("bad magic (expected \"GGUF\")"));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(2..=3).contains(&version) {
        return Err(not_gguf(&format!("unsupported GGUF version {version}")));
    }
    Ok(())
}

/// Maps llama.cpp's `general.file_type` (`llama_ftype`) to the cache's quant label.
fn ftype_label(ftype: u32) -> &'static str {
    match ftype {
        0 => "f32",
        1 => "f16",
        2 => "q4_0",
        3 => "q4_1",
        7 => "q8_0",
        8 => "q5_0",
        9 => "q5_1",
        10 => "q2_k",
        11 => "q3_k_s",
        12 => "q3_k_m",
        13 => "q3_k_l",
        14 => "q4_k_s",
        15 => "q4_k_m",
        16 => "q5_k_s",
        17 => "q5_k_m",
        18 => "q6_k",
        19 => "iq2_xxs",
        20 => "iq2_xs",
        22 => "iq3_xs",
        23 => "iq3_xxs",
        24 => "iq1_s",
        25 => "iq4_nl",
        26 => "iq3_s",
        27 => "iq3_m",
        28 => "iq2_s",
        29 => "iq2_m",
        30 => "iq4_xs",
        31 => "iq1_m",
        32 => "bf16",
        _ => "unknown",
    }
}

impl Model {
    /// Loads a GGUF model.
    ///
    /// # Errors
    ///
    /// [`LlamaError::ModelNotFound`] / [`LlamaError::ModelUnreadable`] for a
    /// path that cannot be opened, [`LlamaError::NotGguf`] for a file that is
    /// not GGUF, [`LlamaError::ModelLoad`] when llama.cpp refuses it.
    pub fn load(path: impl AsRef<Path>, params: &ModelParams) -> Result<Self> {
        let path = path.as_ref();
        check_gguf(path)?;
        if path.to_str().is_none() {
            return Err(LlamaError::ModelLoad {
                path: path.to_path_buf(),
                reason: "the path is not valid UTF-8".into(),
            });
        }
        let backend = backend()?;
        let lparams = LlamaModelParams::default()
            .with_n_gpu_layers(params.n_gpu_layers)
            .with_use_mmap(params.use_mmap)
            .with_use_mlock(params.use_mlock);
        let model = LlamaModel::load_from_file(backend, path, &lparams).map_err(|e| {
            LlamaError::ModelLoad {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let meta = read_meta(&model, path);
        Ok(Self {
            inner: Arc::new(ModelInner {
                model,
                path: path.to_path_buf(),
                meta,
                new_context_lock: Mutex::new(()),
                cache_support: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The path the model was loaded from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The model's metadata.
    #[must_use]
    pub fn meta(&self) -> &ModelMeta {
        &self.inner.meta
    }

    /// Whether this model's state can be cached, its memory kind and why
    /// not: probed once in a small context of default parameters (a
    /// serving context probes its own layout, see
    /// [`crate::Session::cache_support`]).
    #[must_use]
    pub fn cache_support(&self) -> crate::state::CacheSupport {
        self.inner
            .cache_support
            .get_or_init(|| {
                let params = crate::SessionParams {
                    n_ctx: 64,
                    n_batch: 64,
                    n_threads: Some(1),
                    n_seq_max: 1,
                    ..crate::SessionParams::default()
                };
                match crate::Session::new(self, &params) {
                    Ok(session) => session.cache_support(),
                    Err(e) => crate::state::CacheSupport::no(
                        "unknown",
                        format!("cannot create a probe context: {e}"),
                    ),
                }
            })
            .clone()
    }

    /// The sliding-window size of a sliding-window model (0 for none).
    #[must_use]
    pub fn n_swa(&self) -> u32 {
        let raw = crate::lora::raw_model(&self.inner.model);
        // SAFETY: the pointer is the live model `inner` owns (we hold a
        // reference to it for the call); llama_model_n_swa only reads its
        // hyperparameters.
        let n = unsafe { llama_cpp_sys_2::llama_model_n_swa(raw.as_ptr()) };
        u32::try_from(n).unwrap_or(0)
    }

    /// Vocabulary size; valid token ids are `0..n_vocab`.
    #[must_use]
    pub fn n_vocab(&self) -> u32 {
        self.inner.meta.n_vocab
    }

    /// Checks that every id is a valid token of this model.
    ///
    /// # Errors
    ///
    /// [`LlamaError::TokenOutOfRange`] naming the first bad id.
    pub fn check_tokens<T: Copy + Into<i64>>(&self, tokens: &[T]) -> Result<()> {
        let n_vocab = self.n_vocab();
        for (index, &t) in tokens.iter().enumerate() {
            let token: i64 = t.into();
            if token < 0 || token >= i64::from(n_vocab) {
                return Err(LlamaError::TokenOutOfRange {
                    token,
                    index,
                    n_vocab,
                });
            }
        }
        Ok(())
    }

    /// Tokenizes `text`.
    ///
    /// `add_bos` adds the model's beginning-of-sequence token when its
    /// vocabulary asks for one. `special` lets the text spell control tokens
    /// such as `<|im_start|>`; leave it off for user-supplied text so it can
    /// never inject them.
    ///
    /// # Errors
    ///
    /// [`LlamaError::TextTooLarge`] for text beyond llama.cpp's 32-bit limit.
    pub fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Result<Vec<u32>> {
        // llama.cpp counts bytes and tokens in i32; keep well clear of that.
        if text.len() >= (i32::MAX as usize) / 2 {
            return Err(LlamaError::TextTooLarge(text.len()));
        }
        let tokens = self
            .inner
            .model
            .vocab()
            .tokenize(text.as_bytes(), add_bos, special);
        // Token ids from llama.cpp are always in 0..n_vocab.
        Ok(tokens.into_iter().map(|t| t.0.unsigned_abs()).collect())
    }

    /// Turns tokens back into text. `special` renders control tokens as
    /// text; otherwise they render as nothing.
    ///
    /// # Errors
    ///
    /// [`LlamaError::TokenOutOfRange`] for an id outside the vocabulary
    /// (llama.cpp would abort the process on it).
    pub fn detokenize(&self, tokens: &[u32], special: bool) -> Result<String> {
        self.check_tokens(tokens)?;
        if tokens.is_empty() {
            return Ok(String::new());
        }
        let tokens = to_llama(tokens);
        let bytes = self.inner.model.vocab().detokenize(&tokens, false, special);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The raw bytes of one token's text (may be a partial UTF-8 sequence).
    ///
    /// # Errors
    ///
    /// [`LlamaError::TokenOutOfRange`] for an id outside the vocabulary.
    pub fn token_bytes(&self, token: u32, special: bool) -> Result<Vec<u8>> {
        self.check_tokens(&[token])?;
        Ok(self
            .inner
            .model
            .vocab()
            .token_to_piece(LlamaToken(token_i32(token)), special, None))
    }

    /// Whether `token` ends generation (end-of-sequence, end-of-turn, ...).
    /// Ids outside the vocabulary are not end-of-generation tokens.
    #[must_use]
    pub fn is_eog(&self, token: u32) -> bool {
        token < self.n_vocab()
            && self
                .inner
                .model
                .vocab()
                .is_eog(LlamaToken(token_i32(token)))
    }
}

/// Marks where a message's content goes in a rendered template: private-use
/// characters that no template emits, around the message index.
const SLOT_OPEN: char = '\u{F8F0}';
const SLOT_CLOSE: char = '\u{F8F1}';

impl Model {
    /// Renders `messages` (`(role, content)` pairs) through the GGUF's chat
    /// template; `add_assistant` opens the assistant's turn.
    ///
    /// # Errors
    ///
    /// [`LlamaError::NoChatTemplate`], [`LlamaError::ChatTemplate`],
    /// [`LlamaError::InvalidParam`] for text containing NUL bytes.
    pub fn apply_chat_template(
        &self,
        messages: &[(String, String)],
        add_assistant: bool,
    ) -> Result<String> {
        let model = &self.inner.model;
        let tmpl = model
            .chat_template(None)
            .map_err(|_| LlamaError::NoChatTemplate)?;
        let chat = messages
            .iter()
            .map(|(role, content)| {
                LlamaChatMessage::new(role.clone(), content.clone()).map_err(|_| {
                    LlamaError::InvalidParam {
                        name: "messages",
                        reason: "roles and contents must not contain NUL characters".into(),
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        model
            .apply_chat_template(&tmpl, &chat, add_assistant)
            .map_err(|e| LlamaError::ChatTemplate(e.to_string()))
    }

    /// Renders a chat and tokenizes it so that the template's own markup
    /// becomes control tokens while message contents never do: a user who
    /// types `<|im_start|>` gets plain text, not a new turn.
    ///
    /// # Errors
    ///
    /// As [`Model::apply_chat_template`] and [`Model::tokenize`].
    pub fn chat_tokens(
        &self,
        messages: &[(String, String)],
        add_assistant: bool,
    ) -> Result<Vec<u32>> {
        if messages
            .iter()
            .any(|(_, c)| c.contains(SLOT_OPEN) || c.contains(SLOT_CLOSE))
        {
            return Err(LlamaError::InvalidParam {
                name: "messages",
                reason: "message text contains reserved characters U+F8F0/U+F8F1".into(),
            });
        }
        let slotted: Vec<(String, String)> = messages
            .iter()
            .enumerate()
            .map(|(i, (role, _))| (role.clone(), format!("{SLOT_OPEN}{i}{SLOT_CLOSE}")))
            .collect();
        let rendered = self.apply_chat_template(&slotted, add_assistant)?;
        let mut out = Vec::new();
        let mut rest = rendered.as_str();
        let mut first = true;
        while let Some(open) = rest.find(SLOT_OPEN) {
            let markup = &rest[..open];
            if !markup.is_empty() {
                out.extend(self.tokenize(markup, first, true)?);
                first = false;
            }
            let after = &rest[open + SLOT_OPEN.len_utf8()..];
            let close = after.find(SLOT_CLOSE).ok_or_else(|| {
                LlamaError::ChatTemplate("the template altered a message slot".into())
            })?;
            let index: usize = after[..close].parse().map_err(|_| {
                LlamaError::ChatTemplate("the template altered a message slot".into())
            })?;
            let content = &messages
                .get(index)
                .ok_or_else(|| LlamaError::ChatTemplate("unknown message slot".into()))?
                .1;
            if !content.is_empty() {
                out.extend(self.tokenize(content, first, false)?);
                first = false;
            }
            rest = &after[close + SLOT_CLOSE.len_utf8()..];
        }
        if !rest.is_empty() {
            out.extend(self.tokenize(rest, first, true)?);
        }
        Ok(out)
    }
}

/// Token ids passed validation (`< n_vocab <= i32::MAX`), so they fit an i32.
pub(crate) fn token_i32(token: u32) -> i32 {
    i32::try_from(token).unwrap_or(i32::MAX)
}

pub(crate) fn to_llama(tokens: &[u32]) -> Vec<LlamaToken> {
    tokens.iter().map(|&t| LlamaToken(token_i32(t))).collect()
}

fn read_meta(model: &LlamaModel, path: &Path) -> ModelMeta {
    let meta_str = |key: &str| model.meta_val_str(key).ok();
    let quant_type = meta_str("general.file_type")
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or("unknown", ftype_label)
        .to_owned();
    let name = meta_str("general.name").unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    ModelMeta {
        architecture: meta_str("general.architecture").unwrap_or_else(|| "unknown".into()),
        name,
        quant_type,
        n_ctx_train: model.n_ctx_train(),
        n_vocab: u32::try_from(model.n_vocab()).unwrap_or(0),
        n_layer: model.n_layer(),
        n_embd: u32::try_from(model.n_embd()).unwrap_or(0),
        n_params: model.n_params(),
        size_bytes: model.size(),
        has_chat_template: model.chat_template(None).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn missing_file_is_not_found() {
        let err = check_gguf(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(matches!(err, LlamaError::ModelNotFound(_)), "{err}");
    }

    #[test]
    fn junk_file_is_not_gguf() {
        let dir = std::env::temp_dir().join(format!("erllama-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("junk.gguf");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(b"this is not a model at all")
            .unwrap();
        let err = check_gguf(&path).unwrap_err();
        assert!(matches!(err, LlamaError::NotGguf { .. }), "{err}");
        std::fs::write(&path, b"GGUF\x09\x00\x00\x00").unwrap();
        let err = check_gguf(&path).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        std::fs::write(&path, b"GG").unwrap();
        assert!(matches!(check_gguf(&path), Err(LlamaError::NotGguf { .. })));
        assert!(matches!(check_gguf(&dir), Err(LlamaError::NotGguf { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ftype_labels_match_the_cache_table() {
        assert_eq!(ftype_label(3), "q4_1");
        assert_eq!(ftype_label(15), "q4_k_m");
        assert_eq!(ftype_label(32), "bf16");
        assert_eq!(ftype_label(4), "unknown");
    }
}
