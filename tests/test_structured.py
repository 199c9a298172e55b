"""Structured output: ``choices`` / ``schema`` into typed columns.

Three layers, real components throughout:

* the pure spec (:mod:`racto_nb.structured`) and the column typer
  (:mod:`racto_nb.batch.columns`);
* the embedded worker with ``OpenAIKit`` over HTTP to the fake
  OpenAI-compatible server (which answers a ``json_schema`` response format
  with an object that fits it, and ``[invalid:N]`` with N replies that fit
  nothing), and with a kit of the user's that constrains nothing;
* SmolLM2-135M on the CPU under llama.cpp grammars (marked slow), whose
  figures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pytest
from pydantic import BaseModel

import racto_nb
from racto_nb import api
from racto_nb.batch.columns import CLASH_PREFIX, FIELDS_ATTR, with_fields
from racto_nb.engine.classify import classify
from racto_nb.engine.spending import Spending, SpendSettings
from racto_nb.errors import InvalidArgument, RactoError, SchemaError, TaskFailed
from racto_nb.kits import OpenAIKit
from racto_nb.models import ChatConfig, ChatResponse, RetryConfig
from racto_nb.structured import OutputSpec, output_spec
from racto_nb.testing import FakeOpenAIServer
from racto_nb.testing.openai_server import INVALID_REPLY
from tests.batch_support import worker

__all__ = ["worker"]  # fixture, imported for pytest

LABELS = ["positive", "negative", "neutral"]
HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
REVIEWS = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "product_reviews.csv"


class Place(BaseModel):
    city: str
    zip: int | None = None


class Review(BaseModel):
    label: Literal["positive", "negative"]
    score: int
    ratio: float
    ok: bool
    status: str  # clashes with the frame's own column
    place: Place


# ---------------------------------------------------------------------------- the spec


def test_choices_match_one_label_however_it_is_written() -> None:
    spec = output_spec(choices=LABELS)
    assert spec is not None and spec.kind == "choices"
    for reply in ("positive", " Positive.", '"NEGATIVE"', '{"label": "neutral"}', "**neutral**"):
        assert spec.check(reply)["label"] in LABELS
    assert spec.check("Positive.") == {"label": "positive"}
    for reply in ("The sentiment is positive", "", "positive, negative", '{"label": "great"}'):
        with pytest.raises(SchemaError):
            spec.check(reply)


def test_schema_error_is_a_racto_error_and_a_value_error_and_is_retried_at_once() -> None:
    assert issubclass(SchemaError, RactoError) and issubclass(SchemaError, ValueError)
    verdict = classify(SchemaError("the reply is empty"))
    assert verdict.retryable and verdict.error_type == "SchemaError" and verdict.retry_after_s == 0.0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"choices": []}, "choices is empty"),
        ({"choices": "yes,no"}, "list of labels"),
        ({"choices": ["a", "A "]}, "differ by more than case"),
        ({"choices": ["a", "a"]}, "a label twice"),
        ({"choices": ["a", ""]}, "non-empty strings"),
        ({"choices": ["a", "b"], "schema": Review}, "not both"),
        ({"schema": {"type": "string"}}, "must describe a JSON object"),
        ({"schema": {"type": "object", "properties": {}}}, "no properties"),
        ({"schema": int}, "pydantic model class or a JSON-schema dict"),
        ({"schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/B"}}}}, "does not define"),
        ({"schema": {"type": "object", "properties": {"a": {"type": "integr"}}}}, "not a valid JSON schema"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_fix(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment) as caught:
        output_spec(**kwargs)
    assert "\n" not in str(caught.value)


def test_recursive_models_are_refused() -> None:
    class Node(BaseModel):
        name: str
        child: Node | None = None

    with pytest.raises(InvalidArgument, match="recursive"):
        output_spec(schema=Node)


def test_a_pydantic_model_is_inlined_and_its_strict_copy_closes_every_object() -> None:
    spec = output_spec(schema=Review)
    assert spec is not None and "$defs" not in json.dumps(spec.json_schema)
    strict = spec.strict_schema()
    assert strict["additionalProperties"] is False and strict["required"] == list(Review.model_fields)
    place = strict["properties"]["place"]
    assert place["additionalProperties"] is False and place["required"] == ["city", "zip"]  # zip had a default
    assert "default" not in json.dumps(strict)
    fmt = spec.openai_response_format()
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "Review"
    # The spec crosses the broker as JSON and comes back the same.
    assert OutputSpec.model_validate(json.loads(json.dumps(spec.description()))).description() == spec.description()


def test_a_field_named_like_a_keyword_stays_a_field() -> None:
    class Book(BaseModel):
        title: str
        default: int

    strict = output_spec(schema=Book).strict_schema()  # type: ignore[union-attr]
    assert list(strict["properties"]) == ["title", "default"] and strict["required"] == ["title", "default"]


def test_schema_replies_are_validated() -> None:
    spec = output_spec(schema=Review)
    assert spec is not None
    good = {"label": "positive", "score": 4, "ratio": 0.5, "ok": True, "status": "x", "place": {"city": "Oslo"}}
    assert spec.check(json.dumps(good)) == good
    assert spec.check("```json\n" + json.dumps(good) + "\n```") == good  # fenced, as chat models like to
    with pytest.raises(SchemaError, match="score"):
        spec.check(json.dumps({**good, "score": "four"}))
    with pytest.raises(SchemaError, match="label"):
        spec.check(json.dumps({**good, "label": "meh"}))
    with pytest.raises(SchemaError, match="not a JSON object"):
        spec.check("positive")
    assert isinstance(spec.value(good), Review) and spec.value(good).place.city == "Oslo"


def test_grammars_for_llama() -> None:
    assert output_spec(choices=["yes", 'no "way"'])  # quotes survive
    grammar = output_spec(choices=["yes", 'say "no"']).llama_grammar()  # type: ignore[union-attr]
    assert grammar == {"gbnf": 'root ::= "yes" | "say \\"no\\""'}
    schema_grammar = output_spec(schema=Review).llama_grammar()  # type: ignore[union-attr]
    assert json.loads(schema_grammar["json_schema"])["additionalProperties"] is False
    if HAS_LLAMA:  # llama.cpp itself accepts both (building a grammar needs no model)
        from llama_cpp.llama_grammar import LlamaGrammar

        LlamaGrammar.from_string(grammar["gbnf"], verbose=False)
        LlamaGrammar.from_json_schema(schema_grammar["json_schema"], verbose=False)


def test_fields_are_flattened_and_typed() -> None:
    spec = output_spec(schema=Review)
    assert spec is not None
    kinds = {f.name: f.kind for f in spec.fields()}
    assert kinds == {
        "label": "category",
        "score": "int",
        "ratio": "float",
        "ok": "bool",
        "status": "string",
        "place.city": "string",
        "place.zip": "int",
    }


def test_columns_are_typed_clashes_prefixed_and_failed_rows_empty() -> None:
    spec = output_spec(schema=Review)
    assert spec is not None
    good = {"label": "negative", "score": 2, "ratio": 1.5, "ok": False, "status": "s", "place": {"city": "Rome"}}
    frame = pd.DataFrame(
        {
            "status": ["success", "failure", "success"],
            "content": ["{...}", "nope", "{...}"],
            "parsed": [good, {"label": "negative", "score": 9}, {**good, "score": 3, "place": {"city": "A", "zip": 5}}],
        },
        index=["a", "b", "c"],
    )
    out = with_fields(frame, spec)
    assert list(out.columns[:3]) == ["status", "content", "parsed"]
    status_field = CLASH_PREFIX + "status"
    assert list(out.columns[3:]) == ["label", "score", "ratio", "ok", status_field, "place.city", "place.zip"]
    assert out.attrs[FIELDS_ATTR]["status"] == status_field
    assert str(out["label"].dtype) == "category" and list(out["label"].cat.categories) == ["positive", "negative"]
    assert str(out["score"].dtype) == "Int64" and out["score"].tolist()[0] == 2 and out["score"].tolist()[2] == 3
    assert str(out["ratio"].dtype) == "Float64" and str(out["ok"].dtype) == "boolean"
    assert str(out[status_field].dtype) == "string" and str(out["place.city"].dtype) == "string"
    assert out.loc["c", "place.zip"] == 5 and pd.isna(out.loc["a", "place.zip"])
    assert out.loc["b"][["label", "score", "ratio", "ok", "place.city"]].isna().all()  # the failed row: nothing


def test_the_fingerprint_includes_the_schema() -> None:
    class Kit:
        model = "m"

        def chat(self, config: ChatConfig) -> str:
            return "x"

        def cache_identity(self) -> dict[str, Any]:
            return {"provider": "test"}

    spending = Spending(Kit(), SpendSettings())
    config = ChatConfig(user_message="hi")
    a = spending.fingerprint(config, output_spec(choices=["a", "b"]).description())  # type: ignore[union-attr]
    b = spending.fingerprint(config, output_spec(choices=["a", "c"]).description())  # type: ignore[union-attr]
    assert len({a, b, spending.fingerprint(config, None)}) == 3


def test_a_task_failed_keeps_the_reply_through_its_args() -> None:
    failed = TaskFailed("SchemaError: no", "SchemaError", None, 3, ["a", "b"], reply={"content": "nope"})
    assert TaskFailed(*failed.args).reply == {"content": "nope"}


@pytest.mark.skipif(not HAS_LLAMA, reason="needs racto_nb[local]")
def test_local_kit_sends_the_grammar_and_says_it_constrains() -> None:
    from racto_nb.kits.local import LocalKit

    kit = LocalKit()
    spec = output_spec(choices=["yes", "no"])
    assert spec is not None and kit.constrains_output
    assert kit.sampling_kwargs(ChatConfig(user_message="?", output=spec))["grammar"] == spec.llama_grammar()
    assert "grammar" not in kit.sampling_kwargs(ChatConfig(user_message="?"))


def test_the_spec_replaces_a_response_format_given_in_extra(fake_openai: FakeOpenAIServer, unique_case: str) -> None:
    kit = OpenAIKit("fake-model", base_url=fake_openai.base_url, timeout_s=5)
    spec = output_spec(choices=["yes", "no"])
    config = ChatConfig(
        user_message=f"[case:{unique_case}] no", extra={"response_format": {"type": "text"}, "seed": 1}, output=spec
    )
    reply = kit.chat(config)
    body = fake_openai.requests(unique_case)[0].body
    assert body["response_format"] == spec.openai_response_format() and body["seed"] == 1  # type: ignore[union-attr]
    assert json.loads(reply.content or "") == {"label": "no"}


# ---------------------------------------------------------------------------- the fake server, embedded worker

FAST_RETRY = RetryConfig(max_retries=2, initial_delay_s=0.05, backoff_factor=2.0, max_delay_s=0.2)


@pytest.fixture
def embedded(fake_openai: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name in list(os.environ):
        if name.startswith("RACTO_") and name != "RACTO_CHECKPOINT_DIR":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    worker = racto_nb.connect(
        kit=OpenAIKit("fake-model", base_url=fake_openai.base_url, timeout_s=5), retry_config=FAST_RETRY
    )
    yield worker
    racto_nb.disconnect()


def _requests(server: FakeOpenAIServer, case: str) -> list[dict[str, Any]]:
    return [r.body for r in server.requests(case)]


def test_choices_send_a_strict_schema_and_come_back_as_a_category(
    embedded: Any, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    reviews = pd.DataFrame(
        {"review": ["negative: it broke", "positive: love it", "neutral: fine", "negative again"]},
        index=pd.Index([10, 11, 12, 13], name="id"),
    )
    template = f"[case:{unique_case}] {{review}}"
    frame = api.run_batch(reviews, template, choices=LABELS, progress="none", timeout_s=60)
    assert frame["status"].tolist() == ["success"] * 4
    assert frame["label"].tolist() == ["negative", "positive", "neutral", "negative"]
    assert str(frame["label"].dtype) == "category" and list(frame["label"].cat.categories) == LABELS
    assert frame["parsed"].tolist()[1] == {"label": "positive"} and frame["attempts"].tolist() == [1] * 4
    assert frame["content"].tolist()[1] == '{"label": "positive"}'  # the raw reply stays
    sent = _requests(fake_openai, unique_case)
    assert len(sent) == 4
    expected = output_spec(choices=LABELS).openai_response_format()  # type: ignore[union-attr]
    assert all(body["response_format"] == expected for body in sent)
    assert expected["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
    # The prompt is the user's own: the provider is held to the schema, not told about it in words.
    assert sorted(body["messages"][-1]["content"] for body in sent) == sorted(
        template.format(review=r) for r in reviews["review"]
    )


def test_a_schema_gives_one_typed_column_per_field(
    embedded: Any, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    words = ["one two three negative", "positive a b c d e"]
    frame = api.run_batch([f"[case:{unique_case}] {w}" for w in words], schema=Review, progress="none", timeout_s=60)
    assert frame["status"].tolist() == ["success", "success"]
    assert frame["label"].tolist() == ["negative", "positive"]
    assert frame["score"].tolist() == [5, 7]  # the fake server answers an integer with the word count
    assert str(frame["score"].dtype) == "Int64" and str(frame["ratio"].dtype) == "Float64"
    assert frame["ok"].tolist() == [False, False] and str(frame["ok"].dtype) == "boolean"
    assert str(frame["place.city"].dtype) == "string" and frame["place.city"].tolist()[0].endswith(words[0])
    assert frame["out.status"].tolist()[0].endswith(words[0]) and frame["status"].tolist()[0] == "success"
    sent = _requests(fake_openai, unique_case)[0]["response_format"]
    assert (
        sent["json_schema"]["name"] == "Review"
        and sent["json_schema"]["schema"]["properties"]["place"]["additionalProperties"] is False
    )


def test_an_invalid_reply_is_asked_again_then_fails_as_schema_error(
    embedded: Any, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    once, always = f"{unique_case}-once", f"{unique_case}-always"
    frame = api.run_batch(
        [f"[case:{once}] [invalid:1] positive", f"[case:{always}] [invalid:99] negative"],
        choices=LABELS,
        progress="none",
        timeout_s=60,
    )
    fixed, failed = frame.iloc[0], frame.iloc[1]
    assert fixed["status"] == "success" and fixed["label"] == "positive" and fixed["attempts"] == 2
    assert len(fixed["history"]) == 1 and "SchemaError" in fixed["history"][0]
    second = _requests(fake_openai, once)[1]["messages"][-1]["content"]
    assert "Your previous reply was not valid" in second and INVALID_REPLY in second  # told what was wrong
    assert failed["status"] == "failure" and failed["error_type"] == "SchemaError"
    assert failed["attempts"] == FAST_RETRY.max_retries + 1 == len(_requests(fake_openai, always))
    assert failed["content"] == INVALID_REPLY and pd.isna(failed["label"])  # the reply stays; no field
    assert "gave up after 3 attempts" in failed["error"] and len(failed["history"]) == 2


@pytest.mark.slow
def test_through_redis_and_a_worker_process_the_failed_reply_survives(
    worker: Any, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    """The same across processes: the spec reaches the worker in the message, the failure comes back through
    Celery's JSON encoding of the stored error with its reply."""
    prompts = [f"[case:{unique_case}] neutral", f"[case:{unique_case}-bad] [invalid:99] neutral"]
    frame = api.run_batch(prompts, choices=LABELS, worker=worker, progress="none", timeout_s=60)
    assert frame["status"].tolist() == ["success", "failure"]
    assert frame["label"].tolist()[0] == "neutral" and frame["error_type"].tolist()[1] == "SchemaError"
    assert frame["content"].tolist()[1] == INVALID_REPLY
    assert frame["attempts"].tolist()[1] == worker.retry_config.max_retries + 1
    assert frame["completion_tokens"].tolist()[1] == len(INVALID_REPLY.split())  # the failed reply's usage too
    assert fake_openai.requests(unique_case)[0].body["response_format"]["json_schema"]["strict"] is True


class TextKit:
    """A kit of the user's: plain text back, no way to constrain it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def chat(self, config: ChatConfig) -> ChatResponse:
        self.seen.append(config.user_message)
        word = "Negative." if "bad" in config.user_message else '{"label": "positive"}'
        return ChatResponse(content=word)


def test_a_kit_that_cannot_constrain_is_told_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    kit = TextKit()
    racto_nb.connect(kit=kit, retry_config=FAST_RETRY)
    try:
        frame = api.run_batch(["bad lamp", "good lamp"], choices=["positive", "negative"], progress="none")
    finally:
        racto_nb.disconnect()
    assert frame["label"].tolist() == ["negative", "positive"]
    assert all(seen.endswith("Reply with exactly one of: positive, negative. Nothing else.") for seen in kit.seen)


def test_write_back_writes_the_fields(embedded: Any, unique_case: str) -> None:
    df = pd.DataFrame({"review": [f"[case:{unique_case}] positive x", f"[case:{unique_case}] negative y z"]})
    api.run_batch(df, "{review}", choices=LABELS, write_back="sentiment", progress="none", timeout_s=60)
    assert df["sentiment"].tolist() == ["positive", "negative"] and str(df["sentiment"].dtype) == "category"
    api.run_batch(df, "{review}", schema=Review, write_back="out", progress="none", timeout_s=60)
    assert df["out.score"].tolist() == [3, 4] and str(df["out.score"].dtype) == "Int64"  # word counts
    assert "out.place.city" in df.columns and "out" not in df.columns
    with pytest.raises(InvalidArgument, match="would overwrite"):
        api.run_batch(df["out.place.city"], schema=Review, write_back="out", frame=df, progress="none")


def test_generate_with_a_schema_gives_the_validated_object(embedded: Any, unique_case: str) -> None:
    result = api.generate(f"[case:{unique_case}] negative words here", schema=Review, progress="none", timeout_s=30)
    assert result.ok and result.result is not None
    assert result.result["parsed"]["label"] == "negative"
    value = api.structured_value(result, output_spec(schema=Review))  # type: ignore[arg-type]
    assert isinstance(value, Review) and value.score == 4  # the word count


def test_the_ledger_answers_only_the_same_schema(
    embedded: Any, fake_openai: FakeOpenAIServer, unique_case: str
) -> None:
    prompts = [f"[case:{unique_case}] positive {i}" for i in range(3)]
    api.run_batch(prompts, choices=LABELS, progress="none", timeout_s=60)
    again = api.run_batch(prompts, choices=LABELS, progress="none", timeout_s=60)
    assert again["cached"].all() and again["label"].tolist() == ["positive"] * 3
    other = api.run_batch(prompts, choices=["positive", "negative"], progress="none", timeout_s=60)
    assert not other["cached"].any()
    assert len(fake_openai.requests(unique_case)) == 6


# ---------------------------------------------------------------------------- the magics


@pytest.fixture
def ip(shell: Any, embedded: Any) -> Any:
    shell.user_ns["Review"] = Review
    return shell


def test_magic_choices_and_schema_give_typed_columns_and_write_back(ip: Any, unique_case: str) -> None:
    ip.user_ns["df"] = df = pd.DataFrame(
        {"review": [f"neutral [case:{unique_case}]", f"negative [case:{unique_case}]"]}
    )
    ip.run_line_magic("racto_batch", 'df["review"] --choices "positive, negative,neutral" --write-back mood --out r')
    result = ip.user_ns["r"]
    assert result["label"].tolist() == ["neutral", "negative"] and str(result["label"].dtype) == "category"
    assert df["mood"].tolist() == ["neutral", "negative"]
    ip.run_cell_magic("racto_batch", "df --schema Review --out typed", "Rate: {review}")
    typed = ip.user_ns["typed"]
    assert typed["score"].tolist() == [3, 3] and str(typed["score"].dtype) == "Int64"
    assert {"label", "ratio", "ok", "out.status", "place.city", "place.zip"} <= set(typed.columns)


def test_magic_generate_with_a_schema_stores_the_validated_object(ip: Any, unique_case: str) -> None:
    ip.run_cell_magic("racto_generate", "--schema Review --out review", f"[case:{unique_case}] positive, two")
    stored = ip.user_ns["review"]
    assert isinstance(stored, Review) and stored.label == "positive" and stored.score == 3
    ip.run_cell_magic("racto_generate", "--choices yes,no --out answer", f"[case:{unique_case}] no")
    assert ip.user_ns["answer"] == "no"
    ip.run_cell_magic("racto_generate", "--choices yes,no --out answer", f"[case:{unique_case}] [invalid:99] no")
    assert ip.user_ns["answer"] is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('df["review"] --schema Missing', "--schema Missing: no such variable in the notebook"),
        ('df["review"] --choices ","', "--choices is empty"),
        ('df["review"] --choices a,,b', "choices must be non-empty strings"),
        ('df["review"] --choices a,b --schema Review', "give choices= or schema=, not both"),
        ('df["review"] --schema df', "schema must be a pydantic model class or a JSON-schema dict"),
        ("--attach x --choices a,b", "drop the expression.*--choices and --schema"),
    ],
)
def test_magic_bad_structured_options_are_one_line_errors_before_anything_is_sent(
    ip: Any, fake_openai: FakeOpenAIServer, unique_case: str, line: str, message: str
) -> None:
    from IPython.core.error import UsageError

    ip.user_ns["df"] = pd.DataFrame({"review": [f"x [case:{unique_case}]"]})
    with pytest.raises(UsageError, match=message) as caught:
        ip.run_line_magic("racto_batch", line)
    assert "\n" not in str(caught.value)
    assert fake_openai.requests(unique_case) == []


# ---------------------------------------------------------------------------- the real local model


def _expected(stars: int) -> str:
    return "positive" if stars >= 4 else "negative" if stars <= 2 else "neutral"


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name in list(os.environ):
        if name.startswith("RACTO_") and name != "RACTO_CHECKPOINT_DIR":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    worker = racto_nb.connect()  # the embedded default: SmolLM2-135M on the CPU
    yield worker
    racto_nb.disconnect()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="needs racto_nb[local]")
def test_local_model_gives_one_of_the_choices_on_every_row(local: Any) -> None:
    from racto_nb.kits.local import LocalKit

    assert isinstance(local.kit, LocalKit)
    reviews = pd.read_csv(REVIEWS)
    assert len(reviews) >= 30
    started = time.perf_counter()
    frame = api.run_batch(
        reviews,
        "Is this product review positive, negative or neutral?\n\n{review}",
        choices=LABELS,
        max_tokens=8,
        cache=False,
        progress="none",
        timeout_s=600,
    )
    elapsed = time.perf_counter() - started
    assert (frame["status"] == "success").all(), frame[frame["status"] != "success"][["error"]]
    assert frame["label"].isin(LABELS).all() and (frame["attempts"] == 1).all()  # constrained: never re-asked
    assert frame["content"].isin(LABELS).all()  # the bare label, exactly
    agree = int((frame["label"].astype(str).to_numpy() == reviews["rating"].map(_expected).to_numpy()).sum())
    print(
        f"\n[figures] choices on SmolLM2-135M: {len(frame)} rows, {len(frame)} one of {LABELS}, "
        f"agreement with the stars (4-5 positive, 3 neutral, 1-2 negative) {agree}/{len(frame)}, "
        f"labels {frame['label'].value_counts().to_dict()}, {elapsed:.1f} s"
    )


class Verdict(BaseModel):
    label: Literal["positive", "negative"]
    stars: int


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="needs racto_nb[local]")
def test_local_model_fills_a_two_field_schema(local: Any) -> None:
    reviews = pd.read_csv(REVIEWS)
    started = time.perf_counter()
    frame = api.run_batch(
        reviews,
        "Review: {review}\n\nGive the review's sentiment (positive or negative) and its stars (1 to 5) as JSON.",
        schema=Verdict,
        max_tokens=48,
        cache=False,
        progress="none",
        timeout_s=600,
    )
    elapsed = time.perf_counter() - started
    valid = frame["status"] == "success"
    assert valid.mean() >= 0.9, frame[~valid][["content", "error"]]
    assert str(frame["label"].dtype) == "category" and str(frame["stars"].dtype) == "Int64"
    assert frame.loc[valid, "label"].isin(["positive", "negative"]).all() and frame.loc[valid, "stars"].notna().all()
    stars = frame.loc[valid, "stars"].astype(int)
    expected = reviews.loc[valid.to_numpy(), "rating"].map(lambda s: "positive" if s >= 3 else "negative")
    agree = int((frame.loc[valid, "label"].astype(str).to_numpy() == expected.to_numpy()).sum())
    close = int((abs(stars.to_numpy() - reviews.loc[valid.to_numpy(), "rating"].to_numpy()) <= 1).sum())
    print(
        f"\n[figures] schema (label Literal + stars int) on SmolLM2-135M: {len(frame)} rows, "
        f"{int(valid.sum())} valid and typed ({valid.mean():.0%}), attempts {frame['attempts'].sum()}, "
        f"label agrees with the stars {agree}/{int(valid.sum())}, stars within 1 of the rating "
        f"{close}/{int(valid.sum())}, {elapsed:.1f} s"
    )
