"""The diffusion MTP head (DESIGN §4): from the base model's last hidden state `h_l`, denoise a block
of `L` tokens `t_l … t_{l+L-1}` in one bidirectional pass.

    prefix  = condition_proj(h_l)                         [B, 1, H]   h_l enters as position 0
    block   = embed(x_t) (mask_embedding where masked)    [B, L, H]
    states  = decoder layers of the base architecture over [prefix, block], NON-causal
    logits  = lm_head(norm(states[:, 1:]))                [B, L, V]   the mask token is never drafted

The decoder layers are the base model's own class (e.g. `Qwen2DecoderLayer`, `LlamaDecoderLayer`)
built from its config, so the head matches the base model's attention, MLP, norm and RoPE. Token
embedding and LM head start as copies of the base model's; `h_l` is the value transformers returns
as `hidden_states[-1]`, already through the base model's final norm, which is exactly what the base
LM head reads, so a copied, frozen LM head is a good start.

A head folder (`save_pretrained`) is self-describing: `config.json` names the base model (path,
fingerprint, architecture, hidden-state definition), the block length and the mask token; weights
are `model.safetensors`.

    head = MTPHeadModel.from_pretrained("heads/final")
    logits = head(in_hidden_states=h, input_ids=x, attention_mask=m).logits   # [B, L, V]
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from dmtp.errors import DmtpError, ModelLoadError

HEAD_MODEL_TYPE = "dmtp_mtp_head"
HIDDEN_STATE_DEFINITION = "hidden_states[-1] (last layer, after the final norm)"


def scratch_decoder_config(hidden_size: int) -> dict[str, Any]:
    """A Qwen2-style layer config for a head trained without a base model (the guide's §3.2)."""
    head_dim = next(d for d in (128, 64, 32, 16, 8, hidden_size) if hidden_size % d == 0)
    return {
        "model_type": "qwen2",
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_attention_heads": hidden_size // head_dim,
        "num_key_value_heads": hidden_size // head_dim,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
    }


class MTPHeadConfig(PreTrainedConfig):
    """The head's shape and the base model it belongs to.

    `vocab_size` counts the head's rows, usually the base vocabulary plus one row for
    `mask_token_id` (default: the last row). `decoder_config` is the base architecture's config
    (`model_type` and dimensions); the head's `num_hidden_layers` layers are built from it.
    `base_model` is the identity recorded by `dmtp collect`: name_or_path, fingerprint,
    architecture and hidden_state (which hidden state `h_l` is).
    """

    model_type = HEAD_MODEL_TYPE

    hidden_size: int = 576
    vocab_size: int = 49153
    num_hidden_layers: int = 1
    block_length: int = 4
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    base_vocab_size: int | None = None
    decoder_config: dict | None = None
    base_model: dict | None = None
    hidden_state_definition: str = HIDDEN_STATE_DEFINITION
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        if self.decoder_config is None:
            self.decoder_config = scratch_decoder_config(self.hidden_size)
        self.decoder_config = {
            k: v for k, v in dict(self.decoder_config).items() if k in _LAYER_KEYS
        }
        if self.block_length < 1:
            raise DmtpError(f"block_length must be >= 1, got {self.block_length}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DmtpError(
                f"mask_token_id {self.mask_token_id} is outside the head's vocabulary [0, {self.vocab_size}): "
                "raise --vocab_size or pick another --mask_token_id"
            )
        if int(self.decoder_config.get("hidden_size", self.hidden_size)) != self.hidden_size:
            raise DmtpError(
                f"hidden_size {self.hidden_size} != the base architecture's {self.decoder_config['hidden_size']}"
            )
        super().__post_init__(**kwargs)


# What the head keeps of a base model's config: the layer's shape, not its depth, vocabulary or
# generation settings (which would make two heads of the same base look different).
_LAYER_KEYS = {
    "model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
    "attention_bias", "attention_dropout", "mlp_bias", "max_position_embeddings",
    "initializer_range", "qkv_bias", "use_qk_norm",
}  # fmt: skip


def build_decoder_config(config: MTPHeadConfig) -> PreTrainedConfig:
    """The base architecture's config at the head's depth, with SDPA attention."""
    from transformers import AutoConfig

    values = dict(config.decoder_config)
    model_type = values.pop("model_type")
    try:
        decoder_config = AutoConfig.for_model(
            model_type,
            **values,
            num_hidden_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            use_cache=False,
            pad_token_id=None,
        )
    except ValueError as error:
        raise ModelLoadError(
            f"base architecture {model_type!r} is unknown to transformers: {error}"
        ) from error
    decoder_config._attn_implementation = "sdpa"
    return decoder_config


def architecture_classes(decoder_config: PreTrainedConfig) -> tuple[type, type, type]:
    """(DecoderLayer, RMSNorm, RotaryEmbedding) classes of the base architecture, e.g. Qwen2's."""
    from transformers import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(decoder_config)]
    except KeyError as error:
        raise ModelLoadError(
            f"no transformers model for {type(decoder_config).__name__}"
        ) from error
    module = importlib.import_module(model_class.__module__)
    prefix = model_class.__name__.removesuffix("Model")
    names = (f"{prefix}DecoderLayer", f"{prefix}RMSNorm", f"{prefix}RotaryEmbedding")
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise ModelLoadError(
            f"architecture {decoder_config.model_type!r} lacks {', '.join(missing)}; the head supports "
            "Llama-style decoders (Llama, Qwen2/3, Mistral, ...)"
        )
    return tuple(getattr(module, name) for name in names)  # type: ignore[return-value]


@dataclass
class MTPHeadOutput(ModelOutput):
    """`logits: [B, L, V]` for the block positions (the conditioning prefix is dropped)."""

    logits: torch.Tensor | None = None


class MTPHeadModel(PreTrainedModel):
    """Bidirectional denoiser of a block of `L` tokens conditioned on `h_l` (module docstring)."""

    config_class = MTPHeadConfig
    base_model_prefix = "head"
    main_input_name = "in_hidden_states"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: MTPHeadConfig):
        super().__init__(config)
        decoder_config = build_decoder_config(config)
        layer_class, norm_class, rotary_class = architecture_classes(decoder_config)
        hidden = config.hidden_size
        self.condition_proj = nn.Linear(hidden, hidden, bias=True)
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        # Its own parameter, not a row of embed_tokens, so the embedding can be frozen while the
        # mask vector still trains (and Adam keeps no state for the frozen rows).
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        self.layers = nn.ModuleList(
            [layer_class(decoder_config, i) for i in range(config.num_hidden_layers)]
        )
        for layer in self.layers:
            if hasattr(layer, "self_attn"):
                layer.self_attn.is_causal = False  # bidirectional inside the block
        self.norm = norm_class(hidden, eps=getattr(decoder_config, "rms_norm_eps", 1e-6))
        self.rotary_emb = rotary_class(config=decoder_config)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            init.normal_(self.mask_embedding, mean=0.0, std=self.config.initializer_range)
        if module is getattr(self, "condition_proj", None):
            # h_l enters unchanged at first: the layer's input norm rescales it like a token.
            init.eye_(module.weight)
            init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        in_hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MTPHeadOutput:
        """in_hidden_states [B, H], input_ids [B, L] (tokens or mask_token_id), attention_mask [B, L] -> logits [B, L, V]."""
        dtype = self.condition_proj.weight.dtype
        batch_size, block_length = input_ids.shape
        prefix = self.condition_proj(in_hidden_states.to(dtype))[:, None, :]
        is_mask = input_ids == self.config.mask_token_id
        token_embeds = self.embed_tokens(input_ids.masked_fill(is_mask, 0))
        token_embeds = torch.where(
            is_mask[..., None], self.mask_embedding.to(token_embeds.dtype), token_embeds
        )
        hidden_states = torch.cat([prefix, token_embeds], dim=1)

        position_ids = torch.arange(block_length + 1, device=input_ids.device)[None].expand(
            batch_size, -1
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        # Additive key mask [B, 1, 1+L, 1+L]: everyone sees the prefix and every valid block
        # position (no causal triangle). The prefix is always visible, so no row is all -inf.
        keys = torch.ones(batch_size, block_length + 1, dtype=torch.bool, device=input_ids.device)
        if attention_mask is not None:
            keys[:, 1:] = attention_mask.bool()
        additive = torch.zeros(keys.shape, dtype=hidden_states.dtype, device=keys.device)
        additive = additive.masked_fill(~keys, torch.finfo(hidden_states.dtype).min)
        additive = additive[:, None, None, :].expand(-1, 1, block_length + 1, -1)

        for layer in self.layers:
            output = layer(
                hidden_states,
                attention_mask=additive,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            hidden_states = output[0] if isinstance(output, tuple) else output
        logits = self.lm_head(self.norm(hidden_states[:, 1:]))
        # SUBS parameterisation: the denoiser never outputs the mask token.
        mask_column = torch.tensor([self.config.mask_token_id], device=logits.device)
        logits = logits.index_fill(-1, mask_column, torch.finfo(logits.dtype).min)
        return MTPHeadOutput(logits=logits)

    def freeze_base_weights(self, embeddings: bool, lm_head: bool) -> None:
        """Keep the copied token embedding and/or LM head fixed (the mask vector always trains)."""
        self.embed_tokens.weight.requires_grad_(not embeddings)
        self.lm_head.weight.requires_grad_(not lm_head)

    def load_base_weights(self, embeddings: torch.Tensor, lm_head: torch.Tensor) -> None:
        """Copy the base model's `[V_base, H]` embedding and LM head into the first rows.

        Rows past the base vocabulary (the mask row) get a zero LM-head row; the mask vector starts
        at the mean token embedding, a neutral point at the embedding's scale.
        """
        rows = min(embeddings.shape[0], self.config.vocab_size)
        with torch.no_grad():
            self.embed_tokens.weight[:rows].copy_(embeddings[:rows])
            self.lm_head.weight[:rows].copy_(lm_head[:rows])
            self.lm_head.weight[rows:].zero_()
            self.embed_tokens.weight[rows:].copy_(embeddings.float().mean(0))
            self.mask_embedding.copy_(embeddings.float().mean(0))


# ----------------------------------------------------------------------------------------------
# the base model's pieces the head needs


@dataclass
class BaseModelParts:
    """What the head takes from a base model: its layer config, identity and two weight matrices."""

    decoder_config: dict[str, Any]
    identity: dict[str, Any]
    vocab_size: int
    pad_token_id: int | None
    embeddings: torch.Tensor  # [V_base, H]
    lm_head: torch.Tensor  # [V_base, H]


def _read_safetensors_pair(folder: Path, tied: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Read only the embedding and LM head from a safetensors folder (a 7B model need not be loaded whole)."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
    elif (folder / "model.safetensors").exists():
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            weight_map = {key: "model.safetensors" for key in handle.keys()}  # noqa: SIM118
    else:
        return None
    embed_keys = sorted((k for k in weight_map if k.endswith("embed_tokens.weight")), key=len)
    head_key = (
        "lm_head.weight"
        if "lm_head.weight" in weight_map
        else (embed_keys[0] if tied and embed_keys else None)
    )
    if not embed_keys or head_key is None:
        return None

    def read(key: str) -> torch.Tensor:
        with safe_open(folder / weight_map[key], framework="pt") as handle:
            return handle.get_tensor(key)

    return read(embed_keys[0]), read(head_key)


def load_base_model_parts(path: str | None, dtype: torch.dtype = torch.float32) -> BaseModelParts:
    """The base model's layer config, identity, embedding and LM head (`path` None: the default model)."""
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
    pair = _read_safetensors_pair(Path(resolved), tied) if Path(resolved).is_dir() else None
    if pair is None:  # not a plain safetensors folder: let transformers load the whole model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
        pair = (
            model.get_input_embeddings().weight.detach(),
            model.get_output_embeddings().weight.detach(),
        )
    embeddings, lm_head = (tensor.to(dtype) for tensor in pair)
    identity = {
        "name_or_path": path or DEFAULT_MODEL.name,
        "fingerprint": model_fingerprint(resolved),
        "architecture": (config.architectures or [config.model_type])[0],
        "hidden_state": HIDDEN_STATE_DEFINITION,
    }
    return BaseModelParts(
        decoder_config={"model_type": config.model_type, **config.to_dict()},
        identity=identity,
        vocab_size=int(embeddings.shape[0]),
        pad_token_id=getattr(config, "pad_token_id", None),
        embeddings=embeddings,
        lm_head=lm_head,
    )


def build_head(
    *,
    hidden_size: int,
    vocab_size: int,
    mask_token_id: int,
    block_length: int,
    num_hidden_layers: int = 1,
    pad_token_id: int | None = None,
    base: BaseModelParts | None = None,
    base_model_identity: dict[str, Any] | None = None,
    seed: int = 0,
) -> MTPHeadModel:
    """A new head; with `base`, its layers follow the base architecture and its embedding and LM head are copies."""
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
        base_vocab_size=base.vocab_size if base else None,
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
        head.load_base_weights(base.embeddings, base.lm_head)
    return head


def load_head(path: str | Path) -> MTPHeadModel:
    """`MTPHeadModel.from_pretrained` with a one-line error for a folder that is not a head."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path}: not a head folder (no config.json)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != HEAD_MODEL_TYPE:
        raise ModelLoadError(
            f"{path} holds a {model_type!r} model, not a dmtp head; pass a base model as --base_model_path"
        )
    return MTPHeadModel.from_pretrained(path, dtype=torch.float32)
