"""Running the base model for collection: state-capture hooks and refilled batched generation.

`HiddenStateCapture` records, while a model runs, the final state (`hidden_states[-1]`) and the
states of chosen feature layers, by forward hooks (no `output_hidden_states` for every layer, no
second pass).

`RefillGenerator` answers a run of prompts with a fixed number of batch rows, giving a row to the
next prompt as soon as its sequence ends (continuous batching). Plain batched `generate` keeps
every row busy until the batch's longest answer ends: on chat prompts (ShareGPT, answers from a
few tokens to the cap) most of its rows are padding for most of the steps. Here a finished row is
dropped from the KV cache and the next prompts are prefilled on their own and spliced in,
right-aligned with the running rows (their cache columns left of their prompt are masked), so each
row keeps its own positions. Outputs are the same greedy tokens and states as `generate` (up to
floating-point summation order), which tests/test_collect.py checks against a teacher-forced forward.

It edits the KV tensors of a `transformers` `DynamicCache` of plain `DynamicLayer`s (every
full-attention decoder: Llama, Qwen2/3, Mistral without sliding window, ...);
`refill_supported(model)` says whether a model's cache is of that kind.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dmtp.errors import DmtpError

# Rows are re-filled once this fraction of the batch is free: each refill prefills the new prompts
# in one forward and copies the KV cache once, so doing it for every single finished row costs
# more than the few idle rows it saves.
REFILL_FRACTION = 1 / 8
# New prompts are prefilled in groups whose left padding adds at most this fraction of tokens
# (prefill is compute-bound: padding costs as much as text) ...
PREFILL_PADDING = 1.25
# ... and at most this many tokens a forward (activations of a long group can be GBs).
PREFILL_MAX_TOKENS = 16384
# Spare columns a growing KV-cache layer allocates when full: one copy of the cache per this many
# steps, instead of one per step.
GROWTH_COLUMNS = 128


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers (`model.model.layers` for Llama, Qwen, Mistral, ...)."""
    count = model.config.get_text_config().num_hidden_layers
    layers = getattr(model.base_model, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == count:
        return layers
    for _, module in model.base_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise DmtpError(
        f"cannot find the {count} decoder layers of {type(model).__name__} to capture feature "
        "layers from; pass --feature_layers none to store the final state only"
    )


class HiddenStateCapture:
    """Forward hooks that keep, for every forward while they are installed, the final state and
    the states of the chosen feature layers.

    The decoder stack's `last_hidden_state` is `hidden_states[-1]` (after the final norm) for every
    HF causal LM. Feature layer i (`output_hidden_states` numbering) is the output of decoder layer
    i - 1; layer 0 is the input of decoder layer 0, which is what transformers records as
    `hidden_states[0]` (the embeddings, after any scaling a model applies to them). The hooks see
    each generation step once: the prefill `[B, P, H]`, then `[B, 1, H]` per new token.
    """

    def __init__(self, model: Any, progress: Any = None, layers: tuple[int, ...] = ()):
        self.decoder = model.base_model
        self.layers = layers  # feature layers, without the final state
        self.modules = decoder_layers(model) if layers else []
        self.states: list[torch.Tensor] = []
        self.layer_states: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.progress = progress

    def __enter__(self) -> HiddenStateCapture:
        self.handles = [self.decoder.register_forward_hook(self._hook)]
        for i in self.layers:
            module = self.modules[max(i - 1, 0)]
            self.handles.append(module.register_forward_hook(self._layer_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        self.states.append(hidden.detach())
        if self.progress is not None:
            self.progress.update(hidden.shape[0] if hidden.shape[1] == 1 else 0)

    def _layer_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if layer == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
            else:
                hidden = output[0] if isinstance(output, tuple) else output
            self.layer_states[layer].append(hidden.detach())

        return hook

    def stacked(self) -> torch.Tensor:
        """`[B, positions, H]`: the final state of all forwards so far."""
        return torch.cat(self.states, dim=1)

    def stacked_layers(self) -> torch.Tensor | None:
        """`[B, positions, n, H]`: the feature layers' states (None without feature layers)."""
        if not self.layers:
            return None
        return torch.stack([torch.cat(self.layer_states[i], dim=1) for i in self.layers], dim=2)

    def pop(self) -> torch.Tensor:
        """`[B, positions, 1 + n, H]` of the forwards since the last pop (final state first)."""
        parts = [self.stacked()] + [torch.cat(self.layer_states[i], dim=1) for i in self.layers]
        self.states.clear()
        for i in self.layers:
            self.layer_states[i].clear()
        return torch.stack(parts, dim=2)


def refill_supported(model: Any) -> bool:
    """Whether the model's KV cache is made of plain growing layers, which `RefillGenerator`
    edits (sliding-window, hybrid and linear-attention caches are not)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # an unusual config: let plain generate handle it
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class Finished:
    """One answered prompt: `states [P + n_new - 1, 1 + n, H]` for the fed positions."""

    item: Any  # what the caller queued with the prompt
    prompt_ids: list[int]
    new_tokens: list[int]  # generated, including a final EOS
    states: torch.Tensor


class _Running:
    """A sequence in a batch row: its states so far, in a buffer sized for its longest answer."""

    def __init__(self, item: Any, prompt_ids: list[int], budget: int, prefill: torch.Tensor):
        self.item, self.prompt_ids, self.budget = item, prompt_ids, budget
        n = len(prompt_ids)
        self.states = prefill.new_empty((n + budget - 1, *prefill.shape[1:]))
        self.states[:n] = prefill
        self.fed = n  # positions whose states are recorded (= the next position id)
        self.new_tokens: list[int] = []
        self.done = False  # answered and handed out; the row idles until the next refill

    def finished(self, eos: set[int]) -> bool:
        return len(self.new_tokens) >= self.budget or self.new_tokens[-1] in eos

    def result(self) -> Finished:
        return Finished(self.item, self.prompt_ids, self.new_tokens, self.states[: self.fed])


class RefillGenerator:
    """Greedy (or sampled) generation over a queue of prompts, `batch_size` rows at a time, each
    row refilled with the next prompt when its sequence ends. See the module docstring."""

    def __init__(
        self,
        model: Any,
        *,
        batch_size: int,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        temperature: float = 0.0,
        max_positions: int | None = None,
        layers: tuple[int, ...] = (),
        progress: Any = None,
    ):
        self.model = model
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.eos = set(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.temperature = temperature
        self.max_positions = max_positions
        self.layers = layers
        self.progress = progress
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def run(
        self, prompts: list[tuple[Any, list[int]]], stop_admitting: Any = None
    ) -> Iterator[Finished]:
        """Yield every prompt's answer as it ends (an order fixed by the prompts and settings).

        prompts: (item, token ids) pairs, admitted in this order.
        stop_admitting: optional callable; once it returns True no further prompt is started
        (those running finish), e.g. when --max_samples is reached.
        """
        from transformers.cache_utils import DynamicCache

        queue = deque(prompts)
        threshold = max(1, int(self.batch_size * REFILL_FRACTION))
        rows: list[_Running] = []
        cache = DynamicCache(config=self.model.config)
        mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # [rows, columns]
        last = torch.zeros((0,), dtype=torch.long, device=self.device)  # token each row feeds next
        with HiddenStateCapture(self.model, self.progress, self.layers) as capture:
            while True:
                for row in rows:
                    if not row.done and row.finished(self.eos):
                        row.done = True
                        yield row.result()
                running = [i for i, row in enumerate(rows) if not row.done]
                admitting = bool(queue) and not (stop_admitting and stop_admitting())
                want = min(self.batch_size - len(running), len(queue)) if admitting else 0
                if not running and not want:
                    return
                # Finished rows idle (fed padding) until enough of the batch is free to refill it:
                # a refill prefills the new prompts in one forward and copies the KV cache once.
                idle = len(rows) - len(running)
                free = self.batch_size - len(running)
                if (idle or want) and (free >= threshold or not running):
                    new = [queue.popleft() for _ in range(want)]
                    rows, cache, mask, last = self._refill(
                        capture, rows, running, cache, mask, last, new
                    )
                    continue  # a new row may be finished at once (EOS first, or a budget of 1)
                last, mask = self._step(capture, rows, cache, mask, last)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Next tokens `[B]` from last-position logits `[B, V]`, as `generate` picks them."""
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1)[:, 0]

    def _budget(self, prompt_length: int) -> int:
        if self.max_positions is None:
            return self.max_new_tokens
        return max(1, min(self.max_new_tokens, self.max_positions - prompt_length))

    def _step(
        self,
        capture: HiddenStateCapture,
        rows: list[_Running],
        cache: Any,
        mask: torch.Tensor,
        last: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed every row its last token: one position more of states and one new token each."""
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = torch.tensor([row.fed for row in rows], device=self.device)[:, None]
        out = self.model(
            input_ids=last[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        states = capture.pop()[:, 0]  # [B, 1 + n, H]
        tokens = self._pick(out.logits[:, -1])
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if not row.done:
                row.states[row.fed] = states[i]
                row.fed += 1
                row.new_tokens.append(token)
        return tokens, mask

    def _refill(
        self,
        capture: HiddenStateCapture,
        rows: list[_Running],
        keep: list[int],
        cache: Any,
        mask: torch.Tensor,
        last: torch.Tensor,
        new: list[tuple[Any, list[int]]],
    ) -> tuple[list[_Running], Any, torch.Tensor, torch.Tensor]:
        """Drop the rows not in `keep`, prefill `new` prompts and splice them in at the end."""
        parts = []
        if keep:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            layers = [(layer.keys[index], layer.values[index]) for layer in cache.layers]
            parts.append(([rows[i] for i in keep], layers, mask[index], last[index]))
        parts += [self._prefill(capture, chunk) for chunk in self._prefill_chunks(new)]
        # Every part's columns end at the same place (the next token's): pad them on the left.
        width = max(part[2].shape[1] for part in parts)
        rows = [row for part in parts for row in part[0]]
        mask = torch.cat([_pad_left(part[2], width) for part in parts])
        last = torch.cat([part[3] for part in parts])
        layers = [
            tuple(torch.cat([_pad_left(part[1][i][j], width) for part in parts]) for j in (0, 1))
            for i in range(len(parts[0][1]))
        ]
        # Columns no running row attends to any more (left of every row's prompt) are dropped.
        first = int(mask.any(dim=0).long().argmax())
        cache = _cache_from(self.model, [(k[:, :, first:], v[:, :, first:]) for k, v in layers])
        return rows, cache, mask[:, first:], last

    def _prefill_chunks(
        self, new: list[tuple[Any, list[int]]]
    ) -> list[list[tuple[Any, list[int]]]]:
        """The new prompts in groups that pad little: prefill is compute-bound, so a 500-token
        prompt among 50-token ones would make the whole group cost 500 tokens a prompt."""
        chunks: list[list[tuple[Any, list[int]]]] = []
        chunk: list[tuple[Any, list[int]]] = []
        real = 0
        for prompt in sorted(new, key=lambda p: len(p[1])):
            length = len(prompt[1])  # ascending: the longest of the chunk so far
            padded = (len(chunk) + 1) * length
            if chunk and (
                padded > PREFILL_PADDING * (real + length) or padded > PREFILL_MAX_TOKENS
            ):
                chunks.append(chunk)
                chunk, real = [], 0
            chunk.append(prompt)
            real += length
        return [*chunks, chunk] if chunk else chunks

    def _prefill(
        self, capture: HiddenStateCapture, new: list[tuple[Any, list[int]]]
    ) -> tuple[list[_Running], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """One forward over prompts (left-padded together) on a cache of their own: their rows,
        (keys, values) per layer, attention mask and first new tokens."""
        from transformers.cache_utils import DynamicCache

        width = max(len(ids) for _, ids in new)
        input_ids = torch.full((len(new), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for b, (_, ids) in enumerate(new):
            input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[b, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        if self.progress is not None:
            self.progress.update(int(mask.sum()))
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            # left padding shifts positions unless they are given explicitly (as generate does)
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        states = capture.pop()  # [k, width, 1 + n, H]
        tokens = self._pick(out.logits[:, -1])
        rows = []
        for b, ((item, ids), token) in enumerate(zip(new, tokens.tolist(), strict=True)):
            row = _Running(item, ids, self._budget(len(ids)), states[b, width - len(ids) :])
            row.new_tokens.append(token)
            rows.append(row)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return rows, layers, mask, tokens


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the column axis (dim 1 of a mask, dim 2 of keys/values) up to `width`."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def _cache_from(model: Any, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A DynamicCache holding these (keys, values) `[B, kv_heads, columns, head_dim]` per layer,
    in layers that grow in place (`_growing_layer_class`)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    grow = _growing_layer_class()
    cache.layers = [grow(keys, values) for keys, values in layers]
    return cache


_GROWING_LAYER: type | None = None


def _growing_layer_class() -> type:
    """A `DynamicLayer` whose keys and values live in buffers with spare columns, written in place.

    `DynamicLayer.update` concatenates: it copies the whole cache at every step, which measured
    28% of collection time on 2 CPU cores (SmolLM2, batch 64, prompts up to 537 tokens). Here a
    step writes one column and hands attention a view; the buffers are reallocated (with
    GROWTH_COLUMNS to spare) only when full. Defined on first use: transformers imports lazily.
    """
    global _GROWING_LAYER
    if _GROWING_LAYER is not None:
        return _GROWING_LAYER
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.length = 0
            self._buffers = (keys[:, :, :0], values[:, :, :0])
            self._write(keys, values)

        def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            start, stop = self.length, self.length + keys.shape[2]
            if stop > self._buffers[0].shape[2]:
                grown = []
                for old, new in zip(self._buffers, (keys, values), strict=True):
                    shape = (*new.shape[:2], stop + GROWTH_COLUMNS, new.shape[3])
                    buffer = new.new_empty(shape)
                    buffer[:, :, :start] = old[:, :, :start]
                    grown.append(buffer)
                self._buffers = tuple(grown)
            self._buffers[0][:, :, start:stop] = keys
            self._buffers[1][:, :, start:stop] = values
            self.length = stop
            self.keys = self._buffers[0][:, :, :stop]
            self.values = self._buffers[1][:, :, :stop]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            self._write(key_states, value_states)
            return self.keys, self.values

    _GROWING_LAYER = GrowingLayer
    return GrowingLayer
