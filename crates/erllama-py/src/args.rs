//! Values from Python, checked: every integer, float and string that
//! reaches the engine passes through here, and a value that is out of
//! range, not finite or of the wrong type raises `InvalidInputError` (a
//! `ValueError`) naming the parameter and what it allows — never a bare
//! `OverflowError` or `TypeError` from a conversion.
//!
//! [`RequestArgs`] is the one declaration of the request options
//! (`complete` / `stream`): the `request_options!` table gives each its
//! Python name, Rust type, default and check. Its names and defaults are
//! exported as `_erllama.REQUEST_OPTIONS`, and a test checks them against
//! the Python `CompletionOptions` TypedDict.

use erllama_cache::CacheKey;
use erllama_engine::{
    Breakpoint, FlashAttn, KvType, RequestOptions, SamplingParams, MAX_BREAKPOINTS,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString, PyTuple};
use pyo3::IntoPyObjectExt;

use crate::error::invalid;

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

/// An int in `lo..=hi` (bools are refused).
pub fn int_in(obj: &Bound<'_, PyAny>, name: &str, lo: i128, hi: i128) -> PyResult<i128> {
    let range = || format!("{name} must be an int in {lo}..={hi}");
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(invalid(format!("{}, got {}", range(), type_name(obj))));
    }
    match obj.extract::<i128>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => {
            let shown = obj.repr().map_or_else(|_| "?".into(), |r| r.to_string());
            Err(invalid(format!("{}, got {shown}", range())))
        }
    }
}

/// An int in `lo..=hi` as `u64`.
pub fn u64_in(obj: &Bound<'_, PyAny>, name: &str, lo: u64, hi: u64) -> PyResult<u64> {
    let v = int_in(obj, name, i128::from(lo), i128::from(hi))?;
    // In range by the check above.
    Ok(u64::try_from(v).unwrap_or(hi))
}

/// An int in `lo..=hi` as `usize`.
pub fn usize_in(obj: &Bound<'_, PyAny>, name: &str, lo: usize, hi: usize) -> PyResult<usize> {
    let v = u64_in(obj, name, lo as u64, hi as u64)?;
    Ok(usize::try_from(v).unwrap_or(hi))
}

/// A KV cache type label (`"f16"`, `"q8_0"`, ...; `None` → f16).
pub fn kv_type(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<KvType> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(KvType::F16);
    };
    let labels: Vec<&str> = KvType::ALL.iter().map(|t| t.label()).collect();
    let expected = || format!("{name} must be one of {}", labels.join(", "));
    if !obj.is_instance_of::<PyString>() {
        return Err(invalid(format!("{}, got {}", expected(), type_name(obj))));
    }
    let text: String = obj.extract()?;
    text.parse::<KvType>()
        .map_err(|_| invalid(format!("{}, got {text:?}", expected())))
}

/// A flash-attention setting (`"auto"`, `"on"` or `"off"`); `None` is
/// `"auto"`.
pub fn flash_attn(obj: Option<&Bound<'_, PyAny>>) -> PyResult<FlashAttn> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(FlashAttn::Auto);
    };
    let expected = "flash_attn must be one of auto, on, off";
    if !obj.is_instance_of::<PyString>() {
        return Err(invalid(format!("{expected}, got {}", type_name(obj))));
    }
    let text: String = obj.extract()?;
    text.parse::<FlashAttn>()
        .map_err(|_| invalid(format!("{expected}, got {text:?}")))
}

/// An int in `lo..=hi` as `u32`.
pub fn u32_in(obj: &Bound<'_, PyAny>, name: &str, lo: u32, hi: u32) -> PyResult<u32> {
    let v = u64_in(obj, name, u64::from(lo), u64::from(hi))?;
    Ok(u32::try_from(v).unwrap_or(hi))
}

/// A real number (int or float) that passes `ok`, described by `allowed`
/// (`"finite and >= 0"`).
pub fn float_where(
    obj: &Bound<'_, PyAny>,
    name: &str,
    allowed: &str,
    ok: impl Fn(f64) -> bool,
) -> PyResult<f64> {
    let bad = |got: String| invalid(format!("{name} must be a number {allowed}, got {got}"));
    if obj.is_instance_of::<PyBool>()
        || !(obj.is_instance_of::<PyFloat>() || obj.is_instance_of::<PyInt>())
    {
        return Err(bad(type_name(obj)));
    }
    match obj.extract::<f64>() {
        Ok(v) if ok(v) => Ok(v),
        Ok(v) => Err(bad(v.to_string())),
        Err(_) => Err(bad(obj
            .repr()
            .map_or_else(|_| "?".into(), |r| r.to_string()))),
    }
}

/// A float that also fits an `f32` and passes `ok` there.
pub fn f32_where(
    obj: &Bound<'_, PyAny>,
    name: &str,
    allowed: &str,
    ok: impl Fn(f32) -> bool,
) -> PyResult<f32> {
    let v = float_where(obj, name, allowed, |v| ok(v as f32))?;
    Ok(v as f32)
}

/// A `str` (no NUL) of at most `max` bytes.
pub fn str_arg(obj: &Bound<'_, PyAny>, name: &str, max: usize) -> PyResult<String> {
    if !obj.is_instance_of::<PyString>() {
        return Err(invalid(format!(
            "{name} must be a str, got {}",
            type_name(obj)
        )));
    }
    let s: String = obj
        .extract()
        .map_err(|_| invalid(format!("{name} is not valid Unicode text")))?;
    if s.len() > max {
        return Err(invalid(format!(
            "{name} is {} bytes, more than {max}",
            s.len()
        )));
    }
    Ok(s)
}

fn optional<T>(
    obj: &Bound<'_, PyAny>,
    f: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<T>,
) -> PyResult<Option<T>> {
    if obj.is_none() {
        Ok(None)
    } else {
        f(obj).map(Some)
    }
}

/// A cache key: 64 hex digits.
pub fn key_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<CacheKey> {
    let s = str_arg(obj, name, 64)?;
    CacheKey::from_hex(&s).map_err(|e| invalid(format!("{name}: {e}")))
}

/// Stop strings: a str or a sequence of them; each non-empty.
fn stop_arg(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if obj.is_none() {
        return Ok(Vec::new());
    }
    if obj.is_instance_of::<PyString>() {
        return stop_list(vec![obj.clone()]);
    }
    let items: Vec<Bound<'_, PyAny>> = obj
        .try_iter()
        .map_err(|_| invalid("stop must be a str or a sequence of str"))?
        .take(MAX_STOP + 1)
        .collect::<PyResult<_>>()?;
    stop_list(items)
}

/// At most this many stop strings per request.
pub const MAX_STOP: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;
/// Longest grammar text, in bytes (the llama backend checks it further).
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

fn stop_list(items: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    if items.len() > MAX_STOP {
        return Err(invalid(format!(
            "stop: at most {MAX_STOP} stop strings are allowed"
        )));
    }
    items
        .iter()
        .map(|s| {
            let s = str_arg(s, "stop", MAX_STOP_BYTES)?;
            if s.is_empty() {
                return Err(invalid("stop strings must not be empty"));
            }
            Ok(s)
        })
        .collect()
}

/// Declares the request options once: the struct, its defaults, their
/// checks and the table exported to Python.
macro_rules! request_options {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr, py $pydefault:expr, check $check:expr;)+) => {
        /// The options of `complete` / `stream` (one declaration; see the
        /// module docs).
        #[derive(Debug, Clone)]
        pub struct RequestArgs {
            $($(#[$doc])* pub $name: $ty,)+
        }

        impl Default for RequestArgs {
            fn default() -> Self {
                Self { $($name: $default,)+ }
            }
        }

        impl RequestArgs {
            /// The option names, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name),)+];

            /// Reads the options from a mapping of name → value (a key
            /// that is absent, or `None` where allowed, takes the default).
            ///
            /// # Errors
            ///
            /// `TypeError` for an unknown name, `InvalidInputError` for a
            /// bad value.
            pub fn from_mapping(options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
                let mut out = Self::default();
                let Some(options) = options else {
                    return Ok(out);
                };
                for (k, _) in options.iter() {
                    let name: String = k
                        .extract()
                        .map_err(|_| invalid("option names must be str"))?;
                    if !Self::NAMES.contains(&name.as_str()) {
                        // A misspelt keyword is a TypeError, as for any
                        // Python call.
                        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                            "unknown option {name:?} (options: {})",
                            Self::NAMES.join(", ")
                        )));
                    }
                }
                $(
                    if let Some(v) = options.get_item(stringify!($name))? {
                        let check: fn(&Bound<'_, PyAny>) -> PyResult<$ty> = $check;
                        out.$name = check(&v)?;
                    }
                )+
                Ok(out)
            }

            /// `(name, default)` pairs, as Python values.
            pub fn table<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
                let rows: Vec<Bound<'py, PyTuple>> = vec![$(
                    PyTuple::new(py, [
                        stringify!($name).into_bound_py_any(py)?,
                        $pydefault.into_bound_py_any(py)?,
                    ])?,
                )+];
                PyTuple::new(py, rows)
            }
        }
    };
}

request_options! {
    /// Generate at most this many tokens.
    max_tokens: usize = 128, py 128_u64, check |v| usize_in(v, "max_tokens", 0, u32::MAX as usize);
    /// 0 is greedy.
    temperature: f32 = 0.0, py 0.0_f64, check |v| f32_where(v, "temperature", "finite and >= 0",
        |x| x.is_finite() && x >= 0.0);
    /// 0 disables top-k.
    top_k: u32 = 0, py 0_u64, check |v| u32_in(v, "top_k", 0, i32::MAX as u32);
    /// 1 disables top-p.
    top_p: f32 = 1.0, py 1.0_f64, check |v| f32_where(v, "top_p", "in (0, 1]",
        |x| x > 0.0 && x <= 1.0);
    /// 0 disables min-p.
    min_p: f32 = 0.0, py 0.0_f64, check |v| f32_where(v, "min_p", "in [0, 1]",
        |x| (0.0..=1.0).contains(&x));
    /// 1 disables the penalty.
    repetition_penalty: f32 = 1.0, py 1.0_f64, check |v| f32_where(v, "repetition_penalty",
        "finite and > 0", |x| x.is_finite() && x > 0.0);
    /// The sampling RNG's seed (`None`: a fixed default, so runs repeat).
    seed: Option<u64> = None, py None::<u64>, check |v| optional(v, |v| u64_in(v, "seed", 0, u64::MAX));
    /// A GBNF grammar the output must follow (root rule `root`).
    grammar: Option<String> = None, py None::<String>, check |v| optional(v, |v| {
        let g = str_arg(v, "grammar", MAX_GRAMMAR_BYTES)?;
        if g.trim().is_empty() {
            return Err(crate::error::err(crate::error::Kind::Grammar, "the grammar is empty"));
        }
        Ok(g)
    });
    /// Generation ends before any of these strings.
    stop: Vec<String> = Vec::new(), py None::<String>, check stop_arg;
    /// The `finish_key` of an earlier turn to resume from.
    parent_key: Option<CacheKey> = None, py None::<String>, check |v| optional(v, |v| key_arg(v, "parent_key"));
    /// Explicit cache breakpoints: token counts, or (token count, pin
    /// seconds) pairs.
    breakpoints: Vec<Breakpoint> = Vec::new(), py None::<String>, check breakpoints_arg;
}

/// Breakpoints: a sequence of token counts or `(tokens, ttl_s)` pairs
/// (`ttl_s` a number of seconds in (0, 86400], or `None`: not pinned).
fn breakpoints_arg(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Breakpoint>> {
    if obj.is_none() {
        return Ok(Vec::new());
    }
    let shape = "breakpoints must be a sequence of token counts or (tokens, ttl_s) pairs";
    if obj.is_instance_of::<PyString>() {
        return Err(invalid(shape));
    }
    let items: Vec<Bound<'_, PyAny>> = obj
        .try_iter()
        .map_err(|_| invalid(shape))?
        .take(MAX_BREAKPOINTS + 1)
        .collect::<PyResult<_>>()?;
    if items.len() > MAX_BREAKPOINTS {
        return Err(invalid(format!("at most {MAX_BREAKPOINTS} breakpoints")));
    }
    items
        .iter()
        .map(|item| {
            let (tokens, ttl) = if item.is_instance_of::<PyInt>() {
                (item.clone(), None)
            } else {
                let pair: Vec<Bound<'_, PyAny>> = item
                    .try_iter()
                    .map_err(|_| invalid(shape))?
                    .take(3)
                    .collect::<PyResult<_>>()?;
                match <[Bound<'_, PyAny>; 2]>::try_from(pair) {
                    Ok([t, ttl]) => (t, Some(ttl)),
                    Err(_) => return Err(invalid(shape)),
                }
            };
            let tokens = usize_in(&tokens, "breakpoints[].tokens", 1, u32::MAX as usize)?;
            let pin = match ttl {
                Some(t) if !t.is_none() => Some(std::time::Duration::from_secs_f64(float_where(
                    &t,
                    "breakpoints[].ttl_s",
                    "in (0, 86400]",
                    |x| x > 0.0 && x <= 86400.0,
                )?)),
                _ => None,
            };
            Ok(Breakpoint { tokens, pin })
        })
        .collect()
}

impl RequestArgs {
    /// The engine's options.
    #[must_use]
    pub fn into_options(self) -> RequestOptions {
        RequestOptions {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
                grammar: self.grammar,
            },
            stop: self.stop,
            parent_key: self.parent_key,
            breakpoints: self.breakpoints,
        }
    }
}
