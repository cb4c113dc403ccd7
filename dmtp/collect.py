"""Collect base-model hidden states and tokens into the token-major Zarr store (DESIGN §3).

    dmtp collect --base_model_path Qwen/Qwen2.5-7B-Instruct \
        --input_data_path prompts.jsonl --output_dir data/ --max_new_tokens 2048 --batch_size 16

For every position l of every sequence we store the input token, the last-layer hidden state h_l
(`hidden_states[-1]`, after the final norm), the states of a few more base layers for multi-layer
heads (`--feature_layers`, DESIGN §3) and the token the model outputs there, t_l. The states are
captured by forward hooks on the decoder and the chosen decoder layers while the model runs (not
by asking for every layer, not by a second pass). Plain-text documents are teacher-forced in one
forward.

Chat prompts are answered in runs of RUN_BATCHES batches, sorted by length within a run. Within a
run `batch_size` rows generate at once and a row whose answer has ended takes the next prompt
(`dmtp.generation.RefillGenerator`), so no row idles while the batch's longest answer finishes;
models whose KV cache that cannot edit (sliding-window layers) fall back to batched `generate`.

Resumable: rows are committed at run (or batch) boundaries, so after a kill `--resume` redoes at
most the runs since the last flushed shard file, exactly as they were composed, and skips finished
shards.

Faults (issue 12), each a one-line error and a store `--resume` completes:
- a second writer: each shard written is leased (`dmtp.lease`) before anything is loaded, so a
  second `dmtp collect` into the same shards exits 2 naming the holder (host, pid, since when);
- SIGTERM (spot reclaim, eviction, a stage timeout): the runs finished so far are written and
  committed, the run in progress is dropped, and it exits 75 (`Preempted`);
- a full disk: it says where, and how much more the store needs (`DiskFull`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from dmtp import __version__
from dmtp.cli import add_config_arguments, config_from_args
from dmtp.config import CollectConfig
from dmtp.errors import DiskFull, InputDataError, Preempted, StoreError
from dmtp.generation import Finished, HiddenStateCapture, RefillGenerator, refill_supported
from dmtp.lease import held, shard_lease_path
from dmtp.models import (
    BaseModel,
    encode_answered_chat,
    encode_prompt,
    eos_token_ids,
    load_base_model,
    resolve_device,
)
from dmtp.preemption import StopOnSigterm
from dmtp.prompts import Prompt, PromptFileInfo, iter_prompts, scan_prompts
from dmtp.store import (
    SequenceRows,
    ShardWriter,
    Store,
    count_samples,
    create_store,
    describe_differences,
    directory_bytes,
    encode_hidden_states,
    estimate_bytes_per_row,
    open_store,
    remove_store,
)

LOGITS_ROWS = (
    256  # rows per LM-head matmul when taking argmax over prompt positions (bounds memory)
)
# Prompts are collected in runs of this many batches: sorted by length within a run (so batches
# pad little), answered by refilled batch rows within a run (dmtp.generation), and committed at the
# run's end. A longer run wastes less at its end, where its last answers finish with few rows busy,
# but a kill loses more; runs rather than the whole shard, so --max_samples still takes prompts
# from across the file, not only the shortest ones.
RUN_BATCHES = 8


@dataclass
class CollectResult:
    """What a collection produced: small enough to pass between tasks."""

    store_path: str
    shards: list[int]
    rows: int
    sequences: int
    complete: bool
    seconds: float
    tokens_per_second: float


def check_prompt_lengths(path: Path, base: BaseModel) -> tuple[int, float]:
    """Fail on the first prompt the model can't read; return (count, mean prompt tokens)."""
    limit = base.max_positions
    total = count = 0
    for prompt in iter_prompts(path):
        try:
            n = len(encode_prompt(prompt, base.tokenizer))
        except InputDataError as error:
            raise InputDataError(f"{path}:{prompt.line}: {error}") from None
        if n == 0:
            raise InputDataError(f"{path}:{prompt.line}: prompt encodes to no tokens")
        if limit is not None and n >= limit:
            raise InputDataError(
                f"{path}:{prompt.line}: prompt is {n} tokens, longer than the model's context "
                f"({limit}); shorten or drop it"
            )
        total, count = total + n, count + 1
    return count, total / max(count, 1)


def cpu_has_native_bfloat16() -> bool:
    """True on CPUs with bfloat16 instructions (avx512_bf16, amx_bf16), where oneDNN runs bf16
    matmuls natively: SmolLM2-135M generates ~2x faster in bf16 than in fp32 there (DESIGN §7).
    Elsewhere bf16 is emulated and slower than fp32."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to ask, keep float32
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def collection_dtype(dtype: str, device: str) -> str:
    """`--dtype auto` for collection: bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") or (device == "cpu" and cpu_has_native_bfloat16()):
        return "bfloat16"
    return "float32"


# ----------------------------------------------------------------------------------------------
# the store's identity


def store_identity(
    config: CollectConfig, base: BaseModel, prompts: PromptFileInfo
) -> dict[str, Any]:
    """Root attrs: a pure function of what determines the store's content (nothing host-specific)."""
    identity = base.identity
    return {
        "base_model": {
            k: identity[k] for k in ("name_or_path", "fingerprint", "architecture", "hidden_state")
        },
        "collection": {
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "seed": config.seed,
            "batch_size": config.batch_size,
            "sample_size": config.sample_size,
            "stride": config.stride,
            "max_samples": config.max_samples,
            "prompts_per_shard": config.prompts_per_shard,
            "dtype": base.hidden_dtype,
            "mode": "generate" if prompts.generates else "teacher_forced",
        },
        "prompts_sha256": prompts.sha256,
        "prompts_count": prompts.count,
        "dmtp_version": __version__,
    }


def num_hidden_layers(base: BaseModel) -> int:
    """Decoder layers of the base model (of its text model, for a multimodal one)."""
    return int(base.model.config.get_text_config().num_hidden_layers)


def stored_feature_layers(config: CollectConfig, base: BaseModel) -> tuple[int, ...]:
    """The layers that go into `layer_states`: the chosen ones less the final state."""
    final = num_hidden_layers(base)
    return tuple(i for i in config.resolve_feature_layers(final) if i != final)


def prepare_store(config: CollectConfig, base: BaseModel, prompts: PromptFileInfo) -> Store:
    """Create the store, or reopen one made with the same settings; refuse anything else."""
    path = config.store_path
    identity = store_identity(config, base, prompts)
    layers = stored_feature_layers(config, base)
    num_shards = config.num_shards
    if config.overwrite:
        remove_store(path)
    elif (path / "zarr.json").exists():
        existing = open_store(path)
        if config.prompts_per_shard is not None and existing.num_shards < num_shards:
            # Fixed shards: a larger budget adds shards; those collected keep their prompts.
            zarr.open_group(path, mode="r+").attrs["num_shards"] = num_shards
            existing = open_store(path)
        elif config.prompts_per_shard is not None:
            num_shards = existing.num_shards  # a smaller budget reads the same store
        wanted = {
            **existing.attrs,
            **identity,
            "num_shards": num_shards,
            "layout": asdict(config.layout),
            "feature_layers": list(layers),
            "num_hidden_layers": num_hidden_layers(base),
        }
        differences = describe_differences(existing.attrs, wanted)
        if differences:
            raise StoreError(
                f"{path} holds a store made with other settings ({differences}); "
                "use --overwrite to replace it or choose another --output_dir"
            )
        shards = (
            [config.shard_index] if config.shard_index is not None else range(config.num_shards)
        )
        started = [k for k in shards if existing.has_shard(k) and not existing.shard(k).complete]
        if started and not config.resume:
            raise StoreError(
                f"{path}: shard(s) {started} were interrupted; pass --resume to continue them "
                "or --overwrite to start again"
            )
    return create_store(
        path,
        attrs=identity,
        hidden_size=base.hidden_size,
        vocab_size=len_vocab(base),
        hidden_dtype=base.hidden_dtype,
        num_shards=num_shards,
        layout=config.layout,
        feature_layers=layers,
        num_hidden_layers=num_hidden_layers(base),
    )


def len_vocab(base: BaseModel) -> int:
    """Token ids the store may hold: the LM head's rows (can exceed the tokenizer's length)."""
    return max(base.vocab_size, len(base.tokenizer))


def check_disk_space(
    config: CollectConfig,
    base: BaseModel,
    n_prompts: int,
    mean_prompt_tokens: float,
    generates: bool,
) -> int:
    """Print the estimated store size; refuse when the disk cannot hold it. Returns the estimate."""
    new_tokens = config.max_new_tokens if generates else 0
    # Only the requested shards are collected: fixed shards hold prompts_per_shard prompts each,
    # round-robin shards about 1/num_shards of the file.
    shards = 1 if config.shard_index is not None else config.num_shards
    if config.prompts_per_shard is not None:
        n_prompts = min(n_prompts, shards * config.prompts_per_shard)
    elif config.shard_index is not None:
        n_prompts = -(-n_prompts // config.num_shards)
    rows = int(n_prompts * (mean_prompt_tokens + new_tokens))
    if config.max_samples is not None:  # collection stops at the batch that reaches the limit
        per_prompt = mean_prompt_tokens + new_tokens
        rows = min(
            rows,
            int(
                config.max_samples * config.stride
                + config.sample_size
                + config.batch_size * per_prompt
            ),
        )
    n_layers = len(stored_feature_layers(config, base))
    estimate = rows * estimate_bytes_per_row(base.hidden_size, base.hidden_dtype, n_layers)
    parent = config.store_path
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    layers = f"the final state + {n_layers} feature layers" if n_layers else "the final state"
    print(
        f"dmtp collect: {n_prompts} prompts -> up to {rows:,} positions x {layers}, estimated "
        f"store size up to {estimate / 2**30:.2f} GiB ({free / 2**30:.1f} GiB free at {parent})",
        file=sys.stderr,
    )
    if estimate > free:
        raise StoreError(
            f"{parent}: needs up to {estimate / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free; "
            "free space, lower --max_new_tokens/--max_samples, or choose another --output_dir"
        )
    return estimate


# ----------------------------------------------------------------------------------------------
# running the model


def lm_head_argmax(model: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """Greedy tokens `[T]` for hidden states `[T, H]`, a few hundred rows of logits at a time."""
    head = model.get_output_embeddings()
    out = [
        head(hidden_states[i : i + LOGITS_ROWS]).argmax(dim=-1)
        for i in range(0, len(hidden_states), LOGITS_ROWS)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=hidden_states.device)


def pad_left(
    sequences: list[list[int]], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_batch(
    base: BaseModel,
    config: CollectConfig,
    prompts: list[Prompt],
    progress: tqdm | None,
    layers: tuple[int, ...] = (),
) -> list[SequenceRows]:
    """Generate for a batch of chat prompts; return each sequence's rows (prompt + response).

    layers: feature layers to capture besides the final state (`output_hidden_states` numbers).
    """
    from transformers import GenerationConfig

    model, tokenizer = base.model, base.tokenizer
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    input_ids, attention_mask = pad_left(encoded, tokenizer.pad_token_id, base.device)
    width = input_ids.shape[1]
    budget = config.max_new_tokens
    if base.max_positions is not None:
        budget = max(1, min(budget, base.max_positions - width))
    eos = eos_token_ids(base)
    # A fresh GenerationConfig: the model's own defaults (repetition penalty, top_p, ...) would make
    # the stored tokens differ from the model's plain argmax / plain sampling.
    generation = GenerationConfig(
        max_new_tokens=budget,
        do_sample=config.temperature > 0,
        temperature=config.temperature if config.temperature > 0 else None,
        top_k=None,
        top_p=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    with HiddenStateCapture(model, progress, layers) as capture:
        if progress is not None:
            progress.update(int(attention_mask.sum()))
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation
        )
    states = capture.stacked()  # [B, width + new - 1, H]: the last new token is never fed
    layer_states = capture.stacked_layers()  # [B, width + new - 1, n, H] or None
    if states.shape[1] != sequences.shape[1] - 1:
        raise RuntimeError(f"captured {states.shape[1]} positions for {sequences.shape[1]} tokens")

    rows = []
    eos_set = set(eos)
    for b, prompt_ids in enumerate(encoded):
        new = sequences[b, width:].tolist()
        n_new = next((i + 1 for i, t in enumerate(new) if t in eos_set), len(new))
        start, stop = width - len(prompt_ids), width + n_new - 1  # fed positions of this sequence
        hidden = states[b, start:stop]
        fed = sequences[b, start:stop]
        prompt_len = len(prompt_ids)
        tokens = torch.empty_like(fed)
        # Outputs at prompt positions are the model's argmax there; from the last prompt
        # position on, they are the generated tokens themselves.
        tokens[: prompt_len - 1] = lm_head_argmax(model, hidden[: prompt_len - 1])
        tokens[prompt_len - 1 :] = sequences[b, width : width + n_new]
        is_generated = np.zeros(len(fed), dtype=bool)
        is_generated[prompt_len - 1 :] = True
        layer_rows = None if layer_states is None else layer_states[b, start:stop]
        rows.append(_rows(hidden, tokens, fed, prompts[b].index, is_generated, layer_rows))
    return rows


@torch.no_grad()
def answer_rows(base: BaseModel, answer: Finished) -> SequenceRows:
    """The rows of one sequence answered by `RefillGenerator` (prompt + response)."""
    prompt_len = len(answer.prompt_ids)
    hidden = answer.states[:, 0]  # [prompt_len + new tokens - 1, H]
    layer_states = answer.states[:, 1:] if answer.states.shape[1] > 1 else None
    fed = torch.tensor(answer.prompt_ids + answer.new_tokens[:-1], dtype=torch.long)
    tokens = torch.empty_like(fed)
    # Outputs at prompt positions are the model's argmax there; from the last prompt position on,
    # they are the generated tokens themselves.
    tokens[: prompt_len - 1] = lm_head_argmax(base.model, hidden[: prompt_len - 1]).cpu()
    tokens[prompt_len - 1 :] = torch.tensor(answer.new_tokens, dtype=torch.long)
    is_generated = np.zeros(len(fed), dtype=bool)
    is_generated[prompt_len - 1 :] = True
    return _rows(hidden, tokens, fed, answer.item.index, is_generated, layer_states)


# Padded positions per teacher-forced forward. Memory grows with it (every captured layer's states,
# attention scores that also grow with the width), speed hardly at all past a few thousand; a
# longer sequence goes alone.
TEACHER_FORCE_TOKENS = 8192


@torch.no_grad()
def teacher_force_batch(
    base: BaseModel, prompts: list[Prompt], progress: tqdm | None, layers: tuple[int, ...] = ()
) -> list[SequenceRows]:
    """Read a batch of documents or answered chats; outputs are the model's argmax at every position.

    The batch is cut, in order, into forwards of at most TEACHER_FORCE_TOKENS padded positions
    (`collection_order` sorted it by length, so they pad little). In order and from the batch alone:
    a resumed collection forms the same forwards.
    """
    tokenizer = base.tokenizer
    # (ids, the answer's first position or None)
    encoded = [
        encode_answered_chat(p, tokenizer) if p.answered else (encode_prompt(p, tokenizer), None)
        for p in prompts
    ]
    eos = set(eos_token_ids(base))
    rows: list[SequenceRows] = []
    first = 0
    while first < len(prompts):
        stop, width = first + 1, len(encoded[first][0])
        while stop < len(prompts):
            wider = max(width, len(encoded[stop][0]))
            if wider * (stop + 1 - first) > TEACHER_FORCE_TOKENS:
                break
            stop, width = stop + 1, wider
        rows += _teacher_force(
            base, prompts[first:stop], encoded[first:stop], eos, progress, layers
        )
        first = stop
    return rows


def answer_mask(ids: list[int], start: int | None, eos: set[int]) -> np.ndarray:
    """`is_generated` of a teacher-forced sequence `[T]`: True on the rows whose output predicts
    an answer token, as for a generated answer: from the last prompt row (whose output is the
    answer's first token) to the row whose output is the answer's end-of-turn token. What the
    template adds after that token (ChatML's newline) is no answer: generation stops at it."""
    generated = np.zeros(len(ids), dtype=bool)
    if start is not None:
        ends = [i for i in range(start, len(ids)) if ids[i] in eos]
        stop = ends[-1] + 1 if ends else len(ids)
        generated[start - 1 : stop - 1] = True
    return generated


@torch.no_grad()
def _teacher_force(
    base: BaseModel,
    prompts: list[Prompt],
    encoded: list[tuple[list[int], int | None]],
    eos: set[int],
    progress: tqdm | None,
    layers: tuple[int, ...],
) -> list[SequenceRows]:
    """One forward over `encoded` (ids, answer start) of `prompts`; each sequence's rows."""
    model, tokenizer = base.model, base.tokenizer
    input_ids, attention_mask = pad_left(
        [ids for ids, _ in encoded], tokenizer.pad_token_id, base.device
    )
    # Left padding shifts positions unless they are given explicitly (generate does the same).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with HiddenStateCapture(model, layers=layers) as capture:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=1,
        )
    states = capture.stacked()
    layer_states = capture.stacked_layers()
    if progress is not None:
        progress.update(int(attention_mask.sum()))
    rows = []
    width = input_ids.shape[1]
    for b, (ids, start) in enumerate(encoded):
        hidden = states[b, width - len(ids) :]
        tokens = lm_head_argmax(model, hidden)
        rows.append(
            _rows(
                hidden,
                tokens,
                input_ids[b, width - len(ids) :],
                prompts[b].index,
                answer_mask(ids, start, eos),
                None if layer_states is None else layer_states[b, width - len(ids) :],
            )
        )
    return rows


def _rows(
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    input_ids: torch.Tensor,
    sample_id: int,
    is_generated: np.ndarray,
    layer_states: torch.Tensor | None = None,
) -> SequenceRows:
    n = len(input_ids)
    return SequenceRows(
        hidden_states=encode_hidden_states(hidden),
        tokens=tokens.to("cpu", torch.int32).numpy(),
        input_ids=input_ids.to("cpu", torch.int32).numpy(),
        sample_ids=np.full(n, sample_id, dtype=np.int64),
        is_generated=is_generated,
        layer_states=None if layer_states is None else encode_hidden_states(layer_states),
    )


# ----------------------------------------------------------------------------------------------
# shards


def shard_prompts(
    path: Path, num_shards: int, shard_index: int, prompts_per_shard: int | None = None
) -> Iterator[Prompt]:
    """Round-robin: prompt i goes to shard i % num_shards; or, with fixed shards, shard k holds
    prompts [k·N, (k+1)·N) whatever the number of shards (so adding shards changes none)."""
    if prompts_per_shard is not None:
        first = shard_index * prompts_per_shard
        return (p for p in iter_prompts(path) if first <= p.index < first + prompts_per_shard)
    return (p for p in iter_prompts(path) if p.index % num_shards == shard_index)


def collection_order(
    prompts: Iterator[Prompt], tokenizer: Any, batch_size: int
) -> Iterator[Prompt]:
    """The shard's prompts in the order they are collected: each run of RUN_BATCHES batches
    sorted by encoded length (ties by index). A pure function of the prompts, tokenizer and batch
    size, so a resumed collection skips its committed sequences and then forms the very runs and
    batches the interrupted one would have."""
    window = batch_size * RUN_BATCHES
    while run := list(itertools.islice(prompts, window)):
        lengths = {p.index: len(encode_prompt(p, tokenizer)) for p in run}
        yield from sorted(run, key=lambda p: (lengths[p.index], p.index))


def batched(items: Iterator[Prompt], size: int) -> Iterator[list[Prompt]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def collect_shard(
    config: CollectConfig,
    base: BaseModel,
    store: Store,
    shard_index: int,
    generates: bool,
    preemption: StopOnSigterm | None = None,
) -> tuple[int, int]:
    """Fill one shard (resuming its committed rows). Returns (rows, sequences) written in total.

    preemption: raises Preempted between writes on SIGTERM (see `collect`); the shard's finished
    runs are then committed and the run in progress dropped.
    """
    # Without one, nothing is deferred and SIGTERM does what it did before.
    writing = preemption.deferred if preemption is not None else contextlib.nullcontext
    if store.has_shard(shard_index) and store.shard(shard_index).complete:
        shard = store.shard(shard_index)
        print(
            f"dmtp collect: shard {shard_index} already complete ({shard.n_committed:,} rows); skipping",
            file=sys.stderr,
        )
        return shard.n_committed, shard.n_sequences
    with writing():
        writer = ShardWriter(store, shard_index, resume=True)
    done_sequences = writer.n_sequences
    sample_limit = (
        None if config.max_samples is None else math.ceil(config.max_samples / config.num_shards)
    )
    samples = count_samples(writer.sequence_lengths, config.sample_size, config.stride)
    n_prompts = sum(
        1
        for _ in shard_prompts(
            config.prompts_path, config.num_shards, shard_index, config.prompts_per_shard
        )
    )
    ordered = collection_order(
        shard_prompts(
            config.prompts_path, config.num_shards, shard_index, config.prompts_per_shard
        ),
        base.tokenizer,
        config.batch_size,
    )
    remaining = itertools.islice(ordered, done_sequences, None)
    if done_sequences:
        print(
            f"dmtp collect: shard {shard_index}: resuming after {done_sequences} committed sequences "
            f"({writer.total_rows:,} rows)",
            file=sys.stderr,
        )
    torch.manual_seed(config.seed + shard_index)
    started, rows_at_start = time.perf_counter(), writer.total_rows
    # Always shown: in a terminal it redraws; in a log file (a Prefect worker) a line every 30 s.
    interactive = sys.stderr.isatty()
    progress = tqdm(
        desc=f"collect shard {shard_index}",
        unit="tok",
        unit_scale=True,
        file=sys.stderr,
        dynamic_ncols=interactive,
        mininterval=0.5 if interactive else 30,
    )

    def limit_reached() -> bool:
        return sample_limit is not None and samples >= sample_limit

    def show_progress() -> None:
        seconds = time.perf_counter() - started
        done = writer.n_sequences
        rate = (writer.total_rows - rows_at_start) / max(seconds, 1e-9)
        # Total = rows so far + remaining prompts at the mean rows per prompt so far: a real ETA.
        mean_rows = writer.total_rows / max(done, 1)
        progress.total = int(writer.total_rows + max(n_prompts - done, 0) * mean_rows)
        progress.set_postfix_str(f"{min(done, n_prompts)}/{n_prompts} prompts, {rate:,.0f} rows/s")

    try:
        if generates and refill_supported(base.model):
            generator = RefillGenerator(
                base.model,
                batch_size=config.batch_size,
                max_new_tokens=config.max_new_tokens,
                eos_token_ids=eos_token_ids(base),
                pad_token_id=base.tokenizer.pad_token_id,
                temperature=config.temperature,
                max_positions=base.max_positions,
                layers=store.stored_layers,
                progress=progress,
            )
            for run in batched(remaining, config.batch_size * RUN_BATCHES):
                if limit_reached():
                    break
                # Sampling (--temperature > 0) is seeded per run, from its first prompt: a resumed
                # collection then draws exactly what the interrupted one would have.
                torch.manual_seed(config.seed * 1_000_003 + run[0].index)
                prompts = [(p, encode_prompt(p, base.tokenizer)) for p in run]
                # The model's work is abandoned on SIGTERM; writes finish first (`writing`).
                for answer in generator.run(prompts, stop_admitting=limit_reached):
                    rows = answer_rows(base, answer)
                    with writing():
                        writer.append(rows)
                    samples += count_samples([len(rows)], config.sample_size, config.stride)
                    show_progress()
                # Only here: a resumed collection re-forms runs from the prompts after the
                # committed ones, and within a run answers are stored in the order they ended.
                with writing():
                    writer.mark_resume_point()
        else:
            for batch in batched(remaining, config.batch_size):
                if limit_reached():
                    break
                if generates:  # a cache RefillGenerator cannot edit: plain batched generate
                    sequences = generate_batch(base, config, batch, progress, store.stored_layers)
                else:
                    sequences = teacher_force_batch(base, batch, progress, store.stored_layers)
                with writing():
                    for rows in sequences:
                        writer.append(rows)
                    writer.mark_resume_point()
                samples += count_samples(
                    [len(r) for r in sequences], config.sample_size, config.stride
                )
                show_progress()
    except Preempted:
        writer.stop_at_resume_point()
        raise
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    with writing():
        writer.finish(
            {
                "n_samples": samples,
                "seconds": round(seconds, 3),
                "rows_per_second": round(
                    (writer.total_rows - rows_at_start) / max(seconds, 1e-9), 1
                ),
                "prompts_file": Path(config.prompts_path).name,
            }
        )
    return writer.total_rows, writer.n_sequences


def collect(config: CollectConfig) -> CollectResult:
    """Run a whole collection (all shards, or `config.shard_index`) and return its manifest.

    Raises LeaseHeld when another live process writes one of the shards, Preempted on SIGTERM
    (in the main thread), DiskFull when the disk fills; the store stays resumable after each.
    """
    shards = (
        [config.shard_index] if config.shard_index is not None else list(range(config.num_shards))
    )
    stopped = (
        f"SIGTERM: stopped collecting into {config.store_path}; rerun with --resume to continue"
    )
    # The SIGTERM handler goes before the leases do: a SIGTERM once the store is written has
    # nothing left to stop (and a lease whose holder died is taken over at once).
    with contextlib.ExitStack() as leases, StopOnSigterm(stopped) as preemption:
        # Taken before the model loads: a second writer learns at once, not minutes later.
        for k in shards:
            what = f"shard {k} of {config.store_path}"
            leases.enter_context(held(shard_lease_path(config.store_path, k), what))
        return _collect(config, shards, preemption)


def disk_full_message(config: CollectConfig, error: DiskFull, estimate: int) -> str:
    """`error` and how much more space the store needs, measured against what it holds now."""
    path = config.store_path
    written = directory_bytes(path) if path.exists() else 0
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    return (
        f"{error}: the store needs up to {_size(max(estimate - written, 0))} more (it holds "
        f"{_size(written)} of up to {_size(estimate)}), {_size(free)} is free there; free space "
        "or choose another --output_dir, then rerun with --resume"
    )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def preempted_message(store: Store, shard_index: int) -> str:
    """What a SIGTERM left of shard `shard_index`, read back from the store."""
    if not store.has_shard(shard_index):
        return f"SIGTERM: stopped before shard {shard_index} of {store.path} was started; rerun with --resume"
    shard = open_store(store.path).shard(shard_index)
    return (
        f"SIGTERM: stopped shard {shard_index} of {store.path} with {shard.n_committed:,} rows "
        f"({shard.n_sequences} sequences) committed, the run of batches in progress dropped; "
        "rerun with --resume to continue"
    )


def _collect(config: CollectConfig, shards: list[int], preemption: StopOnSigterm) -> CollectResult:
    started = time.perf_counter()
    prompts = scan_prompts(config.prompts_path)
    per_shard = config.prompts_per_shard
    if per_shard is not None and (config.num_shards - 1) * per_shard >= prompts.count:
        raise InputDataError(
            f"--num_shards {config.num_shards} x --prompts_per_shard {per_shard} goes past the "
            f"{prompts.count} prompts of {config.prompts_path}: at most "
            f"{-(-prompts.count // per_shard)} shards"
        )
    device = resolve_device(config.device)
    base = load_base_model(config.base_model_path, device, collection_dtype(config.dtype, device))
    n_prompts, mean_prompt_tokens = check_prompt_lengths(config.prompts_path, base)
    estimate = check_disk_space(config, base, n_prompts, mean_prompt_tokens, prompts.generates)
    rows = sequences = 0
    try:
        with preemption.deferred():
            store = prepare_store(config, base, prompts)
        for shard_index in shards:
            try:
                shard_rows, shard_sequences = collect_shard(
                    config, base, store, shard_index, prompts.generates, preemption
                )
            except Preempted:
                raise Preempted(preempted_message(store, shard_index)) from None
            rows, sequences = rows + shard_rows, sequences + shard_sequences
    except DiskFull as error:
        raise DiskFull(disk_full_message(config, error, estimate)) from None
    except OSError as error:
        # The store's root and metadata, which zarr writes outside any ShardWriter.
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = DiskFull(f"{config.store_path}: {error.strerror}")
        raise DiskFull(disk_full_message(config, where, estimate)) from None
    seconds = time.perf_counter() - started
    store = open_store(store.path)
    return CollectResult(
        store_path=str(store.path),
        shards=shards,
        rows=rows,
        sequences=sequences,
        complete=store.complete,
        seconds=round(seconds, 3),
        tokens_per_second=round(rows / max(seconds, 1e-9), 1),
    )


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, CollectConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(CollectConfig, args)
    result = collect(config)
    state = (
        "complete" if result.complete else "shard(s) done; store incomplete until every shard is"
    )
    print(
        f"dmtp collect: {result.rows:,} rows from {result.sequences} sequences in {result.seconds:.1f} s "
        f"-> {result.store_path} ({state})"
    )
    return 0


if __name__ == "__main__":
    from dmtp.cli import run_command

    sys.exit(run_command("collect", sys.argv[1:]))
