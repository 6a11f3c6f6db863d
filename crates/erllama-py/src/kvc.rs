//! Reading KVC files directly, for `erllama cache ls|stats|verify|gc`.

use std::path::PathBuf;

use erllama_cache::{parse_full, read_header, scan_dir, CacheKey};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::erllama_err;

/// One `*.kvc` file of `dir`, header-parsed (no CRC): a dict with `file`,
/// `key` (recomputed from the contents), `name_ok`, `tokens`,
/// `save_reason`, `hits`, `size`, `created`, `last_used`, `context_size`,
/// `quant`, `prompt`, `error` (None when the header parses).
#[pyfunction]
pub fn kvc_list<'py>(py: Python<'py>, dir: PathBuf) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let entries = py.detach(|| -> std::io::Result<Vec<_>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "kvc"))
            .collect();
        files.sort();
        Ok(files
            .into_iter()
            .map(|p| {
                let r = read_header(&p);
                (p, r)
            })
            .collect())
    });
    let entries =
        entries.map_err(|e| erllama_err("CacheError", format!("{}: {e}", dir.display())))?;
    let mut out = Vec::with_capacity(entries.len());
    for (path, result) in entries {
        let d = PyDict::new(py);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        d.set_item("file", &name)?;
        match result {
            Ok((meta, size)) => {
                let key = meta.key();
                d.set_item("key", key.to_hex())?;
                d.set_item("name_ok", name == format!("{key}.kvc"))?;
                d.set_item("tokens", meta.cached_token_count)?;
                d.set_item("save_reason", meta.save_reason.label())?;
                d.set_item("hits", meta.hit_count)?;
                d.set_item("size", size)?;
                d.set_item("created", meta.creation_time)?;
                d.set_item("last_used", meta.last_used_time)?;
                d.set_item("context_size", meta.context_size)?;
                d.set_item("quant", meta.quant_type.label())?;
                d.set_item(
                    "prompt",
                    meta.prompt_text.chars().take(80).collect::<String>(),
                )?;
                d.set_item("error", None::<String>)?;
            }
            Err(why) => {
                d.set_item("key", None::<String>)?;
                d.set_item("name_ok", false)?;
                d.set_item(
                    "size",
                    std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                )?;
                d.set_item("error", why)?;
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// Full parse of one KVC file (framing, CRC32C, key recomputed and
/// compared with the key in its name); None when valid, else the error.
#[pyfunction]
pub fn kvc_verify(py: Python<'_>, path: PathBuf) -> Option<String> {
    py.detach(|| {
        let name = path.file_name()?.to_string_lossy().into_owned();
        let expected = match name.strip_suffix(".kvc").map(CacheKey::from_hex) {
            Some(Ok(k)) => k,
            _ => return Some(format!("file name {name} is not <64 hex>.kvc")),
        };
        match std::fs::read(&path) {
            Err(e) => Some(format!("read: {e}")),
            Ok(bytes) => parse_full(&bytes, &expected)
                .err()
                .map(|e| format!("{}: {e}", e.name())),
        }
    })
}

/// (kept, removed temp files, removed invalid files with why).
type GcReport = (usize, usize, Vec<(String, String)>);

/// What a cache directory's startup would do: delete `*.tmp` and every
/// `*.kvc` that fails the meta parse or is misnamed. Returns (kept, removed
/// temp files, removed invalid files with why).
#[pyfunction]
pub fn kvc_gc(py: Python<'_>, dir: PathBuf) -> PyResult<GcReport> {
    let report = py
        .detach(|| scan_dir(&dir))
        .map_err(|e| erllama_err("CacheError", e.to_string()))?;
    Ok((
        report.registered.len(),
        report.removed_tmp,
        report
            .removed_invalid
            .into_iter()
            .map(|(p, why)| (p.display().to_string(), why))
            .collect(),
    ))
}
