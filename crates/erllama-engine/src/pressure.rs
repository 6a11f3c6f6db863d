//! Memory-pressure samplers (docs/scheduler.md): where the scheduler learns how full
//! memory is.
//!
//! A [`PressureSampler`] answers `(used_bytes, total_bytes)`. Built in:
//! - [`NoopSampler`]: always `(0, 1)` — never any pressure;
//! - [`SystemSampler`]: host memory (`MemTotal − MemAvailable` from
//!   `/proc/meminfo`), or, when the process runs under a cgroup v2 memory
//!   limit (`memory.max` is not `max`), that limit and `memory.current`;
//! - [`NvmlSampler`]: VRAM summed over every NVIDIA GPU through NVML
//!   (`libnvidia-ml` loaded at run time); without a driver or a GPU it
//!   reports [`SamplerError::Unavailable`] and the scheduler skips the
//!   check rather than failing.
//!
//! Custom sources (e.g. a Python object with `sample()`) implement the
//! trait too.

use std::fs;
use std::path::{Path, PathBuf};

/// One reading: bytes in use and bytes in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Bytes in use.
    pub used: u64,
    /// Bytes in total (0 means "unknown": never a pressure).
    pub total: u64,
}

/// Why a sampler gave no reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    /// The source does not exist here (no GPU, no driver, no file).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The source failed or returned nonsense.
    #[error("sampling failed: {0}")]
    Failed(String),
}

/// A source of memory-pressure readings.
pub trait PressureSampler: Send + Sync {
    /// `"noop"`, `"system"`, `"nvml"`, or a custom name.
    fn name(&self) -> &str;
    /// The current reading.
    ///
    /// # Errors
    ///
    /// [`SamplerError`]; the scheduler records it and skips the check.
    fn sample(&self) -> Result<Sample, SamplerError>;
    /// Extra figures for the status (e.g. per-GPU memory), as
    /// `(name, value)` pairs.
    fn details(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Never any pressure: `(0, 1)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopSampler;

impl PressureSampler for NoopSampler {
    fn name(&self) -> &str {
        "noop"
    }

    fn sample(&self) -> Result<Sample, SamplerError> {
        Ok(Sample { used: 0, total: 1 })
    }
}

/// Host or cgroup memory; see the module docs.
#[derive(Debug, Clone)]
pub struct SystemSampler {
    meminfo: PathBuf,
    cgroup_root: PathBuf,
    self_cgroup: PathBuf,
}

impl Default for SystemSampler {
    fn default() -> Self {
        Self {
            meminfo: "/proc/meminfo".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            self_cgroup: "/proc/self/cgroup".into(),
        }
    }
}

impl SystemSampler {
    /// The sampler of this machine.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A sampler reading other files (for tests): a `meminfo` file, a
    /// cgroup v2 mount and a `/proc/self/cgroup`-style file.
    #[must_use]
    pub fn with_paths(meminfo: &Path, cgroup_root: &Path, self_cgroup: &Path) -> Self {
        Self {
            meminfo: meminfo.into(),
            cgroup_root: cgroup_root.into(),
            self_cgroup: self_cgroup.into(),
        }
    }

    /// The cgroup v2 limit that applies, as (used, limit), walking from
    /// this process's cgroup up to the root and taking the tightest
    /// `memory.max` that is not `max`.
    fn cgroup(&self) -> Option<Sample> {
        let text = fs::read_to_string(&self.self_cgroup).ok()?;
        // cgroup v2: a single line "0::/path".
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
        let mut dir = self.cgroup_root.join(rel.trim_start_matches('/'));
        let mut best: Option<Sample> = None;
        loop {
            if let (Ok(max), Ok(cur)) = (
                fs::read_to_string(dir.join("memory.max")),
                fs::read_to_string(dir.join("memory.current")),
            ) {
                let max = max.trim();
                if max != "max" {
                    if let (Ok(limit), Ok(used)) = (max.parse::<u64>(), cur.trim().parse::<u64>()) {
                        if best.is_none_or(|b| limit < b.total) {
                            best = Some(Sample { used, total: limit });
                        }
                    }
                }
            }
            if dir == self.cgroup_root || !dir.pop() || !dir.starts_with(&self.cgroup_root) {
                break;
            }
        }
        best
    }

    fn host(&self) -> Result<Sample, SamplerError> {
        let text = fs::read_to_string(&self.meminfo)
            .map_err(|e| SamplerError::Unavailable(format!("{}: {e}", self.meminfo.display())))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map(|kb| kb * 1024)
        };
        let total = field("MemTotal:")
            .ok_or_else(|| SamplerError::Failed("no MemTotal in meminfo".into()))?;
        let available = field("MemAvailable:")
            .ok_or_else(|| SamplerError::Failed("no MemAvailable in meminfo".into()))?;
        Ok(Sample {
            used: total.saturating_sub(available),
            total,
        })
    }
}

impl PressureSampler for SystemSampler {
    fn name(&self) -> &str {
        "system"
    }

    fn sample(&self) -> Result<Sample, SamplerError> {
        match self.cgroup() {
            Some(s) => Ok(s),
            None => self.host(),
        }
    }

    fn details(&self) -> Vec<(String, String)> {
        let source = if self.cgroup().is_some() {
            "cgroup v2 memory.max / memory.current"
        } else {
            "/proc/meminfo MemTotal - MemAvailable"
        };
        vec![("source".into(), source.into())]
    }
}

/// VRAM over every NVIDIA GPU, through NVML loaded at run time.
pub struct NvmlSampler {
    nvml: Result<nvml_wrapper::Nvml, String>,
}

impl std::fmt::Debug for NvmlSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSampler")
            .field("available", &self.nvml.is_ok())
            .finish()
    }
}

impl Default for NvmlSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl NvmlSampler {
    /// Loads NVML; a missing library or driver is remembered and reported
    /// by every sample as [`SamplerError::Unavailable`].
    #[must_use]
    pub fn new() -> Self {
        Self {
            nvml: nvml_wrapper::Nvml::init().map_err(|e| e.to_string()),
        }
    }

    /// Per-GPU (index, name, used, total).
    fn gpus(&self) -> Result<Vec<(u32, String, u64, u64)>, SamplerError> {
        let nvml = self
            .nvml
            .as_ref()
            .map_err(|e| SamplerError::Unavailable(format!("NVML: {e}")))?;
        let count = nvml
            .device_count()
            .map_err(|e| SamplerError::Failed(format!("NVML device count: {e}")))?;
        if count == 0 {
            return Err(SamplerError::Unavailable("NVML sees no GPU".into()));
        }
        (0..count)
            .map(|i| {
                let dev = nvml
                    .device_by_index(i)
                    .map_err(|e| SamplerError::Failed(format!("GPU {i}: {e}")))?;
                let mem = dev
                    .memory_info()
                    .map_err(|e| SamplerError::Failed(format!("GPU {i} memory: {e}")))?;
                let name = dev.name().unwrap_or_else(|_| "unknown".into());
                Ok((i, name, mem.used, mem.total))
            })
            .collect()
    }
}

impl PressureSampler for NvmlSampler {
    fn name(&self) -> &str {
        "nvml"
    }

    fn sample(&self) -> Result<Sample, SamplerError> {
        let gpus = self.gpus()?;
        Ok(Sample {
            used: gpus.iter().map(|g| g.2).sum(),
            total: gpus.iter().map(|g| g.3).sum(),
        })
    }

    fn details(&self) -> Vec<(String, String)> {
        match self.gpus() {
            Ok(gpus) => gpus
                .into_iter()
                .map(|(i, name, used, total)| {
                    (format!("gpu{i}"), format!("{name}: {used}/{total} bytes"))
                })
                .collect(),
            Err(e) => vec![("status".into(), e.to_string())],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noop_is_never_under_pressure() {
        assert_eq!(NoopSampler.sample(), Ok(Sample { used: 0, total: 1 }));
    }

    #[test]
    fn this_machine_has_memory() {
        let s = SystemSampler::new().sample().expect("system sample");
        assert!(s.used > 0 && s.used <= s.total, "{s:?}");
    }

    #[test]
    fn a_cgroup_limit_wins_over_the_host() {
        let root = tempfile::tempdir().expect("tmp");
        let meminfo = root.path().join("meminfo");
        fs::write(
            &meminfo,
            "MemTotal:       1000 kB\nMemAvailable:    250 kB\n",
        )
        .expect("w");
        let cg = root.path().join("cg");
        let leaf = cg.join("app.slice/job");
        fs::create_dir_all(&leaf).expect("mkdir");
        let selfcg = root.path().join("self_cgroup");
        fs::write(&selfcg, "0::/app.slice/job\n").expect("w");
        // No limit anywhere: the host figures.
        let s = SystemSampler::with_paths(&meminfo, &cg, &selfcg);
        assert_eq!(
            s.sample(),
            Ok(Sample {
                used: 750 * 1024,
                total: 1000 * 1024
            })
        );
        // A limit on the parent, "max" on the leaf: the parent's applies.
        fs::write(cg.join("app.slice/memory.max"), "4096\n").expect("w");
        fs::write(cg.join("app.slice/memory.current"), "1024\n").expect("w");
        fs::write(leaf.join("memory.max"), "max\n").expect("w");
        fs::write(leaf.join("memory.current"), "512\n").expect("w");
        assert_eq!(
            s.sample(),
            Ok(Sample {
                used: 1024,
                total: 4096
            })
        );
        // A tighter limit on the leaf wins.
        fs::write(leaf.join("memory.max"), "2048\n").expect("w");
        assert_eq!(
            s.sample(),
            Ok(Sample {
                used: 512,
                total: 2048
            })
        );
        assert!(s.details()[0].1.contains("cgroup"));
    }

    #[test]
    fn missing_files_are_unavailable_not_a_crash() {
        let root = tempfile::tempdir().expect("tmp");
        let nothing = root.path().join("nothing");
        let s = SystemSampler::with_paths(&nothing, &nothing, &nothing);
        assert!(matches!(s.sample(), Err(SamplerError::Unavailable(_))));
    }

    #[test]
    fn nvml_without_a_gpu_is_unavailable() {
        // This machine may or may not have a GPU; without one the sampler
        // must say so, never panic.
        let s = NvmlSampler::new();
        match s.sample() {
            Ok(sample) => assert!(sample.used <= sample.total && sample.total > 0),
            Err(SamplerError::Unavailable(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(!s.details().is_empty());
    }
}
