"""The kit bridge: pure logic, no server."""

from __future__ import annotations

from racto_nb.kits import OpenAIKit, to_response_dict
from racto_nb.kits.base import chat_messages
from racto_nb.models import ChatConfig, ChatResponse


def test_messages_put_the_kit_system_prompt_first() -> None:
    config = ChatConfig(user_message="now", history=[{"role": "user", "content": "before"}])  # type: ignore[list-item]
    assert chat_messages("Be brief.", config) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "before"},
        {"role": "user", "content": "now"},
    ]


def test_a_per_call_system_message_replaces_the_kits() -> None:
    config = ChatConfig(user_message="now", history=[{"role": "system", "content": "Three bullets."}])  # type: ignore[list-item]
    messages = chat_messages("Be brief.", config)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "Three bullets."


def test_responses_become_json_without_the_raw_object() -> None:
    response = ChatResponse(content='{"label": "positive"}', usage={"total_tokens": 3}, model="m")
    assert to_response_dict(response) == {
        "content": '{"label": "positive"}',
        "parsed": {"label": "positive"},
        "usage": {"total_tokens": 3},
        "finish_reason": None,
        "model": "m",
    }
    assert to_response_dict("plain text")["content"] == "plain text"
    assert to_response_dict({"content": "x", "raw": object()}).keys() == set(ChatResponse.model_fields)


def test_openai_kit_repr_never_shows_the_key() -> None:
    kit = OpenAIKit("gpt-test", api_key="sk-very-secret", base_url="http://localhost:1/v1")
    assert "sk-very-secret" not in repr(kit)
