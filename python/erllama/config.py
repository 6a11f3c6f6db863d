"""Configuration of an :class:`erllama.Engine`: cache tiers, save policy, scheduler.

All three are frozen dataclasses with keyword-only fields, so a configuration
is a value that can be shared, compared and printed:

>>> from erllama import CacheConfig, Policy
>>> Policy(min_tokens=256).min_tokens
256
>>> CacheConfig().ram_quota == 1 << 30
True
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["CacheConfig", "Policy", "SchedulerConfig"]

GIB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The cache tiers and their byte quotas.

    ``ram`` (in-process) is always on. ``ram_file`` (files on tmpfs, e.g. a
    directory under ``/dev/shm``; shared between processes, survives a model
    restart) and ``disk`` (persistent files; survives restarts) are on when a
    directory is given. Each tier has its own quota and LRU; a save that does
    not fit evicts the tier's least recently used rows first, or is dropped.
    """

    ram_quota: int = GIB
    """Bytes the in-process tier may hold."""
    ram_file_dir: str | os.PathLike[str] | None = None
    """Directory of the ``ram_file`` tier (created 0700 if missing)."""
    ram_file_quota: int = 4 * GIB
    """Bytes the ``ram_file`` tier may hold."""
    ram_file_load: Literal["read", "mmap"] = "mmap"
    """How ``ram_file`` rows are read back (docs/tiers.md): ``mmap`` maps the
    file, validates it on the mapping and restores straight from it, with no
    copy; ``read`` copies it with ``read(2)`` first (``disk`` always does)."""
    disk_dir: str | os.PathLike[str] | None = None
    """Directory of the ``disk`` tier (created 0700 if missing)."""
    disk_quota: int = 16 * GIB
    """Bytes the ``disk`` tier may hold."""
    writer_limit: int | None = None
    """Concurrent background saves (default 2 x cores + 1)."""
    remote_url: str | None = None
    """The ``remote`` tier (docs/tiers.md): a Redis or Valkey server,
    ``redis://[user:password@]host:port/db`` or ``rediss://`` for TLS. Looked
    up after every local tier misses; a hit is stored in the model's tier.
    Every save is also written there, off the request path. A server that
    fails or is slow never fails a request."""
    remote_prefix: str = "erllama"
    """Key prefix and Redis Cluster hash tag (``{prefix}:row:<hex>``)."""
    remote_quota: int = 4 * GIB
    """Bytes the rows under the prefix may hold, for every writer together
    (least recently used rows are evicted)."""
    remote_ttl_s: float | None = None
    """A remote row unused for this long expires (each hit renews it)."""
    remote_timeout_s: float = 2.0
    """Time allowed for one remote operation, a row's transfer included."""
    remote_connect_timeout_s: float = 0.5
    """Time allowed to connect."""
    remote_retry_s: float = 2.0
    """After 3 consecutive failures the server is skipped this long."""

    def remote_dict(self) -> dict[str, object] | None:
        """The ``remote_*`` settings for the native engine (None: no tier)."""
        if self.remote_url is None:
            return None
        return {
            "url": self.remote_url,
            "prefix": self.remote_prefix,
            "quota": self.remote_quota,
            "ttl_s": self.remote_ttl_s,
            "timeout_s": self.remote_timeout_s,
            "connect_timeout_s": self.remote_connect_timeout_s,
            "retry_s": self.remote_retry_s,
        }

    def __post_init__(self) -> None:
        for name in ("ram_quota", "ram_file_quota", "disk_quota"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                from erllama.errors import InvalidInputError

                raise InvalidInputError(f"{name} must be an int >= 0, got {value!r}")
        if self.ram_file_load not in ("read", "mmap"):
            from erllama.errors import InvalidInputError

            raise InvalidInputError(
                f"ram_file_load must be 'read' or 'mmap', got {self.ram_file_load!r}"
            )
        remote_url: object = self.remote_url
        if remote_url is not None and not isinstance(remote_url, str):
            from erllama.errors import InvalidInputError

            raise InvalidInputError(
                f"remote_url must be a redis:// or rediss:// URL, got {remote_url!r}"
            )
        if self.writer_limit is not None and self.writer_limit < 1:
            from erllama.errors import InvalidInputError

            raise InvalidInputError(f"writer_limit must be >= 1, got {self.writer_limit!r}")


@dataclass(frozen=True, kw_only=True)
class Policy:
    """When states are saved and how prefixes are probed (docs/policy.md).

    The defaults suit long prompts: nothing under 512 tokens is saved, cold
    saves and longest-prefix probes use multiples of 2048 tokens. Lower
    ``boundary_align_tokens`` (e.g. 256) to reuse shorter shared prefixes.
    Validation happens when an engine or model is created with it.
    """

    min_tokens: int = 512
    """Continued and finish saves need at least this many live tokens."""
    cold_min_tokens: int = 512
    """Cold (prompt) saves need a prompt of at least this many tokens."""
    cold_max_tokens: int = 30000
    """Cold saves skip prompts longer than this."""
    continued_interval: int = 2048
    """A continued save every this many generated tokens."""
    boundary_trim_tokens: int = 32
    """Tokens dropped from a prompt's end before aligning its cold save."""
    boundary_align_tokens: int = 2048
    """Cold saves and longest-prefix probes use multiples of this."""
    session_resume_wait_ms: int = 500
    """How long a ``parent_key`` resume waits for a row still being written."""
    evict_save_timeout_ms: int = 30000
    """Bound on the blocking ``evict`` and ``shutdown`` saves."""

    def to_dict(self) -> dict[str, int]:
        """The policy as the name -> int map the engine validates."""
        return {k: int(v) for k, v in asdict(self).items()}


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """The memory-pressure scheduler (docs/scheduler.md; off by default).

    When enabled it samples ``pressure_source`` every ``interval_ms`` and,
    when ``used / total >= high_watermark``, evicts
    ``max((high - low) * total, min_evict_bytes)`` bytes of least recently
    used cache rows from ``evict_tiers`` (pinned rows never). With
    ``evict_idle_models``, when that is not enough, idle models are asked to
    save and release their live contexts, largest first.
    """

    enabled: bool = False
    pressure_source: object = "system"
    """``"system"`` (host memory, or the cgroup v2 limit when one applies),
    ``"nvml"`` (VRAM of every NVIDIA GPU), ``"noop"``, or any object with
    ``sample() -> (used_bytes, total_bytes)`` (see :mod:`erllama.pressure`)."""
    interval_ms: int = 5000
    high_watermark: float = 0.85
    low_watermark: float = 0.75
    min_evict_bytes: int = 1 << 20
    evict_tiers: tuple[str, ...] | str = ("ram", "ram_file")
    """Tiers evicted from; ``"all"`` includes ``disk``."""
    evict_idle_models: bool = False

    def to_dict(self) -> dict[str, object]:
        """The settings the native scheduler takes (``pressure_source`` aside)."""
        tiers = [self.evict_tiers] if isinstance(self.evict_tiers, str) else list(self.evict_tiers)
        return {
            "enabled": bool(self.enabled),
            "interval_ms": int(self.interval_ms),
            "high_watermark": float(self.high_watermark),
            "low_watermark": float(self.low_watermark),
            "min_evict_bytes": int(self.min_evict_bytes),
            "evict_tiers": tiers,
            "evict_idle_models": bool(self.evict_idle_models),
        }
