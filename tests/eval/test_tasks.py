"""Task files: kinds, fields, answer extraction, and errors that name the line."""

import json
import re

import pytest

from mlxmerge.eval.tasks import (
    CHOICE,
    GENERATION,
    PERPLEXITY,
    TaskError,
    compile_extract,
    extract_answer,
    load_task,
)  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_plain_text_is_perplexity_split_on_blank_lines(tmp_path):
    f = tmp_path / "wiki.txt"
    f.write_text("First doc line one.\nline two.\n\n  \nSecond doc.\n\n\nThird.\n")
    task = load_task(f)
    assert task.kind == PERPLEXITY and task.name == "wiki"
    assert task.documents == ["First doc line one.\nline two.", "Second doc.", "Third."]
    assert not task.higher_is_better


def test_jsonl_kinds_are_detected_from_fields(tmp_path):
    mc = write_jsonl(
        tmp_path / "mc.jsonl", [{"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}, ""]
    )
    gen = write_jsonl(
        tmp_path / "gen.jsonl", [{"prompt": "2+2=", "answer": 4}, {"prompt": "x", "answer": "y"}]
    )
    t = load_task(mc)
    assert t.kind == CHOICE and len(t) == 1 and t.items[0].choices == ["4", "5"]
    g = load_task(gen)
    assert g.kind == GENERATION and [i.answer for i in g.items] == ["4", "y"]
    # A .jsonl read as text on request.
    assert load_task(gen, kind="perplexity").kind == PERPLEXITY


def test_split_keeps_order_and_sizes(tmp_path):
    rows = [{"prompt": str(i), "answer": i} for i in range(10)]
    a, b = load_task(write_jsonl(tmp_path / "g.jsonl", rows)).split(0.3)
    assert [i.answer for i in a.items] == ["0", "1", "2"]
    assert [i.answer for i in b.items] == [str(i) for i in range(3, 10)]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [
                {"prompt": "a", "choices": ["x", "y"], "answer": 0},
                {"prompt": "b", "answer": 1, "choices": ["x"]},
            ],
            r"line 2: 'choices' must be a list of at least two strings",
        ),
        (
            [{"prompt": "a", "choices": ["x", "y"], "answer": 2}],
            r"line 1: answer index 2 is out of range for 2 choices",
        ),
        (
            [{"prompt": "a", "choices": ["x", "y"], "answer": -1}],
            r"line 1: answer index -1 is out of range",
        ),
        (
            [{"prompt": "a", "choices": ["x", "y"], "answer": "x"}],
            r"line 1: 'answer' must be the index",
        ),
        ([{"prompt": "a", "choices": ["x", "y"]}], r"line 1: missing field 'answer'"),
        (
            [{"prompt": "a", "answer": 1}, {"question": "b", "answer": 2}],
            r"line 2: missing field 'prompt'",
        ),
        ([{"prompt": "a", "answer": 1}, "", "{not json"], r"line 3: not valid JSON"),
        ([{"prompt": "a", "answer": 1}, "[1, 2]"], r"line 2: expected a JSON object"),
        ([{"prompt": "a", "answer": None}], r"line 1: 'answer' must be a string or a number"),
        (
            [{"prompt": "a", "choices": ["x", ""], "answer": 0}],
            r"line 1: a choice is an empty string",
        ),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, rows, message):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match=re.escape(str(f)) + " " + message):
        load_task(f)


def test_empty_missing_and_unknown_kind(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(TaskError, match=r"empty\.jsonl: the file is empty"):
        load_task(empty)
    with pytest.raises(TaskError, match=r"nope\.txt does not exist"):
        load_task(tmp_path / "nope.txt")
    with pytest.raises(TaskError, match=r"unknown task kind 'qa'"):
        load_task(empty, kind="qa")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(TaskError, match=r"not UTF-8"):
        load_task(binary)


def test_extract_answer():
    assert extract_answer("\n  42 \nmore", None) == "42"
    assert extract_answer("", None) == ""
    number = compile_extract(r"-?\d+")
    assert extract_answer("The answer is -17, not 3", number) == "-17"
    assert extract_answer("no digits", number) == ""
    grouped = compile_extract(r"answer: (\w+)")
    assert extract_answer("so the answer: cat.", grouped) == "cat"
    with pytest.raises(TaskError, match=r"--extract '\(' is not a valid regular expression"):
        compile_extract("(")
