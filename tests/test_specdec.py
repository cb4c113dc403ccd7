"""Speculative decoding on the tiny random Qwen2: lossless with any drafter, cache rolled back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dmtp import specdec
from dmtp.head import build_head, load_base_model_parts
from dmtp.specdec import (
    CacheInvariantError,
    DraftContext,
    HeadDrafter,
    OracleDrafter,
    PromptLookupDrafter,
    RandomDrafter,
    greedy_decode,
    speculative_decode,
)

BLOCK = 4
MAX_NEW = 24
QUESTIONS = ["Write a story about a lighthouse keeper.", "Explain attention and key-value caches."]


@pytest.fixture(scope="module")
def base(debug_model_dir):
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(base):
    _, tokenizer = base
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
            "input_ids"
        ]
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def eos(base):
    return [base[0].generation_config.eos_token_id]


@pytest.fixture(scope="module")
def untrained_head(debug_model_dir):
    parts = load_base_model_parts(str(debug_model_dir))
    return build_head(
        hidden_size=64,
        vocab_size=parts.vocab_size + 1,
        mask_token_id=parts.vocab_size,
        block_length=BLOCK,
        base=parts,
    ).eval()


def check_rounds(result, prompt_length, full_drafts=True):
    """The cache holds every committed token but the bonus, after every round; drafts fill the
    block unless the token limit is near."""
    length, generated = prompt_length + 1, 1  # the prefill's token
    for round_ in result.rounds:
        if full_drafts:
            assert round_.drafted == min(BLOCK - 1, MAX_NEW - generated - 1)
        length += round_.accepted + 1
        generated += round_.committed
        assert round_.sequence_length == length
        assert round_.cache_length == round_.sequence_length - 1
        assert 1 <= round_.committed <= round_.accepted + 1 <= BLOCK
    assert generated == len(result.tokens)


def test_greedy_decode_equals_generate(base, prompts, eos):
    model, tokenizer = base
    for ids in prompts:
        ours = greedy_decode(model, ids, MAX_NEW, eos).tokens
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert ours == out[0, len(ids) :].tolist()


def test_oracle_drafts_are_all_accepted(base, prompts, eos):
    model, _ = base
    for ids in prompts:
        greedy = greedy_decode(model, ids, MAX_NEW, eos).tokens
        result = speculative_decode(
            model, OracleDrafter(model, MAX_NEW, eos), ids, MAX_NEW, BLOCK, eos
        )
        assert result.tokens == greedy
        check_rounds(result, len(ids))
        *full, last = result.rounds
        assert all(r.accepted == BLOCK - 1 and r.committed == BLOCK for r in full)
        assert last.committed == len(greedy) - 1 - BLOCK * len(full)
        assert result.tau == pytest.approx((len(greedy) - 1) / len(result.rounds))


def test_random_drafts_stay_lossless(base, prompts, eos):
    model, _ = base
    for ids in prompts:
        greedy = greedy_decode(model, ids, MAX_NEW, eos).tokens
        result = speculative_decode(
            model, RandomDrafter(model.config.vocab_size, seed=1), ids, MAX_NEW, BLOCK, eos
        )
        assert result.tokens == greedy
        assert result.tau >= 1.0
        check_rounds(result, len(ids))


@pytest.mark.parametrize(("steps", "first_position"), [(1, "clean"), (3, "clean"), (2, "masked")])
def test_untrained_head_is_lossless_and_rarely_right(
    base, prompts, eos, untrained_head, steps, first_position
):
    model, _ = base
    mask = untrained_head.config.mask_token_id
    drafter = HeadDrafter(untrained_head, BLOCK, mask, 320, steps, first_position)
    ids = prompts[0]
    result = speculative_decode(model, drafter, ids, MAX_NEW, BLOCK, eos)
    assert result.tokens == greedy_decode(model, ids, MAX_NEW, eos).tokens
    assert 1.0 <= result.tau < 1.5
    check_rounds(result, len(ids))


def test_head_drafter_runs_k_forwards_and_never_drafts_the_mask(untrained_head):
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, **kwargs):
            calls.append(kwargs["input_ids"].clone())
            return self.head(**kwargs)

    mask = untrained_head.config.mask_token_id
    context = DraftContext(torch.randn(64), bonus_token=7, sequence=[1, 2, 7], num_tokens=BLOCK - 1)
    # Masked positions the head sees at each step: the 3 drafts filled evenly over K steps.
    for steps, masked in ((1, [3]), (2, [3, 1]), (3, [3, 2, 1])):
        calls.clear()
        drafts = HeadDrafter(Counting(untrained_head), BLOCK, mask, 320, steps).draft(context)
        assert [int((c == mask).sum()) for c in calls] == masked
        assert all(c[0, 0] == 7 for c in calls)  # position 0 is the clean bonus token
        assert len(drafts) == BLOCK - 1 and all(0 <= t < 320 for t in drafts)
    with pytest.raises(ValueError, match="denoising_steps"):
        HeadDrafter(untrained_head, BLOCK, mask, 320, denoising_steps=BLOCK)


def test_eos_inside_accepted_drafts_ends_the_output(base, prompts, eos):
    """Greedy stops at the first EOS; speculative decoding must drop what it accepted after it."""
    model, _ = base
    ids = prompts[0]
    greedy = greedy_decode(model, ids, MAX_NEW, eos).tokens
    # With an oracle, round r drafts generated tokens 1+rL .. rL+L-1. Make a token act as EOS whose
    # first occurrence is a draft with more drafts after it, so the round accepts past the EOS.
    position = next(
        p
        for p in range(1, len(greedy))
        if p % BLOCK not in (0, BLOCK - 1) and greedy[p] not in greedy[:p]
    )
    stop = [greedy[position]]
    expected = greedy_decode(model, ids, MAX_NEW, stop).tokens
    assert expected == greedy[: position + 1]
    oracle = OracleDrafter(model, MAX_NEW, eos)  # drafts run on past the stop token
    result = speculative_decode(model, oracle, ids, MAX_NEW, BLOCK, stop)
    assert result.tokens == expected
    last = result.rounds[-1]
    assert last.accepted == BLOCK - 1 and last.committed < last.accepted + 1


def test_a_cache_left_unrolled_is_caught(base, prompts, eos, monkeypatch):
    model, _ = base
    monkeypatch.setattr(specdec, "_rollback", lambda cache, keep: None)
    with pytest.raises(CacheInvariantError, match="cache holds"):
        speculative_decode(
            model, RandomDrafter(model.config.vocab_size), prompts[0], MAX_NEW, BLOCK, eos
        )


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = PromptLookupDrafter(max_ngram=3)

    def draft(sequence, n=3):
        return drafter.draft(DraftContext(torch.zeros(1), sequence[-1], sequence, n))

    assert draft([1, 2, 3, 4, 9, 8, 1, 2, 3]) == [4, 9, 8]
    assert draft([5, 2, 3, 6, 1, 2, 3, 7, 0, 2, 3]) == [7, 0, 2]  # latest of two matches
    assert draft([1, 2, 3, 4, 9, 1, 2, 3], n=1) == [4]
    assert draft([4, 5, 6, 7]) == []  # no earlier occurrence of any suffix
    assert draft([1, 2, 3, 9, 9, 3]) == [9, 9, 3]  # falls back to a 1-gram


def test_prompt_lookup_is_lossless(base, prompts, eos):
    model, _ = base
    for ids in prompts:
        result = speculative_decode(model, PromptLookupDrafter(), ids, MAX_NEW, BLOCK, eos)
        assert result.tokens == greedy_decode(model, ids, MAX_NEW, eos).tokens
        assert result.tau >= 1.0
        check_rounds(result, len(ids), full_drafts=False)
