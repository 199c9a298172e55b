"""What a worker consults around each call: the ledger, the rate governor, the batch's budget, the prices.

:mod:`racto_nb.costs` holds the pieces and knows nothing of Celery or of where
the results live; this module picks their Redis or in-process form for the
store a chunk runs against, once per process, and gives the runner the few
questions it asks: has this been paid for, may I call now, may I spend this,
what did it cost.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from racto_nb.config import DEFAULT_CACHE_MAX_ENTRIES, DEFAULT_CACHE_TTL_S, DEFAULT_CHECKPOINT_DIR, RactoConfig
from racto_nb.costs.estimate import token_counter
from racto_nb.costs.governor import (
    Budget,
    Governor,
    MemoryBudget,
    MemoryGovernor,
    RateLimits,
    RedisBudget,
    RedisGovernor,
    governor_key,
)
from racto_nb.costs.ledger import Ledger, RedisLedger, SqliteLedger, fingerprint
from racto_nb.costs.prices import PriceTable, price_table
from racto_nb.engine.keys import budget_key
from racto_nb.engine.store import MemoryStore, RedisStore, Store
from racto_nb.kits.base import Kit, chat_messages
from racto_nb.models import ChatConfig

__all__ = ["SpendSettings", "Spending"]


@dataclass(frozen=True)
class SpendSettings:
    """A worker's limits and prices, and where and how long its ledger keeps answers."""

    limits: RateLimits = field(default_factory=RateLimits)
    prices: PriceTable = field(default_factory=price_table)
    cache_ttl_s: float = DEFAULT_CACHE_TTL_S
    cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES
    #: The embedded mode's ledger file goes here (``ledger.sqlite``), beside the batch checkpoints.
    ledger_dir: str = DEFAULT_CHECKPOINT_DIR

    @classmethod
    def from_config(cls, cfg: RactoConfig) -> SpendSettings:
        """What ``RACTO_RPM``, ``RACTO_TPM``, ``RACTO_PRICE_*``, ``RACTO_CACHE_*`` and the checkpoint folder say."""
        return cls(
            limits=RateLimits(rpm=cfg.rpm, tpm=cfg.tpm),
            prices=price_table(cfg.price_in_per_mtok, cfg.price_out_per_mtok),
            cache_ttl_s=cfg.cache_ttl_s,
            cache_max_entries=cfg.cache_max_entries,
            ledger_dir=cfg.checkpoint_dir,
        )


_memory_governors: dict[str, MemoryGovernor] = {}
_memory_budgets: dict[str, MemoryBudget] = {}
_shared_lock = threading.Lock()


class Spending:
    """The spending side of one ``RactoCeleryWorker`` (its kit, its settings)."""

    def __init__(self, kit: Kit, settings: SpendSettings) -> None:
        self.kit = kit
        self.settings = settings
        identity = getattr(kit, "cache_identity", None)
        #: Who answers, for the ledger; ``None`` for a kit that does not say (it is never answered from the ledger).
        self.identity: dict[str, Any] | None = identity() if callable(identity) else None
        rate_key = getattr(kit, "rate_key", None)
        self._rate_key: tuple[str, str] | None = rate_key() if callable(rate_key) else None
        self._ledgers: dict[int, Ledger] = {}
        self._governors: dict[int, Governor] = {}
        self._lock = threading.Lock()
        self.counter = token_counter(getattr(kit, "model", None))

    # ------------------------------------------------------------------ the ledger

    def fingerprint(self, config: ChatConfig, output: dict[str, Any] | None = None) -> str | None:
        """The row's fingerprint, or ``None`` when the kit cannot be cached."""
        if self.identity is None:
            return None
        request = {
            "history": [m.model_dump() for m in config.history],
            "message": config.user_message,
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
            "extra": config.extra,
            "output": output,
        }
        return fingerprint(self.identity, request)

    def ledger(self, store: Store) -> Ledger | None:
        """The ledger for ``store``'s deployment (Redis beside the results; a SQLite file when embedded)."""
        if self.identity is None:
            return None
        with self._lock:
            found = self._ledgers.get(id(store))
            if found is None:
                found = self._build_ledger(store)
                self._ledgers[id(store)] = found
            return found

    def _build_ledger(self, store: Store) -> Ledger:
        ttl, cap = self.settings.cache_ttl_s, self.settings.cache_max_entries
        if isinstance(store, RedisStore):
            return RedisLedger(store.client, ttl_s=ttl, max_entries=cap)
        return SqliteLedger(Path(self.settings.ledger_dir) / "ledger.sqlite", ttl_s=ttl, max_entries=cap)

    # ------------------------------------------------------------------ rates and budget

    def governor(self, store: Store) -> Governor | None:
        """The fleet's bucket for this kit's endpoint and key name, when limits are set."""
        limits = self.settings.limits
        if not limits.active:
            return None
        endpoint, key_name = self._rate_key or (type(self.kit).__qualname__, "")
        key = governor_key(endpoint, key_name)
        with self._lock:
            found = self._governors.get(id(store))
            if found is None:
                if isinstance(store, MemoryStore):
                    with _shared_lock:
                        found = _memory_governors.setdefault(key, MemoryGovernor(limits))
                else:
                    assert isinstance(store, RedisStore)
                    found = RedisGovernor(store.client, key, limits)
                self._governors[id(store)] = found
            return found

    @staticmethod
    def budget(store: Store, batch_id: str, cap: float) -> Budget:
        """The batch's budget (its cap set by the kernel that submitted it)."""
        if isinstance(store, MemoryStore):
            with _shared_lock:
                return _memory_budgets.setdefault(batch_id, MemoryBudget(cap))
        assert isinstance(store, RedisStore)
        return RedisBudget(store.client, budget_key(batch_id))

    # ------------------------------------------------------------------ tokens and dollars

    def prompt_tokens(self, config: ChatConfig) -> int:
        """The prompt's tokens, as the kit will send it (system prompt, history, message)."""
        system = getattr(self.kit, "system_prompt", None)
        texts = [m["content"] for m in chat_messages(system if isinstance(system, str) else None, config)]
        return self.counter.chat(texts)

    def cost(self, model: str | None, usage: dict[str, Any] | None) -> float | None:
        """Dollars for a reply with ``usage`` (``None`` when the model has no price)."""
        return self.settings.prices.cost(model or getattr(self.kit, "model", None), usage)

    @property
    def priced(self) -> bool:
        """Whether the price table knows the kit's model (a spending cap needs a price to count against)."""
        return self.settings.prices.price(getattr(self.kit, "model", None)) is not None

    def highest_cost(self, prompt_tokens: int, max_tokens: int) -> float | None:
        """What a call could cost at most: every ``max_tokens`` used."""
        price = self.settings.prices.price(getattr(self.kit, "model", None))
        return None if price is None else price.cost(prompt_tokens, max_tokens)
