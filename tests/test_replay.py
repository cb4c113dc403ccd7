"""dmtp.replay: rounds replayed on a greedy store are the rounds real speculative decoding makes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dflash_oracle import fit_head
from transformers import AutoModelForCausalLM

from dmtp.collect import collect
from dmtp.config import CollectConfig, StoreLayout
from dmtp.head import build_head, load_base_model_parts
from dmtp.replay import replay_store
from dmtp.specdec import (
    HeadDrafter,
    LookupAndHeadDrafter,
    LookupThenHeadDrafter,
    PromptLookupDrafter,
    speculative_decode,
)
from dmtp.store import open_store

BLOCK = 4
MAX_NEW = 40
PROMPTS = [
    "Write a story about a lighthouse keeper.",
    "Explain attention and key-value caches.",
    "Count from one to twenty.",
    "Hi",
    "Describe the quick brown fox, then the lazy dog, then both together.",
]


@pytest.fixture(scope="module")
def store(debug_model_dir, tmp_path_factory):
    """The tiny model's greedy answers, collected one prompt at a time in float32."""
    root = tmp_path_factory.mktemp("replay")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    result = collect(
        CollectConfig(
            base_model_path=str(debug_model_dir),
            input_data_path=str(prompts),
            output_dir=str(root / "data"),
            max_new_tokens=MAX_NEW,
            batch_size=1,
            device="cpu",
            dtype="float32",
            feature_layers="1",
            layout=StoreLayout(chunk_rows=16, rows_per_file=64),
        )
    )
    return result.store_path


def sequences(store_path) -> list[tuple[list[int], int]]:
    """(prompt ids, answer length) of every stored answer, as collection encoded them."""
    shard = open_store(store_path).shard(0)
    offsets = shard.sequence_offsets()
    generated = np.asarray(shard.array("is_generated")[:])
    inputs = np.asarray(shard.array("input_ids")[:])
    out = []
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        last_prompt_row = start + int(np.flatnonzero(generated[start:end])[0])
        out.append((inputs[start : last_prompt_row + 1].tolist(), int(end - last_prompt_row)))
    return out


def decoded(model, drafter, store_path, eos) -> dict:
    committed = rounds = 0
    block = drafter.block_length or BLOCK
    proposed, accepted = [0] * (block - 1), [0] * (block - 1)
    for prompt, _ in sequences(store_path):
        result = speculative_decode(model, drafter, prompt, MAX_NEW, block, eos)
        for r in result.rounds:
            rounds, committed = rounds + 1, committed + r.committed
            for k in range(r.drafted):
                proposed[k] += 1
            for k in range(r.accepted):
                accepted[k] += 1
    return {
        "tau": committed / rounds,
        "rounds": rounds,
        "acceptance_by_position": [
            a / p if p else None for a, p in zip(accepted, proposed, strict=True)
        ],
    }


def test_replayed_rounds_are_decodings_rounds(debug_model_dir, store):
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    eos = [model.generation_config.eos_token_id]
    parts = load_base_model_parts(str(debug_model_dir))
    head = build_head(
        hidden_size=parts.embeddings.shape[1], vocab_size=parts.vocab_size,
        mask_token_id=parts.vocab_size - 1, block_length=BLOCK, feature_layers=[1, 2],
        num_target_layers=parts.num_hidden_layers, context_window=None, base=parts,
    )  # fmt: skip
    # Fitted to some of the answers, so that it drafts some stretches right and others wrong.
    full = []
    shard = open_store(store).shard(0)
    offsets, inputs = shard.sequence_offsets(), np.asarray(shard.array("input_ids")[:])
    tokens = np.asarray(shard.array("tokens")[:])
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        full.append([*inputs[start:end].tolist(), int(tokens[end - 1])])
    assert len(full) == len(PROMPTS)
    fit_head(head, model, full[:3], steps=80)

    replayed = replay_store(head, store)
    drafter = HeadDrafter(head, BLOCK, head.config.mask_token_id, parts.vocab_size)
    real = {
        "head": decoded(model, drafter, store, eos),
        "prompt_lookup": decoded(model, PromptLookupDrafter(num_tokens=BLOCK - 1), store, eos),
        "lookup_head": decoded(
            model, LookupThenHeadDrafter(PromptLookupDrafter(), drafter), store, eos
        ),
        "lookup_and_head": decoded(
            model, LookupAndHeadDrafter(PromptLookupDrafter(), drafter), store, eos
        ),
    }
    assert_same(replayed, real)
    # lookup drafting past the head's block (`dmtp evaluate`'s default), alone and beside the head
    longer = replay_store(head, store, prompt_lookup_num_tokens=LOOKUP_TOKENS)
    assert_same(
        longer,
        {
            "prompt_lookup": decoded(
                model, PromptLookupDrafter(num_tokens=LOOKUP_TOKENS), store, eos
            ),
            "lookup_head": decoded(
                model, LookupThenHeadDrafter(long_lookup(), drafter), store, eos
            ),
            "lookup_and_head": decoded(
                model, LookupAndHeadDrafter(long_lookup(), drafter), store, eos
            ),
        },
    )
    assert longer["prompt_lookup"]["tau"] >= replayed["prompt_lookup"]["tau"]
    # ... and lookup did draft past the head's block, and had such drafts accepted
    assert longer["lookup_and_head"]["acceptance_by_position"][BLOCK - 1]
    # the fitted head drafts some right: the equality above is not that of all-rejected rounds
    assert real["head"]["tau"] > 1.05 and real["lookup_head"]["tau"] > 1.05
    # the tree never accepts less than either of its branches would on the same prefix
    assert real["lookup_and_head"]["tau"] >= max(real["head"]["tau"], real["lookup_head"]["tau"])


LOOKUP_TOKENS = 6


def long_lookup() -> PromptLookupDrafter:
    return PromptLookupDrafter(num_tokens=LOOKUP_TOKENS)


def assert_same(replayed: dict, real: dict) -> None:
    for name, figures in real.items():
        assert replayed[name]["rounds"] == figures["rounds"], name
        assert replayed[name]["tau"] == pytest.approx(figures["tau"]), name
        for ours, theirs in zip(
            replayed[name]["acceptance_by_position"], figures["acceptance_by_position"], strict=True
        ):
            assert ours == pytest.approx(theirs), name
