"""Speculative decoding on the tiny random Qwen2: lossless with any drafter, cache rolled back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from dmtp import specdec
from dmtp.head import DraftCache, build_head, load_base_model_parts
from dmtp.specdec import (
    CacheInvariantError,
    DraftContext,
    HeadDrafter,
    LookupAndHeadDrafter,
    LookupThenHeadDrafter,
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


MASK = 319  # a base token id, as plan_training picks one
LAYERS = [1, 2]  # output_hidden_states indices of the 2-layer debug model (2 = the final state)


@pytest.fixture(scope="module")
def untrained_head(debug_model_dir):
    """A random head that borrows the tiny model's embedding and LM head."""
    parts = load_base_model_parts(str(debug_model_dir))
    return build_head(
        hidden_size=64, vocab_size=parts.vocab_size, mask_token_id=MASK, block_length=BLOCK,
        feature_layers=LAYERS, num_target_layers=parts.num_hidden_layers, base=parts,
    ).eval()  # fmt: skip


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
    for ids in prompts:
        drafter = HeadDrafter(untrained_head, BLOCK, MASK, 320, steps, first_position)
        result = speculative_decode(model, drafter, ids, MAX_NEW, BLOCK, eos)
        assert result.tokens == greedy_decode(model, ids, MAX_NEW, eos).tokens
        assert 1.0 <= result.tau < 1.5
        committed = [r.accepted + 1 for r in result.rounds]  # no EOS inside a round here
        assert result.tau == pytest.approx(sum(committed) / len(committed))
        check_rounds(result, len(ids))


def test_head_drafter_runs_k_forwards_and_never_drafts_the_mask(untrained_head, monkeypatch):
    calls = []
    draft_step = untrained_head.draft_step

    def counting(new_features, block_ids, start, cache):
        calls.append((len(new_features), block_ids.clone(), start, len(cache)))
        return draft_step(new_features, block_ids, start, cache)

    monkeypatch.setattr(untrained_head, "draft_step", counting)
    # two committed positions before the bonus token: their features enter the cache once
    context = DraftContext(
        torch.randn(2, 128), bonus_token=7, sequence=[1, 2, 7], num_tokens=BLOCK - 1
    )
    # Masked positions the head sees at each step: the 3 drafts filled evenly over K steps.
    for steps, masked in ((1, [3]), (2, [3, 1]), (3, [3, 2, 1])):
        calls.clear()
        drafts = HeadDrafter(untrained_head, BLOCK, MASK, 320, steps).draft(context)
        assert [int((ids == MASK).sum()) for _, ids, _, _ in calls] == masked
        assert all(ids[0] == 7 for _, ids, _, _ in calls)  # position 0 is the clean bonus token
        # (new rows, start, cached rows): the context enters the cache at the first step only
        expected = [(2, 2, 0)] + [(0, 2, 2)] * (steps - 1)
        assert [(n, start, cached) for n, _, start, cached in calls] == expected
        assert len(drafts) == BLOCK - 1 and all(0 <= t < 320 and t != MASK for t in drafts)
    with pytest.raises(ValueError, match="denoising_steps"):
        HeadDrafter(untrained_head, BLOCK, MASK, 320, denoising_steps=BLOCK)


def test_a_head_with_a_draft_vocabulary_drafts_only_from_it(debug_model_dir, base, prompts, eos):
    model, _ = base
    parts = load_base_model_parts(str(debug_model_dir))
    draft_vocab = [MASK, *range(0, 300, 3)]  # the mask is in it: it must still never be drafted
    head = build_head(
        hidden_size=64, vocab_size=320, mask_token_id=MASK, block_length=BLOCK, feature_layers=LAYERS,
        num_target_layers=2, base=parts, draft_vocab=draft_vocab,
    ).eval()  # fmt: skip
    proposed = []

    class Recording(HeadDrafter):
        def draft(self, context):
            drafts = super().draft(context)
            proposed.extend(drafts)
            return drafts

    ids = prompts[0]
    for steps in (1, 3):
        result = speculative_decode(
            model, Recording(head, BLOCK, MASK, 320, steps), ids, MAX_NEW, BLOCK, eos
        )
        assert result.tokens == greedy_decode(model, ids, MAX_NEW, eos).tokens
    assert proposed and set(proposed) <= set(draft_vocab) - {MASK}


class PartlyRightHeadDrafter(HeadDrafter):
    """Runs the head (so its cache goes through every round), then proposes the base model's own
    continuation for the first `pattern[round]` drafts and a wrong token after: rounds accept 0, 1,
    2 or all drafts, so the cache sees every size of accepted context. Snapshots the cache."""

    def __init__(self, head, reference: list[int], pattern: list[int]):
        super().__init__(head, BLOCK, MASK, 320)
        self.reference, self.pattern = reference, pattern
        self.snapshots: list[dict] = []

    def draft(self, context: DraftContext) -> list[int]:
        block = torch.full((BLOCK,), MASK)
        block[0] = context.bonus_token
        new = context.new_features
        states = self.head.draft_step(new, block, context.bonus_position, self.cache)
        self.snapshots.append({
            "sequence": list(context.sequence),
            "new": len(new),
            "states": states,
            "keys": [k.clone() for k in self.cache.keys],
            "values": [v.clone() for v in self.cache.values],
        })  # fmt: skip
        right = self.pattern[len(self.snapshots) % len(self.pattern)]
        position = len(context.sequence)
        drafts = self.reference[position : position + context.num_tokens]
        if right < len(drafts):
            drafts[right] = (drafts[right] + 1) % 320  # the rest of the block cannot count
        return drafts


def test_draft_cache_after_rollbacks_equals_a_recompute(base, prompts, eos, untrained_head):
    """After each round the draft cache holds exactly the committed context (never a rejected
    draft, never the block): the keys/values a fresh cache computes from all of it at once."""
    model, _ = base
    ids = prompts[1]
    greedy = greedy_decode(model, ids, MAX_NEW, eos).tokens
    drafter = PartlyRightHeadDrafter(untrained_head, [*ids, *greedy], pattern=[0, 1, 2, 3, 1])
    result = speculative_decode(model, drafter, ids, MAX_NEW, BLOCK, eos)
    assert result.tokens == greedy
    check_rounds(result, len(ids))
    assert {r.accepted for r in result.rounds} == {0, 1, 2, 3}
    # each round's new context is the previous round's bonus and accepted drafts
    accepted = [r.accepted + 1 for r in result.rounds[:-1]]
    assert [s["new"] for s in drafter.snapshots] == [len(ids), *accepted]

    for snapshot in drafter.snapshots:
        sequence = snapshot["sequence"]
        start = len(sequence) - 1  # the bonus token's position
        with torch.no_grad():
            out = model(input_ids=torch.tensor([sequence[:start]]), output_hidden_states=True)
        features = torch.cat([out.hidden_states[i][0] for i in LAYERS], dim=-1)
        block = torch.full((BLOCK,), MASK)
        block[0] = sequence[-1]
        fresh = DraftCache(untrained_head.config.num_hidden_layers)
        states = untrained_head.draft_step(features, block, start, fresh)
        assert len(fresh) == start == snapshot["keys"][0].shape[-2]
        for layer in range(len(fresh.keys)):
            torch.testing.assert_close(
                snapshot["keys"][layer], fresh.keys[layer], rtol=0, atol=1e-5
            )
            torch.testing.assert_close(
                snapshot["values"][layer], fresh.values[layer], rtol=0, atol=1e-5
            )
        torch.testing.assert_close(snapshot["states"], states, rtol=0, atol=1e-5)
        # ... and the decoding forward is the training forward for that block
        with torch.no_grad():
            trained = untrained_head(
                in_hidden_states=features[None], input_ids=block[None, None],
                anchors=torch.tensor([[start - 1]]),
            ).hidden_states  # fmt: skip
        torch.testing.assert_close(snapshot["states"], trained[0, 0], rtol=0, atol=1e-5)


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
        return drafter.draft(DraftContext(None, sequence[-1], sequence, n))

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


class RecordingHeadDrafter(HeadDrafter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[int], list[int]]] = []

    def propose(self, context, alternatives=0):
        branches = super().propose(context, alternatives)
        self.calls.append((list(context.sequence), branches[0]))
        return branches


def test_lookup_then_head_uses_lookup_where_it_matches_and_keeps_the_head_cache_exact(
    base, prompts, eos, untrained_head
):
    """Lossless; lookup drafts wherever it has a match; every head draft equals a fresh head's
    draft from all of the sequence's features at once, however many rounds lookup took."""
    model, _ = base
    for ids in prompts:
        head = RecordingHeadDrafter(untrained_head, BLOCK, MASK, model.config.vocab_size)
        lookup = PromptLookupDrafter(max_ngram=3)
        hybrid = LookupThenHeadDrafter(lookup, head)
        result = speculative_decode(model, hybrid, ids, MAX_NEW, BLOCK, eos)
        assert result.tokens == greedy_decode(model, ids, MAX_NEW, eos).tokens
        check_rounds(result, len(ids), full_drafts=False)
        assert hybrid.lookup_rounds > 0 and hybrid.head_rounds == len(head.calls) > 0
        # every round drafts but, maybe, one at the token limit (no room for a draft)
        assert len(result.rounds) - 1 <= hybrid.lookup_rounds + hybrid.head_rounds
        for sequence, drafts in head.calls:
            assert lookup.draft(DraftContext(None, sequence[-1], sequence, BLOCK - 1)) == []
            with torch.no_grad():
                out = model(input_ids=torch.tensor([sequence[:-1]]), output_hidden_states=True)
            features = torch.cat([out.hidden_states[i][0] for i in LAYERS], dim=-1)
            fresh = HeadDrafter(untrained_head, BLOCK, MASK, model.config.vocab_size)
            context = DraftContext(features, sequence[-1], sequence, len(drafts))
            assert fresh.draft(context) == drafts


# ----------------------------------------------------------------------------------------------
# token trees: several drafts verified in one forward


def test_a_tree_forward_gives_each_branch_what_feeding_it_alone_gives(base, prompts):
    """Logits and features of every tree node equal a causal forward of its branch alone, and
    shared prefixes are one node."""
    model, _ = base
    ids = prompts[0]
    branches = [[5, 6, 7], [5, 9], [11, 12, 13]]
    nodes, parents, paths = specdec.token_tree(ids[-1], branches)
    assert nodes == [ids[-1], 5, 6, 7, 9, 11, 12, 13]
    assert parents == [-1, 0, 1, 2, 1, 0, 5, 6]
    assert paths == [[1, 2, 3], [1, 4], [5, 6, 7]]
    with torch.no_grad():
        cache = specdec.new_cache(model)
        specdec._forward(model, ids[:-1], cache)
        logits, features = specdec._forward_tree(model, nodes, parents, cache, LAYERS)
        assert cache.get_seq_length() == len(ids) - 1 + len(nodes)
        for path in paths:
            alone = specdec.new_cache(model)
            specdec._forward(model, ids[:-1], alone)
            chain_logits, chain_features = specdec._forward(
                model, [ids[-1], *(nodes[i] for i in path)], alone, feature_layers=LAYERS
            )
            rows = [0, *path]
            torch.testing.assert_close(logits[rows], chain_logits, rtol=0, atol=1e-4)
            torch.testing.assert_close(features[rows], chain_features, rtol=0, atol=1e-4)


class TwoBranchOracle:
    """Two branches of the base model's own continuation, each wrong after a drawn number of
    tokens (in a drawn order): a round must accept the longer right prefix of the two."""

    name, block_length, feature_layers = "two_branch_oracle", None, None

    def __init__(self, reference: list[int], seed: int):
        self.reference = reference
        self.generator = torch.Generator().manual_seed(seed)
        self.right: list[tuple[int, int]] = []

    def start(self, prompt_ids):
        pass

    def draft_branches(self, context: DraftContext) -> list[list[int]]:
        position = len(context.sequence)
        branches, right = [], []
        for _ in range(2):
            drafts = self.reference[position : position + context.num_tokens]
            k = int(torch.randint(len(drafts) + 1, (1,), generator=self.generator))
            if k < len(drafts):
                drafts[k] = (drafts[k] + 1) % 320
            branches.append(drafts)
            right.append(min(k, len(drafts)))
        self.right.append(tuple(right))
        return branches

    def draft(self, context):
        return self.draft_branches(context)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tree_round_keeps_the_branch_accepted_furthest_and_a_cache_of_the_committed_tokens(
    base, prompts, eos, monkeypatch, seed
):
    model, _ = base
    caches = []
    monkeypatch.setattr(specdec, "new_cache", lambda m: caches.append(DynamicCache()) or caches[-1])
    for ids in prompts:
        greedy = greedy_decode(model, ids, MAX_NEW, eos).tokens
        drafter = TwoBranchOracle([*ids, *greedy], seed)
        result = speculative_decode(model, drafter, ids, MAX_NEW, BLOCK, eos)
        assert result.tokens == greedy
        check_rounds(result, len(ids))
        assert [r.accepted for r in result.rounds] == [max(pair) for pair in drafter.right]
        assert {a != b for a, b in drafter.right} == {True, False}  # both kinds of round ran
        # the cache closed up after every tree round: it equals one forward of the committed text
        committed = [*ids, *greedy][:-1]
        with torch.no_grad():
            fresh = model(input_ids=torch.tensor([committed]), use_cache=True).past_key_values
        for kept, recomputed in zip(caches[-1].layers, fresh.layers, strict=True):
            torch.testing.assert_close(kept.keys, recomputed.keys, rtol=0, atol=1e-4)
            torch.testing.assert_close(kept.values, recomputed.values, rtol=0, atol=1e-4)


def test_lookup_and_head_is_lossless_and_keeps_the_head_cache_exact(
    base, prompts, eos, untrained_head
):
    """Both drafts every round, one verification: lossless, and each head draft equals a fresh
    head's from all of the sequence's features at once (the head saw every committed position)."""
    model, _ = base
    for ids in prompts:
        head = RecordingHeadDrafter(untrained_head, BLOCK, MASK, model.config.vocab_size)
        both = LookupAndHeadDrafter(PromptLookupDrafter(max_ngram=3), head)
        result = speculative_decode(model, both, ids, MAX_NEW, BLOCK, eos)
        assert result.tokens == greedy_decode(model, ids, MAX_NEW, eos).tokens
        check_rounds(result, len(ids), full_drafts=False)
        assert len(head.calls) >= len(result.rounds) - 1
        for sequence, drafts in head.calls[:6]:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([sequence[:-1]]), output_hidden_states=True)
            features = torch.cat([out.hidden_states[i][0] for i in LAYERS], dim=-1)
            fresh = HeadDrafter(untrained_head, BLOCK, MASK, model.config.vocab_size)
            assert (
                fresh.draft(DraftContext(features, sequence[-1], sequence, len(drafts))) == drafts
            )


def test_lookup_drafts_past_the_heads_block_beside_it(base, prompts, eos, untrained_head):
    """With lookup's num_tokens above the head's L - 1, the combined drafters take lookup's block;
    the head's branch stays within its own, and decoding stays greedy."""
    model, _ = base
    vocab = model.config.vocab_size
    head = HeadDrafter(untrained_head, BLOCK, MASK, vocab)
    for combined in (LookupThenHeadDrafter, LookupAndHeadDrafter):
        drafter = combined(PromptLookupDrafter(num_tokens=6), head)
        assert drafter.block_length == 7
        assert combined(PromptLookupDrafter(), head).block_length == BLOCK
    repeated = [5, 6, 7, 8, 9, 10, 11, 12] * 3
    both = LookupAndHeadDrafter(PromptLookupDrafter(num_tokens=6), head)
    both.start(repeated)
    features = torch.zeros(len(repeated) - 1, untrained_head.fc.in_features)
    lookup, drafted = both.draft_branches(DraftContext(features, repeated[-1], repeated, 6))
    assert lookup == [5, 6, 7, 8, 9, 10] and len(drafted) == BLOCK - 1
    for ids in prompts:
        ids = [*ids, *ids[-12:]]  # text the answer can look up
        result = speculative_decode(model, both, ids, MAX_NEW, both.block_length, eos)
        assert result.tokens == greedy_decode(model, ids, MAX_NEW, eos).tokens
        assert max(r.drafted for r in result.rounds) <= 6


@pytest.mark.parametrize("steps", [1, 3])
def test_head_alternatives_are_its_next_best_first_tokens(base, prompts, untrained_head, steps):
    """propose(k): the draft, then the k runners-up for the first position (ranked by the head's
    logits there), each with the draft's later tokens when one step drafted them, else alone."""
    model, _ = base
    vocab = model.config.vocab_size
    ids = prompts[0]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    features = torch.cat([out.hidden_states[i][0] for i in LAYERS], dim=-1)[:-1]
    context = DraftContext(features, ids[-1], list(ids), BLOCK - 1)
    draft = HeadDrafter(untrained_head, BLOCK, MASK, vocab, steps).draft(context)
    branches = HeadDrafter(untrained_head, BLOCK, MASK, vocab, steps).propose(context, 2)
    assert branches[0] == draft and len(branches) == 3
    # the first position's ranking, from the first step (the block with every draft masked)
    block = torch.tensor([ids[-1]] + [MASK] * (BLOCK - 1))
    states = untrained_head.draft_step(features, block, context.bonus_position, DraftCache(1))
    ranked = untrained_head.draft_logits(states)[1, :vocab].topk(3).indices.tolist()
    if steps == 1:
        assert ranked[0] == draft[0]
        assert branches[1:] == [[ranked[1], *draft[1:]], [ranked[2], *draft[1:]]]
    else:
        assert all(len(b) == 1 and b[0] != draft[0] for b in branches[1:])


def test_lookup_and_head_with_alternatives_is_lossless(base, prompts, eos, untrained_head):
    model, _ = base
    head = HeadDrafter(untrained_head, BLOCK, MASK, model.config.vocab_size)
    tree = LookupAndHeadDrafter(PromptLookupDrafter(), head, head_alternatives=2)
    for ids in prompts:
        result = speculative_decode(model, tree, ids, MAX_NEW, BLOCK, eos)
        assert result.tokens == greedy_decode(model, ids, MAX_NEW, eos).tokens
        check_rounds(result, len(ids), full_drafts=False)
    with pytest.raises(ValueError, match="head_alternatives"):
        LookupAndHeadDrafter(PromptLookupDrafter(), head, head_alternatives=-1)
