"""Greedy speculative decoding with the base model's KV cache, and the drafters it can use.

One round (DESIGN §5), batch size 1:

    committed:  prompt ... b        b = the bonus token, the base model's argmax after the last
                                    processed position; f = the feature layers' states of the
                                    positions committed since the drafter last ran
    draft:      d_1 ... d_n = drafter(f, b, committed)          n <= L - 1
    verify:     one base forward over [b, d_1 ... d_n] -> argmax y_0 ... y_n
    accept:     the longest prefix with d_i == y_{i-1}: k drafts, plus the new bonus y_k
    roll back:  crop the cache to the committed tokens (the prefix is never recomputed)

so a round commits k + 1 tokens and τ = mean(k + 1). Because every committed token is the base
model's own argmax given the tokens before it, the output is plain greedy decoding's, token for
token; `dmtp.evaluate` checks that on every prompt.

The cache invariant, checked after every round: the cache holds every committed token except the
newest one (the bonus token), whose keys and values the next round's verification computes.

Drafters implement `Drafter`: `HeadDrafter` (a diffusion MTP head), `PromptLookupDrafter` (n-gram
lookup, training-free), `LookupThenHeadDrafter` (lookup where it matches, the head elsewhere),
`LookupAndHeadDrafter` (both drafts, verified together as a token tree: a drafter with
`draft_branches` proposes several branches, and the round keeps the one accepted furthest), and
for tests `OracleDrafter` (the base model's own continuation) and `RandomDrafter`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class DraftContext:
    """What a drafter sees at the start of a round."""

    # [n, F·H] the drafter's feature layers at the positions committed since its last call (the
    # prompt, then each round's bonus and accepted drafts); None for drafters that read no features
    new_features: torch.Tensor | None
    bonus_token: int  # committed, not yet fed to the base model
    sequence: list[int]  # every committed token: the prompt, the generated ones, `bonus_token` last
    num_tokens: int  # propose at most this many drafts (block_length - 1, fewer near the end)

    @property
    def bonus_position(self) -> int:
        """The bonus token's position; features exist for every position before it."""
        return len(self.sequence) - 1


class Drafter(Protocol):
    """Proposes the tokens after the bonus token; the base model verifies them.

    `block_length` is the block the drafter works in (a head's own L), or None to take the
    evaluation's.
    """

    name: str
    block_length: int | None
    feature_layers: Sequence[int] | None  # output_hidden_states indices it reads, or None

    def start(self, prompt_ids: Sequence[int]) -> None:
        """Called once per prompt, outside the timed decoding."""

    def draft(self, context: DraftContext) -> list[int]:
        """Up to `context.num_tokens` proposed tokens (fewer, or none, is allowed)."""


def _synchronize(device: torch.device) -> None:
    # CUDA calls are asynchronous: without this, time lands in whichever call blocks next.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timer:
    """Accumulates wall time of the blocks it wraps (device-synchronised)."""

    device: torch.device
    seconds: float = 0.0

    def __enter__(self) -> Timer:
        _synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        _synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


def _forward(
    model: Any,
    input_ids: list[int],
    cache: Any,
    last_only: bool = False,
    feature_layers: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed `input_ids` after the cached prefix: (logits [T, V], features [T, F·H] or None).

    `last_only` keeps only the last position's logits (a prefill needs no other). The features are
    `hidden_states[i]` for i in `feature_layers`, concatenated, at every fed position: what
    `dmtp collect` stores (the last one after the final norm) and the head was trained on.
    """
    ids = torch.tensor([input_ids], dtype=torch.long, device=model.device)
    out = model(
        input_ids=ids,
        cache=cache,
        use_cache=True,
        output_hidden_states=feature_layers is not None,
        logits_to_keep=1 if last_only else 0,
    )
    if feature_layers is None:
        return out.logits[0], None
    return out.logits[0], torch.cat([out.hidden_states[i][0] for i in feature_layers], dim=-1)


def _forward_tree(
    model: Any,
    nodes: list[int],
    parents: list[int],
    cache: Any,
    feature_layers: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_forward` over a token tree: node i sees the cached prefix, its ancestors and itself, at
    position prefix + depth, so each branch's logits are what feeding that branch alone gives.

    nodes[0] is the root (the bonus token); parents[i] < i is node i's parent (-1 for the root).
    """
    past = cache.get_seq_length()
    sees = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
    depth = [0] * len(nodes)
    for i, parent in enumerate(parents):
        if parent >= 0:
            sees[i] = sees[parent]
            depth[i] = depth[parent] + 1
        sees[i, i] = True
    visible = torch.cat([torch.ones(len(nodes), past, dtype=torch.bool), sees], dim=1)
    dtype = next(model.parameters()).dtype
    # Additive, in the model's dtype: what eager and SDPA attention both take as a custom mask.
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    out = model(
        input_ids=torch.tensor([nodes], dtype=torch.long, device=model.device),
        attention_mask=mask[None, None].to(model.device),
        position_ids=torch.tensor([[past + d for d in depth]], device=model.device),
        cache=cache,
        use_cache=True,
        output_hidden_states=feature_layers is not None,
    )
    if feature_layers is None:
        return out.logits[0], None
    return out.logits[0], torch.cat([out.hidden_states[i][0] for i in feature_layers], dim=-1)


def _keep_cache_rows(cache: Any, past: int, kept: list[int]) -> None:
    """After a tree verification: keep the prefix and the `kept` tree nodes, in that order."""
    index = torch.cat([torch.arange(past), past + torch.tensor(kept, dtype=torch.long)])
    for layer in cache.layers:
        rows = index.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, rows)
        layer.values = layer.values.index_select(-2, rows)


def token_tree(
    bonus: int, branches: Sequence[Sequence[int]]
) -> tuple[list[int], list[int], list[list[int]]]:
    """A trie rooted at the bonus token: (nodes, parents, each branch's node indices).

    Branches that share a prefix share its nodes, so nothing is verified twice.
    """
    nodes, parents = [bonus], [-1]
    children: dict[tuple[int, int], int] = {}
    paths = []
    for branch in branches:
        node, path = 0, []
        for token in branch:
            child = children.get((node, token))
            if child is None:
                child = len(nodes)
                nodes.append(token)
                parents.append(node)
                children[(node, token)] = child
            path.append(child)
            node = child
        paths.append(path)
    return nodes, parents, paths


def new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _rollback(cache: Any, keep: int) -> None:
    """Drop cached positions past `keep` (the rejected drafts)."""
    surplus = cache.get_seq_length() - keep
    if surplus > 0:
        cache.crop(-surplus)  # transformers 5: a negative count removes that many positions


# ----------------------------------------------------------------------------------------------
# plain greedy decoding: the reference and the speed baseline


@dataclass
class GreedyResult:
    tokens: list[int]  # generated tokens, EOS included when reached
    seconds: float
    margins: list[float]  # top-1 minus top-2 logit at each step: small = a near-tie


@torch.inference_mode()
def greedy_decode(
    model: Any, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int]
) -> GreedyResult:
    """Plain greedy decoding with a KV cache, one base forward per token (the same forward call
    speculative decoding uses, so the two are timed on equal terms)."""
    eos = set(eos_token_ids)
    cache = new_cache(model)
    tokens: list[int] = []
    margins: list[float] = []
    timer = Timer(model.device)
    with timer:
        logits, _ = _forward(model, list(prompt_ids), cache, last_only=True)
        while True:
            top = torch.topk(logits[-1].float(), 2)
            token = int(top.indices[0])
            tokens.append(token)
            margins.append(float(top.values[0] - top.values[1]))
            if token in eos or len(tokens) >= max_new_tokens:
                break
            logits, _ = _forward(model, [token], cache)
    return GreedyResult(tokens, timer.seconds, margins)


# ----------------------------------------------------------------------------------------------
# speculative decoding


@dataclass
class Round:
    """One draft-and-verify round."""

    drafted: int  # drafts proposed
    accepted: int  # drafts accepted (the longest matching prefix)
    committed: int  # tokens this round added: accepted + 1, less after an EOS or the token limit
    cache_length: int  # the base model's cache length after the rollback
    sequence_length: int  # committed tokens after the round, prompt included


@dataclass
class SpecResult:
    tokens: list[int]  # generated tokens (the first comes from the prefill, not from a round)
    rounds: list[Round] = field(default_factory=list)
    seconds: float = 0.0  # the whole decoding, prefill included
    draft_seconds: float = 0.0  # inside the drafter
    base_seconds: float = 0.0  # inside base model forwards (prefill and verifications)

    @property
    def tau(self) -> float:
        """Mean tokens committed per round, the bonus token included (1 = no gain)."""
        return sum(r.committed for r in self.rounds) / len(self.rounds) if self.rounds else 1.0


class CacheInvariantError(RuntimeError):
    """The cache does not hold exactly the committed tokens: a bug, never a user error."""


@torch.inference_mode()
def speculative_decode(
    model: Any,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    block_length: int,
    eos_token_ids: Sequence[int],
) -> SpecResult:
    """Greedy speculative decoding of one prompt; drafts are at most `block_length - 1` tokens."""
    if block_length < 2:
        raise ValueError(f"block_length must be >= 2, got {block_length}")
    eos = set(eos_token_ids)
    device = model.device
    total, drafting, verifying = Timer(device), Timer(device), Timer(device)
    cache = new_cache(model)
    drafter.start(prompt_ids)
    sequence = list(prompt_ids)
    result = SpecResult(tokens=[])
    with total:
        layers = getattr(drafter, "feature_layers", None)
        with verifying:
            logits, pending = _forward(
                model, sequence, cache, last_only=True, feature_layers=layers
            )
        bonus = int(logits[-1].argmax())
        sequence.append(bonus)
        result.tokens.append(bonus)
        while result.tokens[-1] not in eos and len(result.tokens) < max_new_tokens:
            # A round commits drafts + 1 tokens: never draft past the token limit.
            budget = min(block_length - 1, max_new_tokens - len(result.tokens) - 1)
            branches: list[list[int]] = []
            if budget > 0:
                context = DraftContext(pending, bonus, sequence, budget)
                with drafting:
                    branches = draft_branches(drafter, context)
                pending = None  # the drafter has taken them into its own cache
            nodes, parents, paths = token_tree(bonus, branches)
            with verifying:
                if len(paths) <= 1:  # one chain: the plain causal forward
                    logits, features = _forward(model, nodes, cache, feature_layers=layers)
                else:
                    logits, features = _forward_tree(model, nodes, parents, cache, layers)
                # predicted[i] is the base model's token after tree node i.
                predicted = logits.argmax(dim=-1).tolist()
            path = accepted_path(paths, nodes, predicted)
            kept = [0, *path]  # the bonus token and the accepted drafts
            accepted = len(path)
            new = [*(nodes[i] for i in path), predicted[kept[-1]]]
            # The rejected drafts' cache entries go (and, in a tree, the kept ones close up).
            if len(paths) <= 1:
                _rollback(cache, len(sequence) + accepted)
            else:
                _keep_cache_rows(cache, len(sequence) - 1, kept)
            if features is not None:  # the bonus and the accepted drafts are now context
                kept_features = features[kept]
                pending = kept_features if pending is None else torch.cat([pending, kept_features])
            bonus = new[-1]
            sequence.extend(new)
            cache_length = cache.get_seq_length()
            if cache_length != len(sequence) - 1:
                raise CacheInvariantError(
                    f"after round {len(result.rounds) + 1} the cache holds {cache_length} positions, "
                    f"expected {len(sequence) - 1} (every committed token but the bonus)"
                )
            # Greedy decoding stops at the first EOS: drop what a round accepted after it.
            stop = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            new = new[:stop]
            result.tokens.extend(new)
            drafted = max((len(p) for p in paths), default=0)
            result.rounds.append(Round(drafted, accepted, len(new), cache_length, len(sequence)))
    result.seconds = total.seconds
    result.draft_seconds, result.base_seconds = drafting.seconds, verifying.seconds
    return result


def draft_branches(drafter: Drafter, context: DraftContext) -> list[list[int]]:
    """The drafter's proposals as branches of at most `context.num_tokens` tokens, none empty.
    A drafter with `draft_branches` proposes several (verified as one tree), any other one."""
    several = getattr(drafter, "draft_branches", None)
    branches = several(context) if several is not None else [drafter.draft(context)]
    return [list(b)[: context.num_tokens] for b in branches if len(b)]


def accepted_path(paths: list[list[int]], nodes: list[int], predicted: list[int]) -> list[int]:
    """The longest accepted prefix over the branches (tree node indices; the first on a tie)."""
    best: list[int] = []
    for path in paths:
        parent, n = 0, 0
        while n < len(path) and nodes[path[n]] == predicted[parent]:
            parent, n = path[n], n + 1
        if n > len(best):
            best = path[:n]
    return best


# ----------------------------------------------------------------------------------------------
# drafters


class HeadDrafter:
    """A block-diffusion head (DESIGN §4, §5) with its draft-side KV cache.

    The block starts as `[bonus, MASK, ..., MASK]` (`first_position="clean"`, the bonus token is
    known) or all MASK (`"masked"`). The context (features of every committed position but the
    bonus) enters the head's cache once, as `dflash_generate` does. Each of the K head forwards
    fills the most confident masked positions (max softmax probability), spread evenly so all are
    filled after K steps; K = 1 fills them all at once. Positions 1..L-1 are the drafts.
    """

    name = "head"

    def __init__(
        self,
        head: Any,
        block_length: int,
        mask_token_id: int,
        base_vocab_size: int,
        denoising_steps: int = 1,
        first_position: str = "clean",
        packed: bool = False,
    ):
        from dmtp.head import DraftCache
        from dmtp.kernels import pack_linears, pack_matrix

        if first_position not in ("clean", "masked"):
            raise ValueError(f"first_position must be clean or masked, got {first_position!r}")
        masked = block_length - 1 if first_position == "clean" else block_length
        if not 1 <= denoising_steps <= masked:
            raise ValueError(
                f"denoising_steps must be in [1, {masked}] (the masked positions), got {denoising_steps}"
            )
        self.head = head
        self.block_length = block_length
        self.mask_token_id = mask_token_id
        self.base_vocab_size = base_vocab_size
        self.denoising_steps = denoising_steps
        self.first_position = first_position
        self.feature_layers = list(head.config.feature_layers)
        parameter = next(head.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        # The head's logits over its draft vocabulary; on a CPU with `packed`, every matrix the
        # head reads prepacked for oneDNN (dmtp.kernels), as the base model's are.
        self._logits = head.draft_logits
        if packed:
            pack_linears(head)
            self._logits = pack_matrix(head.draft_weight(self.device, self.dtype))
        self._new_cache = lambda: DraftCache(head.config.num_hidden_layers)
        self.cache = self._new_cache()

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.cache = self._new_cache()

    def _token_logits(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head logits `[L, V_draft]` over tokens it may draft, and their token ids (None: index = id)."""
        ids = self.head.draft_token_ids(states.device)
        logits = self._logits(states).float()
        # An own-vocabulary head's extra mask row is no base token. A borrowed mask id is a real
        # token and may be drafted, as dflash_generate does.
        return (logits[:, : self.base_vocab_size] if ids is None else logits), ids

    def draft(self, context: DraftContext) -> list[int]:
        return self.propose(context)[0]

    @torch.inference_mode()
    def propose(self, context: DraftContext, alternatives: int = 0) -> list[list[int]]:
        """The draft, then up to `alternatives` more branches: the next-best tokens for the first
        draft position, each followed by the draft's later tokens when one step drafted them all
        (they did not depend on the first), else alone."""
        block = torch.full(
            (self.block_length,), self.mask_token_id, dtype=torch.long, device=self.device
        )
        if self.first_position == "clean":
            block[0] = context.bonus_token
        new = context.new_features
        if new is None:
            new = torch.zeros((0, self.head.fc.in_features), device=self.device)
        new = new.to(device=self.device, dtype=self.dtype)
        # Tracked apart from the ids: a bonus token may equal the mask id and is still known.
        masked = torch.ones(self.block_length, dtype=torch.bool, device=self.device)
        masked[0] = self.first_position == "masked"
        runners_up: list[int] = []
        for step in range(self.denoising_steps):
            remaining = int(masked.sum())
            if remaining == 0:
                break
            states = self.head.draft_step(new, block, context.bonus_position, self.cache)
            new = new[:0]  # the context is in the cache now
            logits, ids = self._token_logits(states)
            confidence, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
            if ids is not None:
                tokens = ids[tokens]
            confidence = confidence.masked_fill(~masked, -1.0)
            count = math.ceil(remaining / (self.denoising_steps - step))
            chosen = confidence.topk(count).indices
            if alternatives and masked[1] and bool((chosen == 1).any()):
                ranked = logits[1].topk(min(alternatives + 1, logits.shape[-1])).indices[1:]
                runners_up = (ranked if ids is None else ids[ranked]).tolist()
            block[chosen] = tokens[chosen]
            masked[chosen] = False
        draft = block[1 : 1 + context.num_tokens].tolist()
        if not alternatives or not draft:
            return [draft]
        later = draft[1:] if self.denoising_steps == 1 else []
        return [draft, *([token, *later] for token in runners_up)]


class PromptLookupDrafter:
    """Prompt lookup (n-gram) drafting: find the latest earlier occurrence of the sequence's last
    n tokens (longest n first) and propose what followed it. Training-free, the baseline a head
    has to beat."""

    name = "prompt_lookup"
    feature_layers = None

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.block_length = None if num_tokens is None else num_tokens + 1

    def start(self, prompt_ids: Sequence[int]) -> None:
        pass

    def draft(self, context: DraftContext) -> list[int]:
        sequence, limit = context.sequence, context.num_tokens
        for n in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            suffix = sequence[-n:]
            # Latest match first: recent text predicts the continuation best.
            for start in range(len(sequence) - n - 1, -1, -1):
                if sequence[start : start + n] == suffix:
                    return sequence[start + n : start + n + limit]
        return []


def combined_block_length(lookup: PromptLookupDrafter, head: HeadDrafter) -> int:
    """Lookup may draft past the head's block (its own `num_tokens`); the head drafts at most
    its L - 1 whatever the round's budget."""
    return max(head.block_length, lookup.block_length or head.block_length)


class LookupThenHeadDrafter:
    """Prompt lookup where it finds a match, the head everywhere else.

    The two fail in different places: lookup is near-perfect inside text the answer repeats
    (code, quoted input, the small models' loops) and has nothing elsewhere; the head drafts
    anywhere but weakly. The head still takes in every committed position's features, buffered
    over the rounds lookup drafted, so its cache stays exact (DESIGN §5).
    """

    name = "lookup_head"

    def __init__(self, lookup: PromptLookupDrafter, head: HeadDrafter):
        self.lookup, self.head = lookup, head
        self.block_length = combined_block_length(lookup, head)
        self.feature_layers = head.feature_layers
        self._pending: torch.Tensor | None = None
        self.head_rounds = self.lookup_rounds = 0

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.head.start(prompt_ids)
        self._pending = None

    def draft(self, context: DraftContext) -> list[int]:
        new = context.new_features
        if self._pending is not None:
            new = self._pending if new is None else torch.cat([self._pending, new])
        drafts = self.lookup.draft(context)
        if drafts:
            self._pending, self.lookup_rounds = new, self.lookup_rounds + 1
            return drafts
        self._pending, self.head_rounds = None, self.head_rounds + 1
        return self.head.draft(dataclasses.replace(context, new_features=new))


class LookupAndHeadDrafter:
    """Prompt lookup's draft and the head's, verified together as one token tree.

    One base forward checks both (up to N + L tokens for lookup's N and the head's L − 1, shared
    prefixes once) and the round keeps whichever branch the base model accepts furthest, so it
    never does worse than either drafter alone on the same prefix. The head drafts every round and
    takes in every committed position's features as it goes. With `head_alternatives` k, the
    head's k next-best first tokens join the tree as well, each followed by the head's later
    drafts (`HeadDrafter.propose`): the head's first guess is its weakest link.
    """

    name = "lookup_and_head"

    def __init__(self, lookup: PromptLookupDrafter, head: HeadDrafter, head_alternatives: int = 0):
        if head_alternatives < 0:
            raise ValueError(f"head_alternatives must be >= 0, got {head_alternatives}")
        self.lookup, self.head = lookup, head
        self.head_alternatives = head_alternatives
        self.block_length = combined_block_length(lookup, head)
        self.feature_layers = head.feature_layers

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.head.start(prompt_ids)

    def draft_branches(self, context: DraftContext) -> list[list[int]]:
        return [self.lookup.draft(context), *self.head.propose(context, self.head_alternatives)]

    def draft(self, context: DraftContext) -> list[int]:
        """Only for callers that take one branch: lookup's when it matches, else the head's."""
        lookup, head, *_ = self.draft_branches(context)
        return lookup or head


class OracleDrafter:
    """Drafts the base model's own greedy continuation (precomputed): every draft is accepted."""

    name = "oracle"
    block_length = None
    feature_layers = None

    def __init__(self, model: Any, max_new_tokens: int, eos_token_ids: Sequence[int]):
        self.model, self.max_new_tokens, self.eos_token_ids = model, max_new_tokens, eos_token_ids
        self.reference: list[int] = []

    def start(self, prompt_ids: Sequence[int]) -> None:
        greedy = greedy_decode(self.model, prompt_ids, self.max_new_tokens, self.eos_token_ids)
        self.reference = [*prompt_ids, *greedy.tokens]

    def draft(self, context: DraftContext) -> list[int]:
        position = len(context.sequence)
        return self.reference[position : position + context.num_tokens]


class RandomDrafter:
    """Uniformly random tokens: almost always rejected, so τ stays near 1 and losslessness shows."""

    name = "random"
    block_length = None
    feature_layers = None

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def start(self, prompt_ids: Sequence[int]) -> None:
        pass

    def draft(self, context: DraftContext) -> list[int]:
        return torch.randint(
            self.vocab_size, (context.num_tokens,), generator=self.generator
        ).tolist()
