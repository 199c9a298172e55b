"""Keys never leave the process that holds them: checked when a kit gets one, blanked in every stored text.

An API key reaches text by accident: an SDK puts the ``Authorization``
header into an exception (``Illegal header value b'Bearer sk-…\\n'``), a
provider's 401 body echoes the key, a user prints a config. Whatever text
racto_nb stores in the result backend (errors, attempt history) or writes
to a worker's log passes through :func:`redact` first, which blanks

* every key a kit was given in this process (:func:`remember_secret`), and
* anything shaped like an API key (``sk-…``, ``Bearer …``, Google's
  ``AIza…``, ``xai-…``, ``gsk_…``, ``hf_…``), configured here or not.

:func:`checked_key` is the other half: a key with whitespace or control
characters inside (a paste gone wrong) is a configuration error at once,
never a connection error retried three times with the key in its message.
"""

from __future__ import annotations

import logging
import re
import threading

from racto_nb.errors import ConfigError

__all__ = ["REDACTED", "RedactingFilter", "checked_key", "install_log_redaction", "redact", "remember_secret"]

#: What a secret becomes in stored text.
REDACTED = "***"

#: Key shapes of the common providers, and any bearer token. Deliberately broad: a false positive
#: costs a few characters of an error message, a miss costs a key.
_KEY_SHAPES = re.compile(
    r"(?:\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{6,}"  # OpenAI, Anthropic (sk-ant-), Stripe-like
    r"|\bAIza[0-9A-Za-z_\-]{20,}"  # Google
    r"|\b(?:xai|pplx)-[A-Za-z0-9]{10,}"  # xAI, Perplexity
    r"|\b(?:gsk|hf|r8)_[A-Za-z0-9]{10,}"  # Groq, Hugging Face, Replicate
    r")"
)
_BEARER = re.compile(r"(\bBearer\s+)[^\s'\"\\,;]+", re.IGNORECASE)
#: Shorter than this, a "secret" is a placeholder (``not-needed``) and blanking it would blank words.
_MIN_SECRET_CHARS = 8

_secrets: set[str] = set()
_lock = threading.Lock()


def remember_secret(value: str | None) -> None:
    """Blank ``value`` from every text this process redacts from now on (a kit calls this with its key)."""
    if value and len(value) >= _MIN_SECRET_CHARS:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every remembered secret and everything shaped like an API key replaced by ``***``."""
    if not text:
        return text
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _KEY_SHAPES.sub(REDACTED, text)


def checked_key(value: str, where: str) -> str:
    """``value`` without surrounding whitespace, or a ``ConfigError`` that never shows the key.

    A trailing newline from a paste is forgiven (stripped); whitespace or a
    control character inside the key cannot be meant, and sent as an HTTP
    header it fails as a connection error whose message contains the key.
    ``where`` names the setting to fix (``OPENAI_API_KEY``, ``api_key=``).
    """
    key = value.strip()
    if not key:
        raise ConfigError(f"{where} is empty (only whitespace); set it to your API key")
    bad = next((c for c in key if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ConfigError(
            f"{where} contains {'whitespace' if bad.isspace() else 'a control character'} "
            f"({len(key)} characters; not shown): set it again, copied without line breaks or spaces"
        )
    remember_secret(key)
    return key


class RedactingFilter(logging.Filter):
    """A log filter that redacts each record's final message (and its traceback text) in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add one :class:`RedactingFilter` to every handler of ``logger`` (the root logger by default).

    Handlers, not loggers: a logger's filters do not see records that
    propagate from its children (``celery.app.trace``, ``openai``, ...).
    """
    target = logger if logger is not None else logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
