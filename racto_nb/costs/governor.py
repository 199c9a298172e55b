"""One rate governor for the whole fleet, and a budget a batch cannot overspend.

Celery's ``rate_limit`` is per worker process, so ten workers at "60/m" send
600 a minute and a fleet meets the provider's limit as a storm of 429s. Here
every worker process and every kernel that calls one provider endpoint with
one key name takes from **one token bucket** in Redis (a short Lua script, so
the check and the take are one step):

* two buckets in one: requests per minute and tokens per minute, each
  refilled continuously; its burst is half a second's worth, so no 10-second
  window sees more than the limit plus half a second of it (providers such as
  OpenAI enforce per-minute limits over shorter slices, so bursts hurt);
* a call takes one request and its *estimated* tokens (prompt plus
  ``max_tokens``, as providers count them); :meth:`Governor.settle` corrects
  the estimate with the reply's ``usage``;
* it adapts: a 429 with ``Retry-After``, or ``x-ratelimit-remaining-*`` at zero,
  puts the whole bucket on hold until then (:meth:`Governor.hold`), so one
  worker's 429 slows every worker instead of each finding out alone.

The :class:`Budget` is per batch: before a call the worker reserves its
highest cost (every ``max_tokens`` used), after it the reservation becomes
what the call really cost. A reservation that would pass ``max_cost_usd``
is refused, and the batch pauses instead of overspending.

The embedded mode uses the same classes over the in-process lock
(:class:`MemoryGovernor`, :class:`MemoryBudget`).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Budget",
    "Governor",
    "MemoryBudget",
    "MemoryGovernor",
    "RateLimits",
    "RedisBudget",
    "RedisGovernor",
    "governor_key",
    "hold_from_headers",
]


@dataclass(frozen=True)
class RateLimits:
    """Requests and tokens per minute (``None``: no limit of that kind)."""

    rpm: float | None = None
    tpm: float | None = None
    #: The bucket holds this many seconds' worth: the largest burst the provider sees.
    burst_s: float = 0.5

    @property
    def active(self) -> bool:
        return bool(self.rpm) or bool(self.tpm)

    def rates(self) -> tuple[float, float, float, float]:
        """``(requests/s, tokens/s, request capacity, token capacity)``; 0 for a kind without a limit."""
        rps = (self.rpm or 0.0) / 60.0
        tps = (self.tpm or 0.0) / 60.0
        return rps, tps, max(rps * self.burst_s, 1.0) if rps else 0.0, max(tps * self.burst_s, 1.0) if tps else 0.0


def governor_key(endpoint: str, key_name: str) -> str:
    """The bucket shared by everyone calling ``endpoint`` with the key in ``key_name``."""
    digest = hashlib.sha256(f"{endpoint}|{key_name}".encode()).hexdigest()[:20]
    return f"racto:rate:{digest}"


class Governor(Protocol):
    """A fleet-wide token bucket (see the module docstring)."""

    def acquire(self, tokens: int) -> float:
        """Take one request and ``tokens``; returns 0 when granted, else how many seconds to wait first."""

    def settle(self, estimated: int, actual: int) -> None:
        """Correct a granted estimate with what the call really used."""

    def hold(self, seconds: float) -> None:
        """Grant nothing to anyone for ``seconds`` (a 429's ``Retry-After``)."""


class Budget(Protocol):
    """A batch's spending cap (see the module docstring)."""

    def reserve(self, usd: float) -> bool:
        """Set ``usd`` aside for a call; ``False`` when that would pass the cap."""

    def settle(self, reserved: float, actual: float) -> None: ...

    def spent(self) -> float: ...

    def set_cap(self, usd: float) -> None:
        """A new cap (a resumed batch's)."""


# ---------------------------------------------------------------------------- Redis

_ACQUIRE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rps, tps = tonumber(ARGV[1]), tonumber(ARGV[2])
local cap_r, cap_t = tonumber(ARGV[3]), tonumber(ARGV[4])
local need_t = tonumber(ARGV[5])
local b = redis.call('HMGET', KEYS[1], 'r', 't', 'ts', 'hold')
local hold = tonumber(b[4]) or 0
if hold > now then return tostring(hold - now) end
local r, t, ts = tonumber(b[1]), tonumber(b[2]), tonumber(b[3])
if not ts then r, t, ts = cap_r, cap_t, now end
local dt = math.max(0, now - ts)
r = math.min(cap_r, r + dt * rps)
t = math.min(cap_t, t + dt * tps)
local wait = 0
if rps > 0 and r < 1 then wait = math.max(wait, (1 - r) / rps) end
if tps > 0 and t < math.min(need_t, cap_t) then wait = math.max(wait, (math.min(need_t, cap_t) - t) / tps) end
if wait == 0 then
  if rps > 0 then r = r - 1 end
  if tps > 0 then t = t - need_t end
end
redis.call('HSET', KEYS[1], 'r', r, 't', t, 'ts', now)
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
"""

_SETTLE = """
local cap_t = tonumber(ARGV[2])
local t = tonumber(redis.call('HGET', KEYS[1], 't') or cap_t)
t = math.min(cap_t, t + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 't', t)
return 1
"""

_HOLD = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local until_ = now + tonumber(ARGV[1])
local hold = tonumber(redis.call('HGET', KEYS[1], 'hold') or 0)
if until_ > hold then redis.call('HSET', KEYS[1], 'hold', until_) end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""


class RedisGovernor:
    """:class:`Governor` over one Redis hash, shared by the fleet."""

    def __init__(self, client: Any, key: str, limits: RateLimits) -> None:
        self.key = key
        self.limits = limits
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)
        self._hold = client.register_script(_HOLD)

    def acquire(self, tokens: int) -> float:
        rps, tps, cap_r, cap_t = self.limits.rates()
        return float(self._acquire(keys=[self.key], args=[rps, tps, cap_r, cap_t, max(tokens, 0)]))

    def settle(self, estimated: int, actual: int) -> None:
        _, tps, _, cap_t = self.limits.rates()
        if tps:
            self._settle(keys=[self.key], args=[estimated - actual, cap_t])

    def hold(self, seconds: float) -> None:
        if seconds > 0:
            self._hold(keys=[self.key], args=[seconds])


_RESERVE = """
local cap = tonumber(redis.call('HGET', KEYS[1], 'cap') or '-1')
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local amount = tonumber(ARGV[1])
if cap >= 0 and spent + reserved + amount > cap then return 0 end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', amount)
return 1
"""

_SPEND = """
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', -tonumber(ARGV[1]))
redis.call('HINCRBYFLOAT', KEYS[1], 'spent', tonumber(ARGV[2]))
return 1
"""


class RedisBudget:
    """:class:`Budget` over a Redis hash per batch (``cap``, ``spent``, ``reserved``); the kernel sets the cap."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key
        self._reserve = client.register_script(_RESERVE)
        self._spend = client.register_script(_SPEND)

    def reserve(self, usd: float) -> bool:
        return bool(self._reserve(keys=[self.key], args=[usd]))

    def settle(self, reserved: float, actual: float) -> None:
        self._spend(keys=[self.key], args=[reserved, actual])

    def spent(self) -> float:
        return float(self.client.hget(self.key, "spent") or 0.0)

    def set_cap(self, usd: float) -> None:
        self.client.hset(self.key, "cap", usd)
        self.client.expire(self.key, 30 * 24 * 3600)


# ---------------------------------------------------------------------------- in-process


class MemoryGovernor:
    """:class:`Governor` for the embedded mode: the same arithmetic under a lock."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        _, _, cap_r, cap_t = limits.rates()
        self._r, self._t, self._ts, self._hold_until = cap_r, cap_t, time.monotonic(), 0.0

    def acquire(self, tokens: int) -> float:
        rps, tps, cap_r, cap_t = self.limits.rates()
        with self._lock:
            now = time.monotonic()
            if self._hold_until > now:
                return self._hold_until - now
            dt = max(0.0, now - self._ts)
            self._r = min(cap_r, self._r + dt * rps)
            self._t = min(cap_t, self._t + dt * tps)
            self._ts = now
            wait = 0.0
            if rps and self._r < 1:
                wait = max(wait, (1 - self._r) / rps)
            if tps and self._t < min(tokens, cap_t):
                wait = max(wait, (min(tokens, cap_t) - self._t) / tps)
            if wait == 0.0:
                self._r -= 1 if rps else 0
                self._t -= tokens if tps else 0
            return wait

    def settle(self, estimated: int, actual: int) -> None:
        _, tps, _, cap_t = self.limits.rates()
        if tps:
            with self._lock:
                self._t = min(cap_t, self._t + estimated - actual)

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._hold_until = max(self._hold_until, time.monotonic() + seconds)


class MemoryBudget:
    """:class:`Budget` for the embedded mode."""

    def __init__(self, cap: float | None) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._spent = 0.0
        self._reserved = 0.0

    def reserve(self, usd: float) -> bool:
        with self._lock:
            if self.cap is not None and self._spent + self._reserved + usd > self.cap:
                return False
            self._reserved += usd
            return True

    def settle(self, reserved: float, actual: float) -> None:
        with self._lock:
            self._reserved -= reserved
            self._spent += actual

    def spent(self) -> float:
        with self._lock:
            return self._spent

    def set_cap(self, usd: float) -> None:
        with self._lock:
            self.cap = usd


# ---------------------------------------------------------------------------- provider headers

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$")


def _seconds(text: str) -> float | None:
    """``"6m0s"``, ``"1.5s"``, ``"120ms"`` or plain seconds, as OpenAI sends reset times."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION.match(text)
    if not match or not any(match.groups()):
        return None
    hours, minutes, secs, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + secs + millis / 1000


def hold_from_headers(headers: Mapping[str, str]) -> float:
    """Seconds the whole fleet should wait per ``x-ratelimit-remaining-*`` / ``-reset-*`` (0: no need)."""
    lower = {k.lower(): v for k, v in headers.items()}
    hold = 0.0
    for kind in ("requests", "tokens"):
        remaining = lower.get(f"x-ratelimit-remaining-{kind}")
        reset = lower.get(f"x-ratelimit-reset-{kind}")
        if remaining is None or reset is None:
            continue
        try:
            left = float(remaining)
        except ValueError:
            continue
        wait = _seconds(reset)
        if left <= 0 and wait:
            hold = max(hold, wait)
    return hold
