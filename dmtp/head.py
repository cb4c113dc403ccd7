"""The block-diffusion draft head (DESIGN §4): DFlash's drafter, tensor for tensor.

Given the base model's states at the positions up to `l` (from a few chosen layers) and the bonus
token `t_l`, it fills the block `[t_l, MASK, …, MASK]` of `L` positions in one forward:

    context = hidden_norm(fc(concat of the feature layers' states))   [B, S, H]   positions ≤ l
    block   = base_embedding(block_ids)                               [B, L, H]   positions l+1 …
    layer   : queries from the block; keys and values = [k/v_proj(context); k/v_proj(block)]
              (the context enters every layer as extra keys/values, never as queries; the block
              attends to itself bidirectionally and to the context causally)
    states  = norm(layers(block))                                     [B, L, H]
    logits  = base_lm_head(states)                                    [B, L, V]

The head owns no copy of the base model's token embedding or LM head: they are attached at run
time (`attach_base`), so a head folder and every checkpoint hold only trained tensors. Its tensor
names and shapes are `dflash.model.DFlashDraftModel`'s (`fc`, `hidden_norm`, `layers.i.self_attn.
{q,k,v,o}_proj`, `q_norm`, `k_norm`, `mlp`, `norm`), its layers are Qwen3-style whatever the base
architecture, so an export to DFlash's layout needs no retraining.

The seed's head is the special case `feature_layers = [num_hidden_layers]` (the final state `h_l`),
`context_window = 1`.

Training packs many blocks per sequence into one forward (`anchors`): the context is computed once
for the whole sequence and each block sees only the context rows at or before its anchor, as
SpecForge's DFlash trainer does. Decoding keeps the context's keys and values in a `DraftCache`,
appended with the accepted positions' features only (DESIGN §5).

    head = load_head("heads/final"); head.attach_base(embeddings, lm_head)
    states = head(in_hidden_states=features, input_ids=block).hidden_states   # [B, A, L, H]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from dmtp.errors import DmtpError, ModelLoadError

HEAD_MODEL_TYPE = "dmtp_mtp_head"
HIDDEN_STATE_DEFINITION = "hidden_states[-1] (last layer, after the final norm)"


def scratch_decoder_config(hidden_size: int) -> dict[str, Any]:
    """A layer shape for a head trained without a base model (the guide's §3.2)."""
    head_dim = next(d for d in (128, 64, 32, 16, 8, hidden_size) if hidden_size % d == 0)
    return {
        "model_type": "qwen3",
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_attention_heads": hidden_size // head_dim,
        "num_key_value_heads": hidden_size // head_dim,
        "head_dim": head_dim,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
    }


# What the head keeps of a base model's config: the layer's shape, not its depth, vocabulary or
# generation settings (which would make two heads of the same base look different).
_LAYER_KEYS = {
    "model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
    "max_position_embeddings", "initializer_range",
}  # fmt: skip


class MTPHeadConfig(PreTrainedConfig):
    """The head's shape, what it conditions on, and the base model it belongs to.

    `feature_layers` are indices into the base model's `output_hidden_states` (0 = embeddings,
    `num_target_layers` = the final state after the final norm); `context_window` is how many
    positions up to the anchor a block sees (None: all earlier positions of the sequence).
    `vocab_size` is the base model's; `mask_token_id` is one of its token ids (its embedding is the
    base model's row, as in DFlash). `decoder_config` is the base architecture's layer shape.
    """

    model_type = HEAD_MODEL_TYPE

    hidden_size: int = 576
    vocab_size: int = 49152
    num_hidden_layers: int = 1
    block_length: int = 4
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    feature_layers: list | None = None
    context_window: int | None = None
    num_target_layers: int | None = None
    decoder_config: dict | None = None
    base_model: dict | None = None
    hidden_state_definition: str = HIDDEN_STATE_DEFINITION
    initializer_range: float = 0.02
    # No base model to borrow from (a store that names none, the guide's §3.2): the head trains
    # its own embedding and LM head and saves them. Such a head has no DFlash export.
    owns_vocabulary: bool = False
    # Token ids the head may draft (EAGLE-3's draft vocabulary): the base model's most frequent
    # outputs. The LM head is evaluated on these rows only, several times cheaper to train and to
    # draft with; None drafts from the whole vocabulary (as DFlash does).
    draft_vocab: list | None = None

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        if self.decoder_config is None:
            self.decoder_config = scratch_decoder_config(self.hidden_size)
        self.decoder_config = {
            k: v for k, v in dict(self.decoder_config).items() if k in _LAYER_KEYS
        }
        if self.feature_layers is None:
            self.feature_layers = [self.num_target_layers or 0]
        self.feature_layers = [int(i) for i in self.feature_layers]
        if self.block_length < 1:
            raise DmtpError(f"block_length must be >= 1, got {self.block_length}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DmtpError(
                f"mask_token_id {self.mask_token_id} is outside the base vocabulary "
                f"[0, {self.vocab_size}): pick one of its token ids"
            )
        if self.context_window is not None and self.context_window < 1:
            raise DmtpError(f"context_window must be >= 1 or None, got {self.context_window}")
        if not self.feature_layers or len(set(self.feature_layers)) != len(self.feature_layers):
            raise DmtpError(
                f"feature_layers must be distinct layer indices, got {self.feature_layers}"
            )
        if int(self.decoder_config.get("hidden_size", self.hidden_size)) != self.hidden_size:
            raise DmtpError(
                f"hidden_size {self.hidden_size} != the base architecture's {self.decoder_config['hidden_size']}"
            )
        super().__post_init__(**kwargs)

    @property
    def dflash_target_layer_ids(self) -> list[int]:
        """DFlash numbers a layer by its decoder index (`hidden_states[i + 1]`)."""
        return [i - 1 for i in self.feature_layers]


def layer_config(config: MTPHeadConfig) -> Any:
    """The Qwen3 config of the draft layers: the base model's layer shape at the head's depth."""
    from transformers import Qwen3Config

    values = {k: v for k, v in config.decoder_config.items() if k != "model_type"}
    rope = values.pop("rope_parameters", None) or {}
    rope_theta = values.pop("rope_theta", None) or rope.get("rope_theta", 10000.0)
    values.pop("rope_scaling", None)
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    return Qwen3Config(
        **values,
        num_hidden_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        rope_theta=float(rope_theta),
        attention_bias=False,
        use_cache=False,
        pad_token_id=None,
    )


# ----------------------------------------------------------------------------------------------
# the draft-side KV cache


class DraftCache:
    """Per layer, the keys and values of the context positions seen so far: `[1, kv_heads, T, d]`.

    A forward appends the new context and the block; `crop(n)` keeps the first `n` positions (the
    block's entries and rejected positions go), as `dflash_generate` crops its DynamicCache.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[-2])

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def crop(self, length: int) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k[..., :length, :], v[..., :length, :]


# ----------------------------------------------------------------------------------------------
# the model


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, d]; cos, sin: [B, T, d]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class DraftAttention(nn.Module):
    """Queries from the block; keys and values from the context and the block (DFlash's attention)."""

    def __init__(self, config: Any, layer_index: int):
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

        super().__init__()
        self.layer_index = layer_index
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        block: torch.Tensor,
        context: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: DraftCache | None,
    ) -> torch.Tensor:
        """block [B, Q, H], context [B, S, H] -> [B, Q, H]; rotary cos/sin [B, S + Q, d]; mask [B, 1, Q, K]."""
        batch, queries = block.shape[:2]
        q = self.q_norm(self.q_proj(block).view(batch, queries, -1, self.head_dim)).transpose(1, 2)
        both = torch.cat([context, block], dim=1)
        k = self.k_norm(self.k_proj(both).view(batch, both.shape[1], -1, self.head_dim))
        v = self.v_proj(both).view(batch, both.shape[1], -1, self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rotary
        q, k = _rope(q, cos[:, -queries:], sin[:, -queries:]), _rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, queries, -1))


class DraftLayer(nn.Module):
    """Pre-norm transformer layer around `DraftAttention` (DFlash's `Qwen3DFlashDecoderLayer`)."""

    def __init__(self, config: Any, layer_index: int):
        from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

        super().__init__()
        self.self_attn = DraftAttention(config, layer_index)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, block, context, rotary, mask, cache):
        block = block + self.self_attn(self.input_layernorm(block), context, rotary, mask, cache)
        return block + self.mlp(self.post_attention_layernorm(block))


@dataclass
class MTPHeadOutput(ModelOutput):
    """`hidden_states: [B, A, L, H]` (after the final norm); `logits: [B, L, V]` for one block per row."""

    hidden_states: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class MTPHeadModel(PreTrainedModel):
    """DFlash-style block drafter conditioned on the base model's feature layers (module docstring)."""

    config_class = MTPHeadConfig
    base_model_prefix = "head"
    main_input_name = "in_hidden_states"
    _supports_sdpa = True

    def __init__(self, config: MTPHeadConfig):
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding

        super().__init__(config)
        draft = layer_config(config)
        hidden = config.hidden_size
        self.fc = nn.Linear(len(config.feature_layers) * hidden, hidden, bias=False)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=draft.rms_norm_eps)
        self.layers = nn.ModuleList([DraftLayer(draft, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(hidden, eps=draft.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(draft)
        if config.owns_vocabulary:
            self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
            self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.post_init()

    # -- the base model's embedding and LM head, borrowed (never saved) ---------------------------

    def attach_base(self, embeddings: torch.Tensor, lm_head: torch.Tensor) -> None:
        """Borrow the base model's `[V, H]` token embedding and LM head (no copy, not a parameter)."""
        if embeddings.shape[-1] != self.config.hidden_size or lm_head.shape != embeddings.shape:
            raise DmtpError(
                f"base embedding {tuple(embeddings.shape)} / LM head {tuple(lm_head.shape)} do not "
                f"fit a head of hidden size {self.config.hidden_size}"
            )
        # Plain attributes: nn.Module would register them and save them with the head.
        self.__dict__["_base"] = (embeddings.detach(), lm_head.detach())

    def _base_weights(
        self, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.owns_vocabulary:
            return self.embed_tokens.weight, self.lm_head.weight
        base = self.__dict__.get("_base")
        if base is None:
            raise DmtpError("the head has no base embedding/LM head: call attach_base(...) first")
        if base[0].device != device or base[0].dtype != dtype:
            base = tuple(t.to(device=device, dtype=dtype) for t in base)
            self.__dict__["_base"] = base
            self.__dict__.pop("_draft_rows", None)
        return base

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self._base_weights(self.fc.weight.device, self.fc.weight.dtype)[0]
        return F.embedding(ids, weight)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V] through the base model's LM head (all rows, DFlash's drafting)."""
        weight = self._base_weights(hidden_states.device, hidden_states.dtype)[1]
        return F.linear(hidden_states, weight)

    def draft_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V_draft]: logits over the draft vocabulary (all tokens when it is None).
        Index i is token `draft_token_ids()[i]`."""
        return F.linear(hidden_states, self.draft_weight(hidden_states.device, hidden_states.dtype))

    def draft_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`[V_draft, H]` the LM head's rows of the draft vocabulary (all rows when it is None)."""
        weight = self._base_weights(device, dtype)[1]
        ids = self.draft_token_ids(device)
        if ids is None:
            return weight
        cached = self.__dict__.get("_draft_rows")
        if cached is None or cached.device != weight.device or cached.dtype != weight.dtype:
            cached = weight.index_select(0, ids)
            self.__dict__["_draft_rows"] = cached
        return cached

    def draft_token_ids(self, device: torch.device | None = None) -> torch.Tensor | None:
        if self.config.draft_vocab is None:
            return None
        ids = self.__dict__.get("_draft_ids")
        if ids is None or ids.device != torch.device(device or "cpu"):
            ids = torch.tensor(self.config.draft_vocab, dtype=torch.long, device=device)
            self.__dict__["_draft_ids"] = ids
        return ids

    def to_draft_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Token ids -> draft-vocabulary indices; -100 where the token is outside it (or -100)."""
        ids = self.draft_token_ids(labels.device)
        if ids is None:
            return labels
        table = torch.full((self.config.vocab_size,), -100, dtype=torch.long, device=labels.device)
        table[ids] = torch.arange(len(ids), device=labels.device)
        return torch.where(labels >= 0, table[labels.clamp(min=0)], labels)

    # -- forward ---------------------------------------------------------------------------------

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, S, F·H] (or [B, S, F, H]) -> context [B, S, H]."""
        if features.dim() == 4:
            features = features.flatten(2)
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def forward(
        self,
        in_hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        anchors: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        with_logits: bool | None = None,
        **kwargs: Any,
    ) -> MTPHeadOutput:
        """Denoise blocks anchored in a sequence's context.

        in_hidden_states: context features `[B, S, F, H]`, `[B, S, F·H]`, or `[B, F·H]` (one
        position, the seed's case). input_ids: block tokens (or `mask_token_id`) `[B, A, L]`, or
        `[B, L]` for one block. anchors `[B, A]`: the context row each block follows (the block's
        first position is `anchor + 1`; -1 marks padding); default: the last row. attention_mask
        `[B, (A,) L]`: block positions that exist; context_mask `[B, S]`: rows that exist.
        With `with_logits` (default: for a single block), also returns `logits [B, L, V]`.
        """
        features = in_hidden_states
        if features.dim() == 2:
            features = features[:, None]
        single = input_ids.dim() == 2
        blocks = input_ids[:, None] if single else input_ids
        batch, n_blocks, length = blocks.shape
        context = self.project_context(features)
        rows = context.shape[1]
        device = context.device
        if anchors is None:
            anchors = torch.full((batch, n_blocks), rows - 1, dtype=torch.long, device=device)
        block_positions = anchors[:, :, None] + 1 + torch.arange(length, device=device)
        positions = torch.cat(
            [torch.arange(rows, device=device).expand(batch, -1), block_positions.flatten(1)], dim=1
        )
        mask = self._training_mask(anchors, length, rows, attention_mask, context_mask)
        hidden = self.embed(blocks.clamp(min=0)).flatten(1, 2)
        hidden = self._layers(hidden, context, positions, mask, cache=None)
        states = self.norm(hidden).view(batch, n_blocks, length, -1)
        logits = None
        if with_logits if with_logits is not None else single:
            logits = self.compute_logits(states[:, 0] if single else states)
        return MTPHeadOutput(hidden_states=states, logits=logits)

    def _layers(self, hidden, context, positions, mask, cache):
        rotary = self.rotary_emb(hidden, positions)
        for layer in self.layers:
            hidden = layer(hidden, context, rotary, mask, cache)
        return hidden

    def _training_mask(
        self,
        anchors: torch.Tensor,
        length: int,
        rows: int,
        attention_mask: torch.Tensor | None,
        context_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """[B, 1, A·L, S + A·L] bool: a block sees the context rows (anchor - C, anchor] and itself."""
        batch, n_blocks = anchors.shape
        device = anchors.device
        row = torch.arange(rows, device=device)
        anchor = anchors[:, :, None]  # [B, A, 1]
        sees_context = row <= anchor
        if self.config.context_window is not None:
            sees_context &= row > anchor - self.config.context_window
        if context_mask is not None:
            sees_context &= context_mask[:, None, :].bool()
        total = n_blocks * length
        block_of = torch.arange(n_blocks, device=device).repeat_interleave(length)
        sees_block = (block_of[:, None] == block_of[None, :])[None].expand(batch, -1, -1)
        if attention_mask is not None:
            exists = attention_mask.reshape(batch, 1, total).bool()
            # A missing position is seen by nobody but itself (no query row is all False).
            own = torch.eye(total, dtype=torch.bool, device=device)
            sees_block = (sees_block & exists) | own
        sees_context = sees_context.repeat_interleave(length, dim=1)
        return torch.cat([sees_context, sees_block], dim=2)[:, None]

    @torch.no_grad()
    def draft_step(
        self,
        new_features: torch.Tensor,
        block_ids: torch.Tensor,
        start: int,
        cache: DraftCache,
    ) -> torch.Tensor:
        """One decoding forward with the draft-side cache -> block states `[L, H]` (normed).

        `new_features [n, F·H]` are the features of positions `start - n … start - 1` (the newly
        accepted ones); the cache holds the context before them. `block_ids [L]` sit at positions
        `start …`. Afterwards the cache holds exactly the context up to `start - 1`.
        """
        device = self.fc.weight.device
        context = self.project_context(new_features.to(device)[None])
        n, length = context.shape[1], block_ids.shape[0]
        if len(cache) != start - n:
            raise DmtpError(f"draft cache holds {len(cache)} positions, expected {start - n}")
        positions = torch.arange(start - n, start + length, device=device)[None]
        mask = None
        if self.config.context_window is not None and start > self.config.context_window:
            keys = torch.arange(start + length, device=device)
            visible = (keys >= start - self.config.context_window)[None, None, None, :]
            mask = visible.expand(1, 1, length, -1)
        hidden = self.embed(block_ids.to(device)[None])
        hidden = self._layers(hidden, context, positions, mask, cache)
        cache.crop(start)
        return self.norm(hidden)[0]

    # -- initialisation --------------------------------------------------------------------------

    def init_from_base(
        self, base_layers: Sequence[dict[str, torch.Tensor]], final_norm: torch.Tensor | None
    ) -> None:
        """Start the draft layers as copies of base decoder layers (Llama/Qwen-style tensor names).

        Biases of the base projections are dropped (DFlash's layers have none); q_norm/k_norm stay
        at 1. `final_norm` initialises `norm`, which feeds the base LM head as the base model's does.
        """
        with torch.no_grad():
            for layer, weights in zip(self.layers, base_layers, strict=False):
                own = layer.state_dict()
                for name, tensor in weights.items():
                    if name in own and own[name].shape == tensor.shape:
                        own[name].copy_(tensor)
            if final_norm is not None:
                self.norm.weight.copy_(final_norm)


# ----------------------------------------------------------------------------------------------
# the base model's pieces the head needs


@dataclass
class BaseModelParts:
    """What the head takes from a base model: its layer config, identity, depth and weights."""

    decoder_config: dict[str, Any]
    identity: dict[str, Any]
    vocab_size: int
    num_hidden_layers: int
    pad_token_id: int | None
    embeddings: torch.Tensor  # [V_base, H]
    lm_head: torch.Tensor  # [V_base, H]
    layers: list[dict[str, torch.Tensor]]  # decoder layer i's tensors, names relative to the layer
    final_norm: torch.Tensor | None


def _weight_map(folder: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        return json.loads(index_file.read_text())["weight_map"]
    if (folder / "model.safetensors").exists():
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            return {key: "model.safetensors" for key in handle.keys()}  # noqa: SIM118
    return None


def _read_base_tensors(folder: Path, tied: bool, layers: Sequence[int]) -> dict[str, Any] | None:
    """Read only the embedding, LM head, final norm and chosen layers (a 7B model is not loaded whole)."""
    from safetensors import safe_open

    weight_map = _weight_map(folder)
    if weight_map is None:
        return None
    embed_keys = sorted((k for k in weight_map if k.endswith("embed_tokens.weight")), key=len)
    head_key = (
        "lm_head.weight"
        if "lm_head.weight" in weight_map
        else (embed_keys[0] if tied and embed_keys else None)
    )
    if not embed_keys or head_key is None:
        return None
    prefix = embed_keys[0].removesuffix("embed_tokens.weight")

    def read(key: str) -> torch.Tensor:
        with safe_open(folder / weight_map[key], framework="pt") as handle:
            return handle.get_tensor(key)

    layer_tensors = []
    for i in layers:
        start = f"{prefix}layers.{i}."
        layer_tensors.append(
            {k.removeprefix(start): read(k) for k in weight_map if k.startswith(start)}
        )
    norm_key = f"{prefix}norm.weight"
    return {
        "embeddings": read(embed_keys[0]),
        "lm_head": read(head_key),
        "layers": layer_tensors,
        "final_norm": read(norm_key) if norm_key in weight_map else None,
    }


def load_base_model_parts(
    path: str | None, dtype: torch.dtype = torch.float32, layers: Sequence[int] = ()
) -> BaseModelParts:
    """The base model's layer config, identity, embedding, LM head, final norm and decoder `layers`."""
    from transformers import AutoConfig

    from dmtp.models import DEFAULT_MODEL, model_fingerprint, resolve_base_model

    resolved = resolve_base_model(path)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot read the base model's config at {resolved}: {error}"
        ) from error
    config = config.get_text_config()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = _read_base_tensors(Path(resolved), tied, layers) if Path(resolved).is_dir() else None
    if tensors is None:  # not a plain safetensors folder: let transformers load the whole model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
        decoder = model.get_decoder()
        tensors = {
            "embeddings": model.get_input_embeddings().weight.detach(),
            "lm_head": model.get_output_embeddings().weight.detach(),
            "layers": [dict(decoder.layers[i].state_dict()) for i in layers],
            "final_norm": decoder.norm.weight.detach() if hasattr(decoder, "norm") else None,
        }
    identity = {
        "name_or_path": path or DEFAULT_MODEL.name,
        "fingerprint": model_fingerprint(resolved),
        "architecture": (config.architectures or [config.model_type])[0],
        "hidden_state": HIDDEN_STATE_DEFINITION,
    }
    as_dtype = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return BaseModelParts(
        decoder_config={"model_type": config.model_type, **config.to_dict()},
        identity=identity,
        vocab_size=int(tensors["embeddings"].shape[0]),
        num_hidden_layers=int(config.num_hidden_layers),
        pad_token_id=getattr(config, "pad_token_id", None),
        embeddings=as_dtype(tensors["embeddings"]),
        lm_head=as_dtype(tensors["lm_head"]),
        layers=[{k: as_dtype(v) for k, v in layer.items()} for layer in tensors["layers"]],
        final_norm=as_dtype(tensors["final_norm"]),
    )


def base_layers_for_init(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The base decoder layers a draft starts from: the last `num_draft_layers` (they map states
    to next-token predictions, which is what a drafter does)."""
    return list(range(max(0, num_target_layers - num_draft_layers), num_target_layers))


def build_head(
    *,
    hidden_size: int,
    vocab_size: int,
    mask_token_id: int,
    block_length: int,
    feature_layers: Sequence[int],
    num_target_layers: int,
    context_window: int | None = None,
    num_hidden_layers: int = 1,
    pad_token_id: int | None = None,
    base: BaseModelParts | None = None,
    base_model_identity: dict[str, Any] | None = None,
    init_from_base: bool = False,
    draft_vocab: Sequence[int] | None = None,
    seed: int = 0,
) -> MTPHeadModel:
    """A new head; with `base`, its layer shape is the base model's and its embedding/LM head are
    attached; `init_from_base` copies base decoder layers (`base.layers`) into the draft layers."""
    if base is not None and base.embeddings.shape[1] != hidden_size:
        raise DmtpError(
            f"the base model's hidden size is {base.embeddings.shape[1]}, the head's {hidden_size}: "
            "the store and --base_model_path must come from the same model"
        )
    config = MTPHeadConfig(
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        num_hidden_layers=num_hidden_layers,
        block_length=block_length,
        mask_token_id=mask_token_id,
        pad_token_id=pad_token_id
        if pad_token_id is not None
        else (base.pad_token_id if base else None),
        owns_vocabulary=base is None,
        draft_vocab=None if draft_vocab is None else [int(i) for i in draft_vocab],
        feature_layers=list(feature_layers),
        context_window=context_window,
        num_target_layers=num_target_layers,
        decoder_config=base.decoder_config if base else None,
        base_model=base.identity if base else base_model_identity,
        initializer_range=float(
            (base.decoder_config if base else {}).get("initializer_range", 0.02)
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initial head on every rank and every rerun
        head = MTPHeadModel(config)
    if base is not None:
        head.attach_base(base.embeddings, base.lm_head)
        head.init_from_base(base.layers if init_from_base else [], base.final_norm)
    return head


def load_head(path: str | Path) -> MTPHeadModel:
    """`MTPHeadModel.from_pretrained` with a one-line error for a folder that is not a head."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path}: not a head folder (no config.json)")
    values = json.loads(config_file.read_text())
    if values.get("model_type") != HEAD_MODEL_TYPE:
        raise ModelLoadError(
            f"{path} holds a {values.get('model_type')!r} model, not a dmtp head; pass a base model as --base_model_path"
        )
    if "feature_layers" not in values:
        raise ModelLoadError(
            f"{path}: a head of the earlier layout (its own embedding and LM head, no feature "
            "layers); retrain it with this version of dmtp"
        )
    return MTPHeadModel.from_pretrained(path, dtype=torch.float32)
