"""dmtp.prompts: formats, and errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from dmtp.config import DEMO_PROMPTS
from dmtp.errors import InputDataError
from dmtp.prompts import iter_prompts, scan_prompts


def test_longwriter_format(longwriter_prompts):
    prompts = list(iter_prompts(longwriter_prompts))
    assert len(prompts) == 60
    assert prompts[0].messages[0]["role"] == "user" and prompts[0].messages[0]["content"].strip()
    assert prompts[0].category is not None and prompts[0].metadata["length"] > 0
    info = scan_prompts(longwriter_prompts)
    assert info.count == 60 and info.generates and len(info.sha256) == 64


def test_chat_messages_and_turns_formats(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            }
        )
        + "\n\n"
        + json.dumps({"turns": ["First turn", "Second turn"], "category": "writing"})
        + "\n"
    )
    first, second = iter_prompts(path)
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert (
        second.messages == [{"role": "user", "content": "First turn"}]
        and second.category == "writing"
    )
    assert (first.index, second.index, second.line) == (
        0,
        1,
        3,
    )  # blank lines keep line numbers honest


def test_plain_text_is_one_document_per_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first document\n\nsecond document\n")
    docs = list(iter_prompts(path))
    assert [d.text for d in docs] == ["first document", "second document"] and not docs[0].generates


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n{"prompt": 3}\n', ":2: `prompt` must be a string"),
        ('{"prompt": "a"}\n{"text": "b"}\n', ":2: no `prompt`, `messages` or `turns` field"),
        ('["a"]\n', ":1: expected a JSON object"),
        ('{"messages": []}\n', ":1: `messages` must be a non-empty list"),
        ('{"turns": [""]}\n', ":1: empty prompt"),
    ],
)
def test_malformed_records_name_the_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(InputDataError, match=f"^{path}{message}"):
        list(iter_prompts(path))


def test_a_file_without_prompts_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputDataError, match="no prompts"):
        scan_prompts(empty)


def test_shipped_demo_prompts_are_valid():
    info = scan_prompts(DEMO_PROMPTS)
    assert info.count >= 40 and info.generates
