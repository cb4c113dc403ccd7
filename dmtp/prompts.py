"""Prompt files: read them streaming, and say exactly which line is wrong.

Formats (chosen by extension; an unknown extension is sniffed from its first non-empty line):
- JSONL (`.jsonl`, `.json`), one object a line, with one of
    `prompt`   str                     LongWriter format (`type`/`length` kept as metadata)
    `messages` [{role, content}, ...]  a chat, sent through the model's chat template; one that
                                       ends with an `assistant` message is teacher-forced: the
                                       model reads the whole chat, answer included
    `turns`    [str, ...]              MT-Bench / Spec-Bench format: the first turn is used
  and optionally `category` (or LongWriter's `type`). A file holds one kind: prompts to answer or
  answered chats.
- Plain text (anything else): one document per line, teacher-forced: the model reads the document
  and records its own outputs at every position; nothing is generated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmtp.errors import InputDataError

JSONL_SUFFIXES = {".jsonl", ".json"}
ANSWER_ROLE = "assistant"  # a chat whose last message has this role is teacher-forced


@dataclass
class Prompt:
    """One prompt or document. `index` is its position among the file's records (its sample id)."""

    index: int
    line: int  # 1-based line number in the file, for error messages
    messages: list[dict[str, str]] | None = None  # chat prompts
    text: str | None = None  # plain-text documents (teacher-forced)
    category: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        """A chat that ends with the assistant's answer: teacher-forced, like a document."""
        return self.messages is not None and self.messages[-1]["role"] == ANSWER_ROLE

    @property
    def generates(self) -> bool:
        """Chat prompts are answered by generation; documents and answered chats are only read."""
        return self.messages is not None and not self.answered


def is_jsonl(path: Path) -> bool:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    if path.suffix.lower() == ".txt":
        return False
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for raw in handle:
            if raw.strip():
                return raw.lstrip().startswith("{")
    return False


def _parse_record(record: Any, where: str, index: int, line: int) -> Prompt:
    if not isinstance(record, dict):
        raise InputDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    category = record.get("category", record.get("type"))
    category = None if category is None else str(category)
    metadata = {k: v for k, v in record.items() if k not in ("prompt", "messages", "turns")}
    if "messages" in record:
        messages = record["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise InputDataError(
                f"{where}: `messages` must be a non-empty list of {{role, content}} strings"
            )
        if not any(m["content"].strip() for m in messages):
            raise InputDataError(f"{where}: empty prompt (every message's content is blank)")
        if messages[-1]["role"] == ANSWER_ROLE:
            if not messages[-1]["content"].strip():
                raise InputDataError(
                    f"{where}: the last message is an empty `{ANSWER_ROLE}` answer; give the "
                    f"answer to teacher-force, or drop that message to have the model generate one"
                )
            if len(messages) < 2:
                raise InputDataError(
                    f"{where}: an `{ANSWER_ROLE}` answer with no prompt before it; put the "
                    "message it answers first"
                )
        return Prompt(index, line, messages=messages, category=category, metadata=metadata)
    if "prompt" in record or "turns" in record:
        if "prompt" in record:
            text = record["prompt"]
            key = "prompt"
        else:
            turns = record["turns"]
            if not isinstance(turns, list) or not turns:
                raise InputDataError(f"{where}: `turns` must be a non-empty list of strings")
            text, key = turns[0], "turns[0]"
        if not isinstance(text, str):
            raise InputDataError(f"{where}: `{key}` must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InputDataError(f"{where}: empty prompt")
        return Prompt(
            index,
            line,
            messages=[{"role": "user", "content": text}],
            category=category,
            metadata=metadata,
        )
    raise InputDataError(
        f"{where}: no `prompt`, `messages` or `turns` field (keys: {sorted(record)})"
    )


def iter_prompts(path: str | Path) -> Iterator[Prompt]:
    """Yield the file's prompts in order; raise InputDataError naming file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"input file not found: {path}")
    jsonl = is_jsonl(path)
    index = 0
    with path.open("r", encoding="utf-8") as handle:
        try:
            for line_number, raw in enumerate(handle, start=1):
                where = f"{path}:{line_number}"
                if not raw.strip():
                    continue  # blank lines separate nothing; skipping them keeps indices stable
                if jsonl:
                    try:
                        record = json.loads(raw)
                    except json.JSONDecodeError as error:
                        raise InputDataError(
                            f"{where}: not valid JSON ({error.msg} at column {error.colno})"
                        ) from None
                    yield _parse_record(record, where, index, line_number)
                else:
                    yield Prompt(index, line_number, text=raw.rstrip("\n"))
                index += 1
        except UnicodeDecodeError as error:
            raise InputDataError(
                f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None


@dataclass
class PromptFileInfo:
    path: str
    sha256: str
    count: int
    generates: bool  # chat prompts (generation), or documents / answered chats (teacher-forced)


def scan_prompts(path: str | Path) -> PromptFileInfo:
    """Check every record before any model time is spent; return count and content hash."""
    path = Path(path)
    count, first = 0, None
    for prompt in iter_prompts(path):
        count += 1
        if first is None:
            first = prompt
        # Collection runs one mode per store (generate or teacher-force), so a file is one kind.
        if prompt.generates != first.generates:
            kinds = {True: "a prompt to answer", False: "a chat ending with its answer"}
            raise InputDataError(
                f"{path}:{prompt.line}: {kinds[prompt.generates]}, but line {first.line} is "
                f"{kinds[first.generates]}; put prompts and answered chats in separate files"
            )
    if count == 0:
        raise InputDataError(f"{path}: no prompts in the file")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return PromptFileInfo(str(path), digest.hexdigest(), count, first.generates)
