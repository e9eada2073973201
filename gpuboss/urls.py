"""Which Redis a boss talks to: the configured URL, else the embedded one of this host."""

from __future__ import annotations

from gpuboss.config import BossConfig


def resolve_redis_url(config: BossConfig) -> str:
    """``redis_url`` from settings or ``GPUBOSS_REDIS_URL``; without one, this user's embedded Redis."""
    if config.redis_url:
        return config.redis_url
    from gpuboss.embedded import ensure_embedded

    return ensure_embedded().url
