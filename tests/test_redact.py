"""Keys are checked when a kit gets them and blanked from every text racto_nb stores or logs (pure logic)."""

from __future__ import annotations

import logging

import pytest

from racto_nb.errors import ConfigError
from racto_nb.kits import OpenAIKit
from racto_nb.redact import RedactingFilter, checked_key, redact, remember_secret


@pytest.mark.parametrize(
    "text",
    [
        "Illegal header value b'Bearer sk-live-12345678\\n'",
        "Incorrect API key provided: sk-proj-Ab12Cd34Ef56Gh78Ij90",
        "key=AIzaSyA1234567890abcdefghijklmnopq rejected",
        "groq said gsk_abcdefghij1234567890 is wrong",
        "hf_abcdefghijKLMNOP0123 expired",
        "Authorization: Bearer some.opaque.token-value",
    ],
)
def test_anything_shaped_like_a_key_is_blanked(text: str) -> None:
    cleaned = redact(text)
    assert "***" in cleaned
    for secret in ("sk-live-1234", "Ab12Cd34", "AIzaSyA1234", "gsk_abcdefghij", "hf_abcdefghij", "opaque.token"):
        assert secret not in cleaned


def test_a_remembered_key_of_any_shape_is_blanked_and_words_are_not() -> None:
    remember_secret("plainsecret-77Q")
    assert redact("got plainsecret-77Q back") == "got *** back"
    remember_secret("short")  # too short to be a real key: blanking it would blank ordinary words
    assert redact("a short task-id and risk-free words stay") == "a short task-id and risk-free words stay"


def test_a_pasted_newline_is_forgiven_and_a_space_inside_is_a_config_error_that_hides_the_key() -> None:
    assert checked_key("sk-good-key-123\n", "OPENAI_API_KEY") == "sk-good-key-123"
    with pytest.raises(ConfigError) as info:
        checked_key("sk-bad key-123", "OPENAI_API_KEY")
    message = str(info.value)
    assert message.startswith("OPENAI_API_KEY contains whitespace") and "bad key" not in message
    with pytest.raises(ConfigError, match="control character"):
        checked_key("sk-bad\x00key", "api_key=")
    with pytest.raises(ConfigError, match="empty"):
        checked_key(" \n", "api_key=")


def test_the_kit_refuses_a_broken_key_when_built_not_on_the_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="api_key= contains whitespace"):
        OpenAIKit("m", api_key="sk-abc def-123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc\tdef-123")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY contains whitespace"):
        OpenAIKit("m")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc-def-123\r\n")
    assert OpenAIKit("m").client.api_key == "sk-abc-def-123"


def test_log_lines_and_tracebacks_are_redacted_by_the_handler_filter() -> None:
    record = logging.LogRecord(
        "openai", logging.ERROR, __file__, 1, "call failed: %s", ("Bearer sk-abc-12345678",), None
    )
    try:
        raise RuntimeError("header b'Bearer sk-abc-12345678'")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "call failed: Bearer ***"
    assert record.exc_text is not None and "sk-abc-1234" not in record.exc_text
