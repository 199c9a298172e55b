"""Send many task messages fast.

``group(...).apply_async()`` costs about 1 ms a task here, most of it spent on
what a batch does not need: a result subscription per task (which then piles up
in Redis) and a producer acquired per message. This sends the same messages,
group id included, over one producer with routing resolved once, and where
kombu can (``Producer.batch``, kombu >= 5.7; pipelined LPUSHes on Redis) in
batches of ``chunk_size``: 10,000 messages in about 0.8 s instead of 3.5 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery import Celery, Task
from kombu.exceptions import OperationalError

from racto_nb.engine.store import broker_unreachable_message, connection_errors
from racto_nb.errors import BrokerUnreachable


def publish_many(
    app: Celery,
    task: Task,
    arg_tuples: Sequence[tuple[Any, ...]],
    task_ids: Sequence[str],
    *,
    group_id: str | None = None,
    queue: str | None = None,
    chunk_size: int = 500,
) -> None:
    """Publish ``task(*args)`` for every tuple of ``arg_tuples``, with the matching task id.

    Messages go out in pipelined chunks of ``chunk_size``, to ``queue`` when
    given (else where the app routes the task).
    """
    if len(arg_tuples) != len(task_ids):
        raise ValueError("arg_tuples and task_ids must have the same length")
    amqp = app.amqp
    wanted = dict(task._get_exec_options())
    if queue is not None:
        wanted["queue"] = queue
    options = amqp.router.route(wanted, task.name, None, None, task)
    options = {k: v for k, v in options.items() if v is not None}
    unreachable: tuple[type[BaseException], ...] = (OperationalError, OSError, *connection_errors())
    try:
        _send(app, task, arg_tuples, task_ids, options, group_id=group_id, chunk_size=chunk_size)
    except unreachable as exc:
        # One line naming the broker and the fix, not kombu's nine frames; rows not sent stay unsent.
        url = str(app.conf.broker_url)
        raise BrokerUnreachable(broker_unreachable_message(url, str(exc) or type(exc).__name__)) from None


def _send(
    app: Celery,
    task: Task,
    arg_tuples: Sequence[tuple[Any, ...]],
    task_ids: Sequence[str],
    options: dict[str, Any],
    *,
    group_id: str | None,
    chunk_size: int,
) -> None:
    amqp = app.amqp
    total = len(task_ids)
    with app.producer_or_acquire() as producer:
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            with _batch(producer, chunk_size):  # flushed on exit; dropped if a send fails
                for index in range(start, stop):
                    message = amqp.create_task_message(
                        task_ids[index],
                        task.name,
                        arg_tuples[index],
                        {},
                        group_id=group_id,
                        group_index=index if group_id else None,
                        root_id=task_ids[index],
                        # Celery would saferepr() every payload for logs: a third of the cost.
                        argsrepr="",
                        kwargsrepr="",
                        create_sent_event=app.conf.task_send_sent_event,
                        **options,
                    )
                    amqp.send_task_message(producer, task.name, message, **options)


def _batch(producer: Any, size: int) -> AbstractContextManager[Any]:
    """kombu's publish batch where the producer has one (a pipeline on Redis), else nothing."""
    make = getattr(producer, "batch", None)
    return make(max_size=size) if callable(make) else nullcontext()
