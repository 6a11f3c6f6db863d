//! Reading KVC files directly, for `erllama cache ls|stats|verify|gc`.

use std::path::PathBuf;

use erllama_cache::{parse_full, read_header, scan_dir, CacheKey};
use pyo3::prelude::*;

use crate::error::{err, Kind};
use crate::records::KvcFile;

/// Every `*.kvc` regular file of `dir`, header-parsed (no CRC).
#[pyfunction]
pub fn kvc_list(py: Python<'_>, dir: PathBuf) -> PyResult<Vec<KvcFile>> {
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
    let entries = entries.map_err(|e| err(Kind::Cache, format!("{}: {e}", dir.display())))?;
    Ok(entries
        .into_iter()
        .map(|(path, result)| {
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match result {
                Ok((meta, size)) => {
                    let key = meta.key();
                    KvcFile {
                        name_ok: file == format!("{key}.kvc"),
                        file,
                        key: Some(key.to_hex()),
                        tokens: meta.cached_token_count,
                        save_reason: Some(meta.save_reason.label().into()),
                        hits: meta.hit_count,
                        size,
                        created: meta.creation_time,
                        last_used: meta.last_used_time,
                        context_size: meta.context_size,
                        quant: Some(meta.quant_type.label().into()),
                        prompt: Some(meta.prompt_text.chars().take(80).collect()),
                        logits: meta.logits_count,
                        error: None,
                    }
                }
                Err(why) => KvcFile {
                    size: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                    file,
                    key: None,
                    name_ok: false,
                    tokens: 0,
                    save_reason: None,
                    hits: 0,
                    created: 0,
                    last_used: 0,
                    context_size: 0,
                    quant: None,
                    prompt: None,
                    logits: 0,
                    error: Some(why),
                },
            }
        })
        .collect())
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
        .map_err(|e| err(Kind::Cache, e.to_string()))?;
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

/// A remote tier's rows, least recently used first: (key hex, bytes,
/// hits, last use in ms since the epoch), at most `limit`.
#[pyfunction]
#[pyo3(signature = (url, prefix = "erllama".to_owned(), limit = 1000))]
pub fn remote_rows(
    py: Python<'_>,
    url: String,
    prefix: String,
    limit: usize,
) -> PyResult<Vec<(String, u64, u64, u64)>> {
    let remote = open_remote(url, prefix)?;
    let rows = py
        .detach(|| remote.list(limit))
        .map_err(|e| err(Kind::Cache, format!("remote tier: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|r| (r.key.to_hex(), r.size, r.hits, r.last_used_ms))
        .collect())
}

/// A remote tier's totals: (rows, bytes).
#[pyfunction]
#[pyo3(signature = (url, prefix = "erllama".to_owned()))]
pub fn remote_stats(py: Python<'_>, url: String, prefix: String) -> PyResult<(u64, u64)> {
    let remote = open_remote(url, prefix)?;
    let stats = py
        .detach(|| remote.stats())
        .map_err(|e| err(Kind::Cache, format!("remote tier: {e}")))?;
    Ok((stats.rows, stats.bytes))
}

fn open_remote(url: String, prefix: String) -> PyResult<erllama_cache::Remote> {
    let mut config = erllama_cache::RemoteConfig::new(url);
    config.prefix = prefix;
    erllama_cache::Remote::new(config, std::sync::Arc::default())
        .map_err(|e| err(Kind::InvalidInput, e))
}
