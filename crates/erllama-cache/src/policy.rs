//! Save policy (docs/policy.md) and the longest-prefix walk (docs/policy.md): pure
//! functions over token counts, no side effects, so the model task and
//! the tests agree on exactly when and what to save.

use std::collections::BTreeMap;
use std::time::Duration;

/// Errors from validating a policy; the first failing check is reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Keys absent from a map given to [`PolicyConfig::from_map`], in
    /// [`PolicyConfig::KEYS`] order.
    #[error("missing policy keys: {}", .0.join(", "))]
    MissingKeys(Vec<String>),
    /// A value that must be non-negative is negative (`min_tokens`,
    /// `boundary_trim_tokens`, and the two millisecond settings).
    #[error("{key} must be >= 0, got {value}")]
    Negative {
        /// The key.
        key: &'static str,
        /// The value given.
        value: i64,
    },
    /// `cold_min_tokens < min_tokens`.
    #[error("cold_min_tokens ({cold_min_tokens}) must be >= min_tokens ({min_tokens})")]
    ColdMinBelowMin {
        /// The value given.
        cold_min_tokens: i64,
        /// The value given.
        min_tokens: i64,
    },
    /// `cold_max_tokens < cold_min_tokens`.
    #[error("cold_max_tokens ({cold_max_tokens}) must be >= cold_min_tokens ({cold_min_tokens})")]
    ColdMaxBelowColdMin {
        /// The value given.
        cold_max_tokens: i64,
        /// The value given.
        cold_min_tokens: i64,
    },
    /// `continued_interval <= 0`.
    #[error("continued_interval must be > 0, got {0}")]
    ContinuedIntervalNotPositive(i64),
    /// `boundary_align_tokens <= 0`.
    #[error("boundary_align_tokens must be > 0, got {0}")]
    AlignNotPositive(i64),
    /// A value does not fit this platform's integer type.
    #[error("{key} value {value} is out of range")]
    OutOfRange {
        /// The key.
        key: &'static str,
        /// The value given.
        value: i64,
    },
    /// A key [`PolicyConfig::from_map`] does not know (a typo, usually).
    #[error("unknown policy key {0:?}")]
    UnknownKey(String),
}

impl PolicyError {
    /// The name of the failing check: `"missing_keys"`, or the key whose
    /// rule failed (`"min_tokens"`, `"cold_min_tokens"`, …), or
    /// `"unknown_key"`.
    #[must_use]
    pub fn check_name(&self) -> &'static str {
        match self {
            PolicyError::MissingKeys(_) => "missing_keys",
            PolicyError::Negative { key, .. } | PolicyError::OutOfRange { key, .. } => key,
            PolicyError::ColdMinBelowMin { .. } => "cold_min_tokens",
            PolicyError::ColdMaxBelowColdMin { .. } => "cold_max_tokens",
            PolicyError::ContinuedIntervalNotPositive(_) => "continued_interval",
            PolicyError::AlignNotPositive(_) => "boundary_align_tokens",
            PolicyError::UnknownKey(_) => "unknown_key",
        }
    }
}

/// When and what to save. Token counts are `usize` and durations `u64`
/// milliseconds, so the documented `min_tokens >= 0` and
/// `boundary_trim_tokens >= 0` hold by type; [`PolicyConfig::from_map`]
/// checks them on signed input.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicyConfig {
    /// Continued and finish saves need at least this many live tokens.
    pub min_tokens: usize,
    /// Cold saves need a prompt of at least this many tokens.
    pub cold_min_tokens: usize,
    /// Cold saves skip prompts longer than this.
    pub cold_max_tokens: usize,
    /// A continued save every this many tokens since the last save.
    pub continued_interval: usize,
    /// Tokens dropped from the end before aligning a cold save.
    pub boundary_trim_tokens: usize,
    /// Cold saves and longest-prefix probes use multiples of this.
    pub boundary_align_tokens: usize,
    /// How long a session resume waits for a row being written.
    pub session_resume_wait_ms: u64,
    /// Bound on a blocking evict/shutdown save.
    pub evict_save_timeout_ms: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            min_tokens: 512,
            cold_min_tokens: 512,
            cold_max_tokens: 30_000,
            continued_interval: 2048,
            boundary_trim_tokens: 32,
            boundary_align_tokens: 2048,
            session_resume_wait_ms: 500,
            evict_save_timeout_ms: 30_000,
        }
    }
}

fn to_usize(key: &'static str, value: i64) -> Result<usize, PolicyError> {
    usize::try_from(value).map_err(|_| PolicyError::OutOfRange { key, value })
}

fn to_u64(key: &'static str, value: i64) -> Result<u64, PolicyError> {
    u64::try_from(value).map_err(|_| PolicyError::OutOfRange { key, value })
}

impl PolicyConfig {
    /// Every key, in the order of the struct (and of docs/policy.md).
    pub const KEYS: [&'static str; 8] = [
        "min_tokens",
        "cold_min_tokens",
        "cold_max_tokens",
        "continued_interval",
        "boundary_trim_tokens",
        "boundary_align_tokens",
        "session_resume_wait_ms",
        "evict_save_timeout_ms",
    ];

    /// Builds and validates a policy from a name → value map (e.g. a
    /// Python dict merged over [`PolicyConfig::to_map`] of the defaults).
    /// Checks, first failure reported: all keys present
    /// ([`PolicyError::MissingKeys`] lists every absent one), then the
    /// the documented order — min ≥ 0, cold_min ≥ min, cold_max ≥ cold_min,
    /// interval > 0, trim ≥ 0, align > 0 — then the two millisecond values
    /// ≥ 0, then no unknown keys.
    ///
    /// # Errors
    ///
    /// The first failing check as a [`PolicyError`].
    pub fn from_map(map: &BTreeMap<String, i64>) -> Result<Self, PolicyError> {
        let missing: Vec<String> = Self::KEYS
            .iter()
            .filter(|k| !map.contains_key(**k))
            .map(|k| (*k).to_owned())
            .collect();
        if !missing.is_empty() {
            return Err(PolicyError::MissingKeys(missing));
        }
        let get = |key: &str| map.get(key).copied().unwrap_or_default();
        let min = get("min_tokens");
        let cold_min = get("cold_min_tokens");
        let cold_max = get("cold_max_tokens");
        let interval = get("continued_interval");
        let trim = get("boundary_trim_tokens");
        let align = get("boundary_align_tokens");
        let resume = get("session_resume_wait_ms");
        let evict = get("evict_save_timeout_ms");

        if min < 0 {
            return Err(PolicyError::Negative {
                key: "min_tokens",
                value: min,
            });
        }
        check_relations(min, cold_min, cold_max, interval)?;
        if trim < 0 {
            return Err(PolicyError::Negative {
                key: "boundary_trim_tokens",
                value: trim,
            });
        }
        if align <= 0 {
            return Err(PolicyError::AlignNotPositive(align));
        }
        for (key, value) in [
            ("session_resume_wait_ms", resume),
            ("evict_save_timeout_ms", evict),
        ] {
            if value < 0 {
                return Err(PolicyError::Negative { key, value });
            }
        }
        if let Some(unknown) = map.keys().find(|k| !Self::KEYS.contains(&k.as_str())) {
            return Err(PolicyError::UnknownKey(unknown.clone()));
        }
        Ok(PolicyConfig {
            min_tokens: to_usize("min_tokens", min)?,
            cold_min_tokens: to_usize("cold_min_tokens", cold_min)?,
            cold_max_tokens: to_usize("cold_max_tokens", cold_max)?,
            continued_interval: to_usize("continued_interval", interval)?,
            boundary_trim_tokens: to_usize("boundary_trim_tokens", trim)?,
            boundary_align_tokens: to_usize("boundary_align_tokens", align)?,
            session_resume_wait_ms: to_u64("session_resume_wait_ms", resume)?,
            evict_save_timeout_ms: to_u64("evict_save_timeout_ms", evict)?,
        })
    }

    /// The policy as a name → value map ([`PolicyConfig::KEYS`]); values
    /// above `i64::MAX` saturate.
    #[must_use]
    pub fn to_map(&self) -> BTreeMap<String, i64> {
        let sat = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let values = [
            self.min_tokens as u64,
            self.cold_min_tokens as u64,
            self.cold_max_tokens as u64,
            self.continued_interval as u64,
            self.boundary_trim_tokens as u64,
            self.boundary_align_tokens as u64,
            self.session_resume_wait_ms,
            self.evict_save_timeout_ms,
        ];
        Self::KEYS
            .iter()
            .zip(values)
            .map(|(k, v)| ((*k).to_owned(), sat(v)))
            .collect()
    }

    /// `session_resume_wait_ms` as a duration.
    #[must_use]
    pub const fn session_resume_wait(&self) -> Duration {
        Duration::from_millis(self.session_resume_wait_ms)
    }

    /// `evict_save_timeout_ms` as a duration.
    #[must_use]
    pub const fn evict_save_timeout(&self) -> Duration {
        Duration::from_millis(self.evict_save_timeout_ms)
    }
}

/// The documented relational checks 3–5, shared by both validators.
fn check_relations(
    min: i64,
    cold_min: i64,
    cold_max: i64,
    interval: i64,
) -> Result<(), PolicyError> {
    if cold_min < min {
        return Err(PolicyError::ColdMinBelowMin {
            cold_min_tokens: cold_min,
            min_tokens: min,
        });
    }
    if cold_max < cold_min {
        return Err(PolicyError::ColdMaxBelowColdMin {
            cold_max_tokens: cold_max,
            cold_min_tokens: cold_min,
        });
    }
    if interval <= 0 {
        return Err(PolicyError::ContinuedIntervalNotPositive(interval));
    }
    Ok(())
}

/// Validates a policy (docs/policy.md), reporting the first failing check:
/// cold_min ≥ min, cold_max ≥ cold_min, interval > 0, align > 0. Key
/// presence and min ≥ 0 / trim ≥ 0 hold by construction here (see
/// [`PolicyConfig::from_map`] for untyped input).
///
/// # Errors
///
/// [`PolicyError::ColdMinBelowMin`], [`PolicyError::ColdMaxBelowColdMin`],
/// [`PolicyError::ContinuedIntervalNotPositive`] or
/// [`PolicyError::AlignNotPositive`].
pub fn validate_config(cfg: &PolicyConfig) -> Result<(), PolicyError> {
    let sat = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    check_relations(
        sat(cfg.min_tokens),
        sat(cfg.cold_min_tokens),
        sat(cfg.cold_max_tokens),
        sat(cfg.continued_interval),
    )?;
    if cfg.boundary_align_tokens == 0 {
        return Err(PolicyError::AlignNotPositive(0));
    }
    Ok(())
}

/// The aligned boundary of a sequence of `len` tokens: drop `trim` tokens
/// from the end, then round down to a multiple of `align`. `None` (skip)
/// when fewer than `align` tokens remain after trimming, or `align` is 0.
/// A `Some` result is always a positive multiple of `align`.
#[must_use]
pub const fn trim_boundary(len: usize, trim: usize, align: usize) -> Option<usize> {
    if align == 0 {
        return None;
    }
    match len.checked_sub(trim) {
        Some(after) if after >= align => Some(after / align * align),
        _ => None,
    }
}

/// Where to split a cold prompt: `Some((prefix, rest))` with
/// `prefix ‖ rest == tokens` and `prefix.len()` the trimmed, aligned
/// boundary; `None` (no cold save) when the prompt is shorter than
/// `cold_min_tokens`, longer than `cold_max_tokens`, or the trim skips.
#[must_use]
pub fn cold_save_split<'t>(
    tokens: &'t [u32],
    cfg: &PolicyConfig,
) -> Option<(&'t [u32], &'t [u32])> {
    let len = tokens.len();
    if len < cfg.cold_min_tokens || len > cfg.cold_max_tokens {
        return None;
    }
    let at = trim_boundary(len, cfg.boundary_trim_tokens, cfg.boundary_align_tokens)?;
    Some(tokens.split_at(at))
}

/// A continued save is due when at least `continued_interval` tokens were
/// added since the last save (at `last_saved_at` live tokens) and the
/// context holds at least `min_tokens`.
#[must_use]
pub fn should_continued_save(live: usize, last_saved_at: usize, cfg: &PolicyConfig) -> bool {
    live.checked_sub(last_saved_at)
        .is_some_and(|added| added >= cfg.continued_interval)
        && live >= cfg.min_tokens
}

/// A finish save is due when the context holds at least `min_tokens`.
#[must_use]
pub fn should_finish_save(live: usize, cfg: &PolicyConfig) -> bool {
    live >= cfg.min_tokens
}

/// The prefix lengths a longest-prefix lookup probes for a prompt of `len`
/// tokens (docs/policy.md), longest first: stride = `boundary_align_tokens`,
/// start = ⌊len/stride⌋·stride, floor = max(min_tokens, stride); yields
/// start, start − stride, … while ≥ floor. Empty when the stride is 0.
pub fn longest_prefix_probes(
    len: usize,
    cfg: &PolicyConfig,
) -> impl Iterator<Item = usize> + Clone {
    let stride = cfg.boundary_align_tokens;
    let (top, lowest) = if stride == 0 {
        (0, 1)
    } else {
        let floor = cfg.min_tokens.max(stride);
        // Multiples i·stride with i·stride >= floor, i.e. i >= ⌈floor/stride⌉.
        (len / stride, floor.div_ceil(stride))
    };
    (lowest..=top).rev().map(move |i| i * stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PolicyConfig {
        PolicyConfig::default()
    }

    #[test]
    fn defaults() {
        let c = cfg();
        assert_eq!(
            (
                c.min_tokens,
                c.cold_min_tokens,
                c.cold_max_tokens,
                c.continued_interval,
                c.boundary_trim_tokens,
                c.boundary_align_tokens,
                c.session_resume_wait_ms,
                c.evict_save_timeout_ms
            ),
            (512, 512, 30_000, 2048, 32, 2048, 500, 30_000)
        );
        assert_eq!(validate_config(&c), Ok(()));
        assert_eq!(c.session_resume_wait(), Duration::from_millis(500));
        assert_eq!(c.evict_save_timeout(), Duration::from_secs(30));
    }

    #[test]
    fn trim_boundary_rules() {
        assert_eq!(trim_boundary(2080, 32, 2048), Some(2048));
        assert_eq!(trim_boundary(2079, 32, 2048), None);
        assert_eq!(trim_boundary(10_000, 32, 2048), Some(8192));
        assert_eq!(trim_boundary(4127, 32, 2048), Some(2048));
        assert_eq!(trim_boundary(4128, 32, 2048), Some(4096));
        assert_eq!(trim_boundary(10, 32, 2048), None);
        assert_eq!(trim_boundary(5, 0, 1), Some(5));
        assert_eq!(trim_boundary(5, 5, 1), None);
        assert_eq!(trim_boundary(100, 0, 0), None);
    }

    #[test]
    fn cold_split_rules() {
        let c = cfg();
        let tokens: Vec<u32> = (0..30_001).collect();
        assert_eq!(cold_save_split(&tokens[..511], &c), None); // below cold_min
        assert_eq!(cold_save_split(&tokens[..2079], &c), None); // trim skips
        let (prefix, rest) = cold_save_split(&tokens[..2080], &c).expect("split");
        assert_eq!((prefix.len(), rest.len()), (2048, 32));
        let (prefix, rest) = cold_save_split(&tokens[..30_000], &c).expect("split");
        assert_eq!(prefix.len(), 28_672);
        assert_eq!([prefix, rest].concat(), tokens[..30_000]);
        assert_eq!(cold_save_split(&tokens, &c), None); // above cold_max

        let small = PolicyConfig {
            min_tokens: 0,
            cold_min_tokens: 0,
            boundary_trim_tokens: 0,
            boundary_align_tokens: 4,
            ..cfg()
        };
        assert_eq!(cold_save_split(&[1, 2, 3], &small), None);
        assert_eq!(
            cold_save_split(&[1, 2, 3, 4, 5], &small),
            Some((&[1, 2, 3, 4][..], &[5][..]))
        );
    }

    #[test]
    fn continued_and_finish() {
        let c = cfg();
        assert!(should_continued_save(2048, 0, &c));
        assert!(!should_continued_save(2047, 0, &c));
        assert!(should_continued_save(6000, 3952, &c));
        assert!(!should_continued_save(6000, 3953, &c));
        assert!(!should_continued_save(100, 200, &c)); // went backwards
        let low_interval = PolicyConfig {
            continued_interval: 10,
            ..cfg()
        };
        assert!(!should_continued_save(511, 0, &low_interval)); // below min_tokens
        assert!(should_continued_save(512, 0, &low_interval));
        assert!(should_finish_save(512, &c));
        assert!(!should_finish_save(511, &c));
    }

    #[test]
    fn validate_each_rule_in_order() {
        let bad = PolicyConfig {
            cold_min_tokens: 100,
            cold_max_tokens: 50,
            continued_interval: 0,
            boundary_align_tokens: 0,
            ..cfg()
        };
        assert_eq!(
            validate_config(&bad),
            Err(PolicyError::ColdMinBelowMin {
                cold_min_tokens: 100,
                min_tokens: 512
            })
        );
        let bad = PolicyConfig {
            min_tokens: 0,
            ..bad
        };
        assert_eq!(
            validate_config(&bad),
            Err(PolicyError::ColdMaxBelowColdMin {
                cold_max_tokens: 50,
                cold_min_tokens: 100
            })
        );
        let bad = PolicyConfig {
            cold_max_tokens: 100,
            ..bad
        };
        assert_eq!(
            validate_config(&bad),
            Err(PolicyError::ContinuedIntervalNotPositive(0))
        );
        let bad = PolicyConfig {
            continued_interval: 1,
            ..bad
        };
        assert_eq!(validate_config(&bad), Err(PolicyError::AlignNotPositive(0)));
        assert_eq!(
            PolicyError::AlignNotPositive(0).check_name(),
            "boundary_align_tokens"
        );
    }

    fn map() -> BTreeMap<String, i64> {
        cfg().to_map()
    }

    fn with(changes: &[(&str, i64)]) -> BTreeMap<String, i64> {
        let mut m = map();
        for (k, v) in changes {
            m.insert((*k).to_owned(), *v);
        }
        m
    }

    #[test]
    fn from_map_round_trip() {
        assert_eq!(PolicyConfig::from_map(&map()), Ok(cfg()));
        assert_eq!(map().len(), 8);
        let custom = with(&[("min_tokens", 16), ("boundary_align_tokens", 64)]);
        let c = PolicyConfig::from_map(&custom).expect("valid");
        assert_eq!((c.min_tokens, c.boundary_align_tokens), (16, 64));
        assert_eq!(c.to_map(), custom);
    }

    #[test]
    fn from_map_missing_keys() {
        let mut m = map();
        m.remove("evict_save_timeout_ms");
        m.remove("min_tokens");
        m.insert("min_token".into(), 1); // a typo: reported as missing first
        let err = PolicyConfig::from_map(&m).expect_err("missing");
        assert_eq!(
            err,
            PolicyError::MissingKeys(vec!["min_tokens".into(), "evict_save_timeout_ms".into()])
        );
        assert_eq!(err.check_name(), "missing_keys");
        assert_eq!(
            PolicyConfig::from_map(&BTreeMap::new()),
            Err(PolicyError::MissingKeys(
                PolicyConfig::KEYS.iter().map(|k| (*k).to_owned()).collect()
            ))
        );
    }

    #[test]
    fn from_map_checks_in_spec_order() {
        // Every rule broken at once: min < 0 is reported first.
        let all_bad = [
            ("min_tokens", -1),
            ("cold_min_tokens", -5),
            ("cold_max_tokens", -10),
            ("continued_interval", 0),
            ("boundary_trim_tokens", -1),
            ("boundary_align_tokens", 0),
            ("session_resume_wait_ms", -1),
            ("evict_save_timeout_ms", -1),
        ];
        let mut m = with(&all_bad);
        m.insert("bogus".into(), 1);
        let expected = [
            PolicyError::Negative {
                key: "min_tokens",
                value: -1,
            },
            PolicyError::ColdMinBelowMin {
                cold_min_tokens: -5,
                min_tokens: 0,
            },
            PolicyError::ColdMaxBelowColdMin {
                cold_max_tokens: -10,
                cold_min_tokens: 0,
            },
            PolicyError::ContinuedIntervalNotPositive(0),
            PolicyError::Negative {
                key: "boundary_trim_tokens",
                value: -1,
            },
            PolicyError::AlignNotPositive(0),
            PolicyError::Negative {
                key: "session_resume_wait_ms",
                value: -1,
            },
            PolicyError::Negative {
                key: "evict_save_timeout_ms",
                value: -1,
            },
            PolicyError::UnknownKey("bogus".into()),
        ];
        // Fix the rules one at a time; each fix reveals the next error.
        let fixes = [
            ("min_tokens", 0),
            ("cold_min_tokens", 0),
            ("cold_max_tokens", 0),
            ("continued_interval", 1),
            ("boundary_trim_tokens", 0),
            ("boundary_align_tokens", 1),
            ("session_resume_wait_ms", 0),
            ("evict_save_timeout_ms", 0),
        ];
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(PolicyConfig::from_map(&m).as_ref(), Err(want), "step {i}");
            if let Some((k, v)) = fixes.get(i) {
                m.insert((*k).to_owned(), *v);
            }
        }
        m.remove("bogus");
        assert!(PolicyConfig::from_map(&m).is_ok());
        assert_eq!(expected[1].check_name(), "cold_min_tokens");
        assert_eq!(expected[0].check_name(), "min_tokens");
        assert_eq!(expected[8].check_name(), "unknown_key");
    }

    #[test]
    fn probes_spec_examples() {
        let c = PolicyConfig {
            boundary_align_tokens: 2048,
            min_tokens: 512,
            ..cfg()
        };
        let probes: Vec<usize> = longest_prefix_probes(12_000, &c).collect();
        assert_eq!(probes, vec![10_240, 8192, 6144, 4096, 2048]);
        assert_eq!(longest_prefix_probes(1500, &c).count(), 0);
    }

    #[test]
    fn probes_edges() {
        let c = cfg();
        assert_eq!(
            longest_prefix_probes(2048, &c).collect::<Vec<_>>(),
            vec![2048]
        );
        assert_eq!(longest_prefix_probes(0, &c).count(), 0);
        // min_tokens above the stride raises the floor (rounded up to a multiple).
        let high_min = PolicyConfig {
            min_tokens: 5000,
            ..cfg()
        };
        assert_eq!(
            longest_prefix_probes(12_000, &high_min).collect::<Vec<_>>(),
            vec![10_240, 8192, 6144]
        );
        let exact_min = PolicyConfig {
            min_tokens: 4096,
            ..cfg()
        };
        assert_eq!(
            longest_prefix_probes(4096, &exact_min).collect::<Vec<_>>(),
            vec![4096]
        );
        let zero = PolicyConfig {
            boundary_align_tokens: 0,
            ..cfg()
        };
        assert_eq!(longest_prefix_probes(12_000, &zero).count(), 0);
        let one = PolicyConfig {
            boundary_align_tokens: 1,
            min_tokens: 0,
            ..cfg()
        };
        assert_eq!(
            longest_prefix_probes(3, &one).collect::<Vec<_>>(),
            vec![3, 2, 1]
        );
        assert_eq!(
            longest_prefix_probes(usize::MAX, &one).next(),
            Some(usize::MAX)
        );
    }
}
