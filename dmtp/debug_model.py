"""A tiny random Qwen2 base model with a real tokenizer: for tests, benchmarks and quick starts.

No model hub is reachable on build/CI machines, so tests build the base model from a config. The
tokenizer is a byte-level BPE trained in well under a second on built-in text, with a ChatML chat
template like Qwen's, so chat formatting, padding and EOS handling run the same code paths as with a
real instruct model.

    python -m dmtp.debug_model /tmp/tiny-qwen2     # writes an HF model folder
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. Speculative decoding drafts several tokens and the
base model verifies them in one forward pass. A diffusion head predicts a block of tokens from a
single hidden state. Write an essay about rivers, mountains, cities and the history of the sea.
Please write a story of 500 words about a lighthouse keeper who finds a message in a bottle.
Explain how a transformer computes attention, and why key-value caches make decoding faster.
0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' " # $ % & @
"""


@dataclass
class DebugModelSpec:
    """Shape of the debug base model. Small enough that a test forward takes milliseconds."""

    vocab_size: int = 320  # BPE merges fill it up to this size
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096  # LongWriter prompts are ~1k tokens under the tiny BPE
    seed: int = 0


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with ChatML special tokens, trained on built-in text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_debug_model(spec: DebugModelSpec | None = None):
    """(model, tokenizer): a random `Qwen2ForCausalLM` in float32 and its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = spec or DebugModelSpec()
    tokenizer = build_tokenizer(spec.vocab_size)
    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).eval()
    # Random init gives near-uniform logits; sharpen them so greedy decoding is stable
    # (no near-ties that flip with batch composition) and generations have varied lengths.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model, tokenizer


def save_debug_model(path: str | Path, spec: DebugModelSpec | None = None) -> Path:
    """Write the debug model and tokenizer as an HF folder (safetensors) and return its path."""
    path = Path(path)
    model, tokenizer = build_debug_model(spec)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(save_debug_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen2"))
