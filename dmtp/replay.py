"""Greedy speculative decoding replayed on a self-distilled store: τ without decoding.

    from dmtp.replay import replay_store
    figures = replay_store(head, "runs/heldout/collected_data_final")   # {"head": ..., ...}

Greedy speculative decoding commits exactly the base model's greedy sequence, so its rounds are a
function of that sequence and of the drafts: a round anchored at row l (the row whose output t_l
is the bonus token) accepts the leading drafts equal to t_{l+1}, t_{l+2}, … and the next round
anchors at l + accepted + 1; the first anchors at the last prompt row. A store collected greedily
holds the sequence and, at every row, the feature layers' states decoding would compute, so the
head's draft at every anchor comes from one batched forward (`dmtp.blocks`' layout) and every
round of every answer is replayed in seconds, where real decoding takes a base forward per round.
Prompt lookup needs only the tokens. τ and acceptance by position are decoding's definitions
(`dmtp.evaluate`); speed and losslessness still need real decoding (`dmtp evaluate`).

The replay equals decoding up to numerics: batched collection in bfloat16 and one-prompt decoding
may round a near-tie differently, after which the two sequences part (tests/test_replay.py checks
equality in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmtp.blocks import one_step_drafts
from dmtp.data import IGNORE_INDEX

REPLAY_DRAFTERS = ("head", "prompt_lookup", "lookup_head", "lookup_and_head")
ANCHORS_PER_FORWARD = 256  # bounds the block attention's memory on long answers


@dataclass
class ReplayFigures:
    """One drafter's replayed rounds."""

    block_length: int
    rounds: int = 0
    committed: int = 0
    proposed: list[int] = field(init=False)  # drafts proposed at block position k = 1..L-1
    accepted: list[int] = field(init=False)  # ... and accepted there

    def __post_init__(self) -> None:
        self.proposed = [0] * (self.block_length - 1)
        self.accepted = [0] * (self.block_length - 1)

    @property
    def tau(self) -> float:
        return self.committed / self.rounds if self.rounds else 1.0

    def add(self, proposed: int, accepted: int, committed: int) -> None:
        self.rounds += 1
        self.committed += committed
        for k in range(proposed):
            self.proposed[k] += 1
        for k in range(accepted):
            self.accepted[k] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "rounds": self.rounds,
            "acceptance_by_position": [
                a / p if p else None for a, p in zip(self.accepted, self.proposed, strict=True)
            ],
        }


def leading_matches(drafts: Sequence[int], truth: Sequence[int]) -> int:
    n = 0
    while n < min(len(drafts), len(truth)) and drafts[n] == truth[n]:
        n += 1
    return n


@torch.inference_mode()
def head_acceptance(head: Any, blocks: Any, item: dict[str, np.ndarray]) -> np.ndarray:
    """`[A]` leading correct one-step drafts of `head` at each of the item's anchors."""
    accepted = []
    for start in range(0, len(item["anchors"]), ANCHORS_PER_FORWARD):
        chunk = {**item, "anchors": item["anchors"][start : start + ANCHORS_PER_FORWARD]}
        chunk["labels"] = item["labels"][start : start + ANCHORS_PER_FORWARD]
        batch = blocks.collate([chunk])
        predicted = one_step_drafts(head, head, batch, head.config.mask_token_id)[0]
        truth = batch["labels"][0, :, 1:]
        correct = (predicted == truth) & (truth != IGNORE_INDEX)
        accepted.append(torch.cumprod(correct.long(), dim=1).sum(dim=1))
    return torch.cat(accepted).numpy() if accepted else np.zeros(0, dtype=np.int64)


def replay_store(
    head: Any | None,
    store: str | Path | Any,
    *,
    block_length: int | None = None,
    split: int | None = None,
    max_new_tokens: int | None = None,
    prompt_lookup_max_ngram: int | None = None,
    prompt_lookup_num_tokens: int | None = None,
) -> dict[str, dict[str, Any]]:
    """τ and acceptance by position of the head, prompt lookup, lookup_head and lookup_and_head
    (both drafts verified as a tree) on every answer of
    a greedily collected `store` (a path or a `StoreIndex`), as greedy speculative decoding would
    make them.

    head: an `MTPHeadModel` with the base model attached (None: prompt lookup only).
    split: the `StoreIndex` split to replay (None: every sequence).
    max_new_tokens: replay at most this many generated tokens per answer (None: all the store has).
    prompt_lookup_num_tokens: most tokens lookup drafts, alone and beside the head (None: L - 1),
    as `dmtp evaluate --prompt_lookup_num_tokens`; the head drafts L - 1.
    """
    from dmtp.blocks import AnchoredBlocks
    from dmtp.data import StoreIndex
    from dmtp.specdec import DraftContext, PromptLookupDrafter
    from dmtp.store import open_store

    if block_length is None:
        if head is None:
            raise ValueError("replay_store needs block_length without a head")
        block_length = head.config.block_length
    index = store
    if not isinstance(store, StoreIndex):
        index = StoreIndex(
            open_store(store), loss_on="response", train_ratio=1.0, split_seed=0, max_samples=None
        )
    layers = head.config.feature_layers if head is not None else [-1]
    blocks = AnchoredBlocks(
        index,
        split=split,
        feature_layers=layers,
        block_length=block_length,
        sequences_per_batch=1,
        anchors_per_sequence=10**9,
        max_sequence_rows=10**9,  # one segment per answer: every anchor sees its whole context
        seed=0,
        shuffle=False,
        require_draft_label=False,
    )
    names = ["prompt_lookup"] if head is None else list(REPLAY_DRAFTERS)
    lookup_tokens = prompt_lookup_num_tokens or block_length - 1
    figures = {
        name: ReplayFigures(
            block_length if name == "head" else max(block_length, lookup_tokens + 1)
        )
        for name in names
    }
    lookup = (
        PromptLookupDrafter()
        if prompt_lookup_max_ngram is None
        else PromptLookupDrafter(max_ngram=prompt_lookup_max_ngram)
    )
    collected_limit = index_max_new_tokens(index)
    if head is not None:
        head.eval()
    for segment in blocks.segments:
        item = blocks.read_segment(segment, None)
        anchors = item["anchors"]
        if len(anchors) == 0:
            continue
        shard = blocks.shard(segment.position)
        inputs = np.asarray(shard.array("input_ids")[segment.start : segment.end]).tolist()
        outputs = np.asarray(shard.array("tokens")[segment.start : segment.end]).tolist()
        # The first round anchors at the last prompt row; its output is the first answer token.
        first = int(anchors[0])
        answer_length = len(outputs) - first
        # An answer shorter than the collection's limit ended at EOS: decoding would have drafted
        # past it (and truncated). One at the limit, or cut by max_new_tokens, ends at a limit
        # decoding never drafts beyond.
        ends_at_eos = answer_length < collected_limit and (
            max_new_tokens is None or max_new_tokens >= answer_length
        )
        limit = answer_length if max_new_tokens is None else min(max_new_tokens, answer_length)
        valid = (item["labels"][:, 1:] != IGNORE_INDEX).sum(axis=1)
        row = {int(a): i for i, a in enumerate(anchors)}
        head_accepts = head_acceptance(head, blocks, item) if head is not None else None
        for name in names:
            anchor, generated = first, 1
            while generated < limit:
                i = row[anchor]
                # What is left of the answer after the bonus token bounds both drafters' labels.
                left = len(outputs) - 1 - anchor
                room = int(valid[i]) if ends_at_eos else min(int(valid[i]), limit - generated - 1)
                lookup_room = min(lookup_tokens, left)
                if not ends_at_eos:
                    lookup_room = min(lookup_room, limit - generated - 1)
                drafts: list[int] = []
                truth = outputs[anchor + 1 : anchor + 1 + max(room, lookup_room)]
                if name != "head" and lookup_room > 0:
                    sequence = [*inputs[: anchor + 1], outputs[anchor]]
                    drafts = lookup.draft(
                        DraftContext(None, outputs[anchor], sequence, lookup_room)
                    )
                if name == "head" or (name == "lookup_head" and not drafts):
                    proposed, accepted = room, min(int(head_accepts[i]), room)
                elif name == "lookup_and_head":  # both verified: the branch accepted furthest
                    proposed = max(room, len(drafts))
                    accepted = max(min(int(head_accepts[i]), room), leading_matches(drafts, truth))
                else:
                    proposed, accepted = len(drafts), leading_matches(drafts, truth)
                committed = min(accepted + 1, limit - generated)
                figures[name].add(proposed, accepted, committed)
                generated += committed
                anchor += committed
    return {name: f.as_dict() for name, f in figures.items()}


def index_max_new_tokens(index: Any) -> int:
    """The collection's max_new_tokens (answers this long were cut, not ended)."""
    from dmtp.store import open_store

    collection = open_store(index.path).attrs.get("collection", {})
    return int(collection.get("max_new_tokens") or 10**9)
