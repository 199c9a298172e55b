"""FakeOpenAIServer, driven by the real openai SDK over real HTTP.

The point of the fake is that SDK exceptions come out exactly as they would
from the real API, so these tests pin that down: if an SDK upgrade changes how
a 429 or a dropped connection surfaces, this file is where it shows.
"""

from __future__ import annotations

import json
import math
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from racto_nb.testing import FakeOpenAIControl, FakeOpenAIServer, Fault
from racto_nb.testing.openai_server import OpenAIFaultControl, fake_embedding


def _client(base_url: str, timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=timeout)


def _chat(client: openai.OpenAI, text: str, *, system: str | None = None, model: str = "fake-model") -> str:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    reply = client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
    content = reply.choices[0].message.content
    assert content is not None
    return content


@pytest.fixture
def client(fake_openai: FakeOpenAIServer) -> openai.OpenAI:
    return _client(fake_openai.base_url)


# -- replies -------------------------------------------------------------------


def test_chat_echoes_last_user_message_with_usage(client: openai.OpenAI, unique_case: str) -> None:
    text = f"hello there [case:{unique_case}]"
    reply = client.chat.completions.create(
        model="my-model",
        messages=[
            {"role": "user", "content": "earlier turn"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": text},
        ],
    )
    assert reply.choices[0].message.content == f"echo: {text}"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "my-model"
    assert reply.object == "chat.completion"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 2 + 1 + 3
    assert reply.usage.completion_tokens == 4  # "echo:", "hello", "there", "[case:...]"
    assert reply.usage.total_tokens == 10


def test_system_message_is_visible_as_prefix(client: openai.OpenAI, unique_case: str) -> None:
    system = "You are a very careful assistant who answers in French only."
    content = _chat(client, f"hi [case:{unique_case}]", system=system)
    assert content == f"[system: {system[:40]}] echo: hi [case:{unique_case}]"


def test_json_marker_replies_with_json(client: openai.OpenAI, unique_case: str) -> None:
    text = f"give me json [json] [case:{unique_case}]"
    assert json.loads(_chat(client, text)) == {"echo": text}
    assert json.loads(_chat(client, text, system="Be terse.")) == {"echo": text, "system": "Be terse."}


def test_response_format_json_object_replies_with_json(client: openai.OpenAI, unique_case: str) -> None:
    text = f"no marker [case:{unique_case}]"
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content or "") == {"echo": text}


def test_streaming_is_refused_loudly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not stream"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)


def test_embeddings_are_deterministic_unit_vectors(client: openai.OpenAI, unique_case: str) -> None:
    inputs = ["alpha", "beta gamma", f"delta [case:{unique_case}]"]
    # The SDK asks for base64 float32 unless told otherwise; both must work.
    as_b64 = client.embeddings.create(model="emb", input=inputs)
    as_float = client.embeddings.create(model="emb", input=inputs, encoding_format="float")
    assert [len(d.embedding) for d in as_b64.data] == [8, 8, 8]
    for text, b64, flt in zip(inputs, as_b64.data, as_float.data, strict=True):
        assert flt.embedding == fake_embedding(text)
        assert b64.embedding == pytest.approx(fake_embedding(text), abs=1e-6)
        assert math.isclose(sum(v * v for v in flt.embedding), 1.0)
    assert as_b64.data[0].embedding != as_b64.data[1].embedding
    assert as_float.model == "emb"
    assert as_float.usage.prompt_tokens == 1 + 2 + 2
    assert len(client.embeddings.create(model="emb", input="one", dimensions=3).data[0].embedding) == 3


def test_models_endpoint(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-model"]


# -- recording -----------------------------------------------------------------


def test_requests_are_recorded_per_case(
    fake_openai: FakeOpenAIServer, client: openai.OpenAI, unique_case: str
) -> None:
    before = time.monotonic()
    _chat(client, f"one [case:{unique_case}]", model="model-a")
    _chat(client, f"two [case:{unique_case}]", model="model-b")
    client.embeddings.create(model="emb", input=["x", f"y [case:{unique_case}]"])

    records = fake_openai.requests(unique_case)
    assert fake_openai.count(unique_case) == 3
    assert [r.seq for r in records] == [1, 2, 3]
    assert [r.model for r in records] == ["model-a", "model-b", "emb"]
    assert [r.path for r in records] == ["/v1/chat/completions"] * 2 + ["/v1/embeddings"]
    assert all(r.authorization == "Bearer sk-test" for r in records)
    assert records[0].body["messages"][-1]["content"] == f"one [case:{unique_case}]"
    assert before <= records[0].arrived_at <= records[1].arrived_at <= records[2].arrived_at
    assert fake_openai.count(unique_case + "-other") == 0


# -- faults --------------------------------------------------------------------


def test_scripted_500_then_success(
    fake_openai: FakeOpenAIServer, client: openai.OpenAI, unique_case: str
) -> None:
    fake_openai.script(unique_case, ["500"])
    with pytest.raises(openai.InternalServerError) as info:
        _chat(client, f"hi [case:{unique_case}]")
    assert info.value.status_code == 500
    assert info.value.type == "server_error"
    assert unique_case in info.value.message
    assert _chat(client, f"hi [case:{unique_case}]") == f"echo: hi [case:{unique_case}]"
    assert fake_openai.count(unique_case) == 2
    assert [r.outcome for r in fake_openai.requests(unique_case)] == ["500", "ok"]


def test_429_carries_retry_after_headers(
    fake_openai: FakeOpenAIServer, client: openai.OpenAI, unique_case: str
) -> None:
    fake_openai.script(unique_case, [Fault(429, retry_after="2", retry_after_ms=1500), "429:7"])
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client, f"[case:{unique_case}]")
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.response.headers["retry-after-ms"] == "1500"
    assert info.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client, f"[case:{unique_case}]")
    assert info.value.response.headers["retry-after"] == "7"
    assert "retry-after-ms" not in info.value.response.headers


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (404, openai.NotFoundError),
        (422, openai.UnprocessableEntityError),
        (503, openai.InternalServerError),
    ],
)
def test_statuses_map_to_sdk_exceptions(
    fake_openai: FakeOpenAIServer,
    client: openai.OpenAI,
    unique_case: str,
    status: int,
    exc_type: type[openai.APIStatusError],
) -> None:
    fake_openai.script(unique_case, [str(status)])
    with pytest.raises(exc_type) as info:
        _chat(client, f"[case:{unique_case}]")
    assert info.value.status_code == status


def test_drop_is_a_connection_error(
    fake_openai: FakeOpenAIServer, client: openai.OpenAI, unique_case: str
) -> None:
    fake_openai.script(unique_case, ["drop"])
    with pytest.raises(openai.APIConnectionError) as info:
        _chat(client, f"[case:{unique_case}]")
    assert not isinstance(info.value, openai.APITimeoutError)
    assert _chat(client, f"[case:{unique_case}]").startswith("echo:")


def test_embeddings_take_faults_too(
    fake_openai: FakeOpenAIServer, client: openai.OpenAI, unique_case: str
) -> None:
    fake_openai.script(unique_case, ["503"])
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="emb", input=[f"[case:{unique_case}]"])
    assert fake_openai.count(unique_case) == 1


def test_case_latency_delays_replies(
    fake_openai: FakeOpenAIServer, client: openai.OpenAI, unique_case: str
) -> None:
    fake_openai.script(unique_case, [], latency_s=0.3)
    started = time.monotonic()
    _chat(client, f"[case:{unique_case}]")
    assert time.monotonic() - started >= 0.3


def test_hang_times_out_and_stop_is_prompt(unique_case: str) -> None:
    server = FakeOpenAIServer().start()
    server.script(unique_case, ["hang", "hang"])
    errors: list[BaseException] = []

    def call_until_stopped() -> None:
        try:
            _chat(_client(server.base_url, timeout=30), f"[case:{unique_case}]")
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call_until_stopped)
    try:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            _chat(_client(server.base_url, timeout=0.5), f"[case:{unique_case}]")
        assert time.monotonic() - started < 5

        # The second hang is still parked in the server when it stops.
        caller.start()
        deadline = time.monotonic() + 5
        while server.count(unique_case) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        started = time.monotonic()
        server.stop()
        stop_took = time.monotonic() - started
    caller.join(timeout=5)
    assert stop_took < 1.0
    assert len(errors) == 1
    assert isinstance(errors[0], openai.APIConnectionError)  # closed, not answered


def test_reset_forgets_records_and_scripts(unique_case: str) -> None:
    with FakeOpenAIServer(latency_s=0.0) as server:
        client = _client(server.base_url)
        server.script(unique_case, ["500", "500"])
        with pytest.raises(openai.InternalServerError):
            _chat(client, f"[case:{unique_case}]")
        server.reset()
        assert server.count(unique_case) == 0
        _chat(client, f"[case:{unique_case}]")
        assert [r.outcome for r in server.requests(unique_case)] == ["ok"]


def test_fault_shorthands() -> None:
    assert Fault.parse("ok") == Fault()
    assert Fault.parse("500") == Fault(500)
    assert Fault.parse("429:3") == Fault(429, retry_after="3")
    assert Fault.parse("hang") == Fault(kind="hang", hang_s=30.0)
    assert Fault.parse("hang:2.5") == Fault.hang(2.5)
    assert Fault.parse("drop") == Fault.drop()
    assert Fault.parse(Fault(503).to_json()) == Fault(503)
    with pytest.raises(ValueError, match="unknown fault"):
        Fault.parse("explode")
    with pytest.raises(ValueError):
        Fault(status=99)


# -- another process -----------------------------------------------------------


@pytest.fixture
def cli_server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "racto_nb.testing.openai_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "the CLI server printed no base URL within 15 s"
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1"), base_url
        yield proc, base_url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_cli_server_driven_over_http(cli_server: tuple[subprocess.Popen[str], str]) -> None:
    proc, base_url = cli_server
    control: OpenAIFaultControl = FakeOpenAIControl(base_url)
    client = _client(base_url)

    control.script("remote", [Fault(429, retry_after="1"), "503"])
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client, "[case:remote]")
    assert info.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.InternalServerError):
        _chat(client, "[case:remote]")
    assert _chat(client, "x [case:remote]") == "echo: x [case:remote]"

    assert control.count("remote") == 3
    records = control.requests("remote")
    assert [r.outcome for r in records] == ["429", "503", "ok"]
    assert records[0].authorization == "Bearer sk-test"
    assert records[2].body["messages"] == [{"role": "user", "content": "x [case:remote]"}]

    control.set_latency(0.25)
    started = time.monotonic()
    _chat(client, "slow")
    assert time.monotonic() - started >= 0.25

    control.reset()  # also restores the CLI's latency (0)
    assert control.count("remote") == 0
    assert control.count() == 0
    with pytest.raises(ValueError, match="unknown fault"):
        control.script("remote", ["nonsense"])

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert proc.stderr is not None
    assert proc.stderr.read() == ""  # no per-request log lines, no warnings
