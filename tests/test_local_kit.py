"""LocalKit against the real SmolLM2-135M GGUF: no mocks of the model.

Every generation asks for a handful of tokens so the file stays well under a
minute on two CPU cores; one kit (one model process) is shared by the module.
What happens when that process dies is in ``test_local_process.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

from racto_nb.kits.base import run_chat
from racto_nb.kits.local import (
    CHATML_STOP,
    DEFAULT_MAX_TOKENS_CAP,
    EXTRA_KEYS,
    SMOLLM2_MODEL,
    LocalKit,
    find_smollm2_gguf,
)
from racto_nb.models import ChatConfig, Message

pytestmark = pytest.mark.slow

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture(scope="module")
def kit() -> LocalKit:
    kit = LocalKit(n_threads=2)
    kit.load()
    return kit


def test_bundled_gguf_is_found() -> None:
    path = find_smollm2_gguf()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000


def test_construction_is_cheap_and_lazy() -> None:
    fresh = LocalKit()
    assert not fresh.loaded
    assert fresh.load_s is None and fresh.pid is None
    assert fresh.model == SMOLLM2_MODEL


def test_chat_returns_text_and_sane_usage(kit: LocalKit) -> None:
    response = kit.chat(ChatConfig(user_message="What is the capital of France?", max_tokens=16))
    assert response.content and response.content.strip()
    usage = response.usage
    assert usage["prompt_tokens"] > 5
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response.finish_reason in {"stop", "length"}
    assert response.model == SMOLLM2_MODEL
    assert kit.load_s is not None and kit.load_s > 0


def test_run_chat_returns_json_dict(kit: LocalKit) -> None:
    out = run_chat(kit, ChatConfig(user_message="Say hi.", max_tokens=4))
    assert set(out) == {"content", "parsed", "usage", "finish_reason", "model"}
    assert isinstance(out["content"], str)


def test_temperature_zero_same_seed_is_deterministic(kit: LocalKit) -> None:
    config = ChatConfig(user_message="Name three colours.", temperature=0.0, max_tokens=12)
    assert kit.chat(config).content == kit.chat(config).content


def test_sampling_with_same_seed_is_reproducible(kit: LocalKit) -> None:
    config = ChatConfig(user_message=LONG_PROMPT, temperature=1.0, max_tokens=12, extra={"seed": 7})
    assert kit.chat(config).content == kit.chat(config).content


def test_small_max_tokens_stops_with_length(kit: LocalKit) -> None:
    response = kit.chat(ChatConfig(user_message=LONG_PROMPT, max_tokens=8))
    assert response.usage["completion_tokens"] <= 8
    assert response.finish_reason == "length"


def test_max_tokens_is_capped() -> None:
    capped = LocalKit(max_tokens_cap=32)
    assert capped.sampling_kwargs(ChatConfig(user_message="hi"))["max_tokens"] == 32
    assert capped.sampling_kwargs(ChatConfig(user_message="hi", max_tokens=5))["max_tokens"] == 5


def test_stop_strings_are_the_chat_templates_and_extra_adds_to_them() -> None:
    assert CHATML_STOP == ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    kit = LocalKit()
    assert kit.sampling_kwargs(ChatConfig(user_message="hi"))["stop"] == list(CHATML_STOP)
    with_newline = kit.sampling_kwargs(ChatConfig(user_message="hi", extra={"stop": ["\n", "<|im_end|>"]}))
    assert with_newline["stop"] == [*CHATML_STOP, "\n"]
    assert LocalKit(stop=()).sampling_kwargs(ChatConfig(user_message="hi"))["stop"] == []
    with pytest.raises(ValueError, match="stop"):
        LocalKit(stop="<|im_end|>")


def test_default_cap_cuts_a_looping_answer(kit: LocalKit) -> None:
    # At temperature 0 this prompt makes SmolLM2-135M loop (1,000 tokens when allowed); ChatConfig asks for 4096.
    assert kit.max_tokens_cap == DEFAULT_MAX_TOKENS_CAP == 256
    response = kit.chat(ChatConfig(user_message=LONG_PROMPT, temperature=0.0))
    assert response.finish_reason == "length"
    assert response.usage["completion_tokens"] == DEFAULT_MAX_TOKENS_CAP


def test_short_answers_stop_by_themselves_without_template_markers(kit: LocalKit) -> None:
    for prompt in ("What is the capital of France? Answer in one word.", "Say hello to Ada."):
        response = kit.chat(ChatConfig(user_message=prompt, temperature=0.0))
        assert response.finish_reason == "stop", response.content
        assert response.usage["completion_tokens"] < DEFAULT_MAX_TOKENS_CAP
        assert response.content and "<|" not in response.content


def test_kits_compare_by_settings_not_by_process(kit: LocalKit) -> None:
    same = LocalKit(n_threads=2)
    assert kit.loaded and not same.loaded
    assert same == kit and hash(same) == hash(kit)
    assert len({kit, same}) == 1
    assert LocalKit(n_threads=2, seed=1) != kit
    assert LocalKit(n_threads=2, system_prompt="Be brief.") != kit
    assert LocalKit(n_threads=2, max_tokens_cap=64) != kit
    assert LocalKit(n_threads=2, extra_bufts=True) != kit
    assert LocalKit(n_threads=2, model_path=find_smollm2_gguf()) == kit
    assert kit != "LocalKit"


def test_copies_carry_the_settings_not_the_process(kit: LocalKit) -> None:
    for clone in (copy.copy(kit), pickle.loads(pickle.dumps(kit))):
        assert clone == kit
        assert not clone.loaded and clone.pid is None and clone.load_s is None
    assert kit.loaded  # the original keeps its process


def test_history_is_sent(kit: LocalKit) -> None:
    bare = kit.chat(ChatConfig(user_message="What is my name?", max_tokens=1))
    history = [
        Message(role="user", content="Hello, my name is Zorblax and I live on the moon."),
        Message(role="assistant", content="Nice to meet you, Zorblax!"),
    ]
    with_history = kit.chat(ChatConfig(user_message="What is my name?", max_tokens=1, history=history))
    assert with_history.usage["prompt_tokens"] > bare.usage["prompt_tokens"] + 20


def test_system_prompt_is_sent(kit: LocalKit) -> None:
    # Longer than the template's built-in default system prompt, which is used
    # when none is given: so a larger prompt proves ours replaced it.
    system = (
        "You are a meticulous pirate librarian. Answer every question in the voice of a pirate, "
        "cite an imaginary book for each claim, and never use more than two sentences."
    )
    pirate = LocalKit(system_prompt=system, n_threads=2)
    config = ChatConfig(user_message="What is the capital of France?", max_tokens=1)
    assert pirate.build_messages(config)[0] == {"role": "system", "content": system}
    with_system = pirate.chat(config)
    without = kit.chat(config)
    assert with_system.usage["prompt_tokens"] > without.usage["prompt_tokens"] + 10


def test_supported_extra_keys_are_passed(kit: LocalKit) -> None:
    extra: dict[str, Any] = {"top_p": 0.9, "top_k": 20, "repeat_penalty": 1.1, "seed": 3, "stop": ["\n"]}
    response = kit.chat(ChatConfig(user_message=LONG_PROMPT, max_tokens=24, extra=extra))
    assert response.content is not None
    assert "\n" not in response.content


def test_unknown_extra_key_fails_before_generation() -> None:
    fresh = LocalKit()
    with pytest.raises(ValueError, match="response_format") as info:
        fresh.chat(ChatConfig(user_message="hi", extra={"response_format": {"type": "json_object"}}))
    for key in EXTRA_KEYS:
        assert key in str(info.value)
    assert not fresh.loaded and fresh.pid is None  # rejected in this process, before a model process started


def test_ill_typed_extra_value_is_rejected() -> None:
    with pytest.raises(ValueError, match="top_k"):
        LocalKit().chat(ChatConfig(user_message="hi", extra={"top_k": "many"}))


def test_concurrent_calls_from_threads_all_succeed(kit: LocalKit) -> None:
    config = ChatConfig(user_message="Count to five.", max_tokens=8)
    results: list[str | None] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(kit.chat(config).content)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 4
    # Greedy decoding on a lock-serialised model: four identical, uncorrupted answers.
    assert len(set(results)) == 1 and results[0]


def test_describe_and_repr_show_settings(kit: LocalKit) -> None:
    info = kit.describe()
    assert info["model_path"] == str(kit.model_path)
    assert info["n_threads"] == 2 and info["loaded"] is True
    assert info["pid"] == kit.pid and info["pid"] is not None
    assert isinstance(info["extra_bufts"], bool) and info["extra_bufts_why"]
    assert info["stop"] == list(CHATML_STOP) and info["max_tokens_cap"] == 256
    assert str(kit.model_path) in repr(kit)


def test_missing_model_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no GGUF"):
        LocalKit(model_path=tmp_path / "absent.gguf")


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "llama_cpp" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"racto_nb\[local\]"):
        LocalKit()
