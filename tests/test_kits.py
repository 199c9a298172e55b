"""The kit bridge: pure logic, no server."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from racto_nb import RactoCeleryWorker
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
    stored = set(ChatResponse.model_fields) - {"rate_limits"}  # headers go to the governor, not the result
    assert to_response_dict({"content": "x", "raw": object()}).keys() == stored


def test_openai_kit_repr_never_shows_the_key() -> None:
    kit = OpenAIKit("gpt-test", api_key="sk-very-secret", base_url="http://localhost:1/v1")
    assert "sk-very-secret" not in repr(kit)


def test_openai_kits_compare_by_settings_and_an_explicit_key_by_its_hash() -> None:
    settings: dict[str, Any] = {"base_url": "http://localhost:1/v1", "system_prompt": "Be brief.", "timeout_s": 30}
    kit = OpenAIKit("gpt-test", **settings)
    assert kit == OpenAIKit("gpt-test", **settings) and hash(kit) == hash(OpenAIKit("gpt-test", **settings))
    _ = kit.client  # a built client is not part of what the kit is
    assert kit == OpenAIKit("gpt-test", **settings)
    for changed in ({"timeout_s": 31}, {"system_prompt": None}, {"base_url": None}, {"api_key_env": "OTHER_KEY"}):
        assert OpenAIKit("gpt-test", **{**settings, **changed}) != kit, changed
    assert OpenAIKit("gpt-other", **settings) != kit

    keyed = OpenAIKit("gpt-test", api_key="sk-very-secret", **settings)
    assert keyed == OpenAIKit("gpt-test", api_key="sk-very-secret", **settings)
    assert keyed != OpenAIKit("gpt-test", api_key="sk-other", **settings) and keyed != kit
    assert "sk-very-secret" not in repr(keyed) and "sk-very-secret" not in str(vars(keyed).get("_api_key_sha256"))


def test_rerunning_a_worker_cell_with_the_same_openai_kit_settings_works() -> None:
    app = Celery(broker="memory://", backend="cache+memory://")
    RactoCeleryWorker(app, kit=OpenAIKit("gpt-test", base_url="http://localhost:1/v1"), name="rerun")
    again = RactoCeleryWorker(app, kit=OpenAIKit("gpt-test", base_url="http://localhost:1/v1"), name="rerun")
    assert again.kit == OpenAIKit("gpt-test", base_url="http://localhost:1/v1")
    with pytest.raises(ValueError, match="rerun"):
        RactoCeleryWorker(app, kit=OpenAIKit("gpt-other", base_url="http://localhost:1/v1"), name="rerun")
