"""What a batch would cost, before anything is sent.

The same rows a batch would send (skipped rows left out, twins counted once,
rows the pay-once ledger already answers left out), their prompt tokens (a
real tokenizer where one is available, see :mod:`racto_nb.costs.estimate`) and
the price table's dollars: ``cost_usd_low`` if every answer were empty,
``cost_usd_high`` if every answer used ``max_tokens``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from racto_nb.batch.checkpoint import INPUT_PART_ROWS
from racto_nb.batch.rows import Rows
from racto_nb.batch.twins import Twins, request_hashes
from racto_nb.costs.estimate import Estimate
from racto_nb.kits.base import chat_messages
from racto_nb.models import ChatConfig

if TYPE_CHECKING:
    from racto_nb.engine.worker import RactoCeleryWorker

__all__ = ["estimate_rows"]


def estimate_rows(
    worker: RactoCeleryWorker, rows: Rows, *, temperature: float, max_tokens: int, cache: bool = True
) -> Estimate:
    """The :class:`~racto_nb.costs.estimate.Estimate` of sending ``rows`` through ``worker``'s kit."""
    spending = worker.spending
    n = len(rows)
    messages: list[str | None] = []
    overrides = []
    for start in range(0, n, INPUT_PART_ROWS):
        rendered = rows.render(start, min(start + INPUT_PART_ROWS, n))
        messages.extend(rendered.messages)
        overrides.extend(rendered.overrides)
    twins = Twins.of(*request_hashes(messages, overrides)) if cache else Twins.none(n)
    leaders = [i for i, m in enumerate(messages) if m is not None and twins.leader_of[i] < 0]
    configs = [
        ChatConfig(
            user_message=messages[i] or "-",
            temperature=(overrides[i] or {}).get("temperature", temperature),
            max_tokens=(overrides[i] or {}).get("max_tokens", max_tokens),
            extra=(overrides[i] or {}).get("extra") or {},
        )
        for i in leaders
    ]
    cached = 0
    ledger = spending.ledger(worker.store) if cache else None
    if ledger is not None:
        prints = [spending.fingerprint(config) for config in configs]
        keyed = [(i, fp) for i, fp in enumerate(prints) if fp is not None]
        found = ledger.get_many([fp for _, fp in keyed])
        answered = {i for (i, _), entry in zip(keyed, found, strict=True) if entry is not None}
        cached = len(answered)
        configs = [c for i, c in enumerate(configs) if i not in answered]
    system = getattr(worker.kit, "system_prompt", None)
    counter = spending.counter
    prompt_tokens = sum(
        counter.chat([m["content"] for m in chat_messages(system if isinstance(system, str) else None, c)])
        for c in configs
    )
    answer_tokens = sum(c.max_tokens for c in configs)
    model = getattr(worker.kit, "model", None)
    price = spending.settings.prices.price(model if isinstance(model, str) else None)
    low = None if price is None else price.cost(prompt_tokens, 0)
    high = None if price is None else price.cost(prompt_tokens, answer_tokens)
    return Estimate(
        rows=n,
        sent=len(configs),
        cached=cached,
        duplicates=twins.count,
        prompt_tokens=int(prompt_tokens),
        approximate=not counter.exact,
        max_tokens=max_tokens,
        model=model if isinstance(model, str) else None,
        cost_usd_low=low,
        cost_usd_high=high,
        prices_as_of=spending.settings.prices.as_of if price is not None else None,
    )
