"""Templates: plain names only, one missing-value rule, every error before anything is sent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from racto_nb.batch.templates import TemplateError, interpolate, placeholders, render_rows


@pytest.mark.parametrize(
    ("template", "names"),
    [
        ("Classify: {review}", ["review"]),
        ("{a} and {b} and {a} again", ["a", "b"]),
        ('JSON like {{"k": {value}}}', ["value"]),
        ("price {price:.2f}", ["price"]),
        ("no placeholders {{at all}}", []),
    ],
)
def test_placeholders_are_plain_names_in_order(template: str, names: list[str]) -> None:
    assert placeholders(template) == names


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{x.__class__}", "not a plain name"),
        ("{x[0]}", "not a plain name"),
        ("{0}", "not a plain name"),
        ("{}", "literal braces"),
        ("{x!r}", "conversions are not allowed"),
        ("{x:{y}}", "nested fields"),
        ("unbalanced {x", "write literal braces"),
        ("closing } alone", "write literal braces"),
    ],
)
def test_unsafe_or_broken_templates_are_rejected(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        placeholders(template)


def test_render_rows_fills_each_row_in_order() -> None:
    frame = pd.DataFrame({"review": ["good", "bad"], "stars": [5, 1]}, index=["x", "x"])
    prompts, reasons = render_rows("{review} ({stars}) {{ok}}", frame)
    assert prompts == ["good (5) {ok}", "bad (1) {ok}"]
    assert reasons == [None, None]


def test_missing_values_are_skipped_by_default_and_say_which_column() -> None:
    frame = pd.DataFrame(
        {"review": ["good", None, np.nan, "fine", pd.NA], "author": ["a", "b", "c", None, "e"]},
        dtype=object,
    )
    prompts, reasons = render_rows("{author}: {review}", frame)
    assert prompts == ["a: good", None, None, None, None]
    assert reasons[1] == "missing value in review; row not sent"
    assert reasons[3] == "missing value in author; row not sent"


def test_missing_values_render_empty_on_request() -> None:
    frame = pd.DataFrame({"review": ["good", None], "author": ["a", "b"]})
    prompts, _ = render_rows("{author}: {review}", frame, on_missing="empty")
    assert prompts == ["a: good", "b: "]


def test_missing_values_raise_on_request_naming_row_and_column() -> None:
    frame = pd.DataFrame({"review": ["good", None]}, index=["r1", "r2"])
    with pytest.raises(TemplateError, match=r"column 'review' is missing a value at index 'r2'"):
        render_rows("{review}", frame, on_missing="error")


def test_blank_prompts_are_skipped_whatever_the_rule() -> None:
    frame = pd.DataFrame({"review": ["  ", "ok"]})
    prompts, reasons = render_rows("{review}", frame, on_missing="empty")
    assert prompts == [None, "ok"]
    assert reasons[0] is not None and "empty" in reasons[0]


def test_unknown_columns_name_the_ones_available() -> None:
    frame = pd.DataFrame({"review": ["good"], "author": ["a"]})
    with pytest.raises(
        TemplateError, match=r"unknown column\(s\) \['stars'\]; the frame has: review, author$"
    ):
        render_rows("{review} {stars}", frame)


def test_empty_frame_and_constant_template_are_errors() -> None:
    with pytest.raises(TemplateError, match="no rows"):
        render_rows("{review}", pd.DataFrame({"review": []}))
    with pytest.raises(TemplateError, match=r"names no column.*\{review\}"):
        render_rows("Say hi", pd.DataFrame({"review": ["x"]}))


def test_bad_rule_and_bad_format_spec_are_errors() -> None:
    frame = pd.DataFrame({"price": ["cheap"]})
    with pytest.raises(TemplateError, match="on_missing must be one of skip, empty, error"):
        render_rows("{price}", frame, on_missing="maybe")  # type: ignore[arg-type]
    with pytest.raises(TemplateError, match="row at index 0: cannot fill the template"):
        render_rows("{price:.2f}", frame)


def test_interpolate_fills_from_a_namespace_and_lists_unknown_names() -> None:
    assert interpolate("Sum up {text} in {n} bullets {{json}}", {"text": "this", "n": 3}) == (
        "Sum up this in 3 bullets {json}"
    )
    with pytest.raises(TemplateError, match=r"\{a\}, \{b\} not defined: assign them"):
        interpolate("{a} {b} {c}", {"c": 1})
    with pytest.raises(TemplateError, match="not a plain name"):
        interpolate("{os.environ}", {"os": object()})
