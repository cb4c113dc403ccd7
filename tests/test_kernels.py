"""Prepacked oneDNN linears (dmtp/kernels.py): the same outputs as nn.Linear, in place of it, on
the tiny Qwen2 and its head, and decoding on them stays token-for-token greedy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from dmtp.head import build_head, load_base_model_parts
from dmtp.kernels import PackedLinear, pack_linears, pack_matrix, packing_supported
from dmtp.specdec import HeadDrafter, greedy_decode, speculative_decode

pytestmark = pytest.mark.skipif(
    not packing_supported(torch.float32, "cpu"), reason="this torch build has no oneDNN"
)


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_nn_linear_at_every_row_count(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 320, bias=bias)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for rows in range(1, 10):
            x = torch.randn(1, rows, 96)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(3, 96)  # 2-D input too
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert packed.weight is linear.weight and packed.bias is linear.bias


@pytest.mark.skipif(
    not packing_supported(torch.bfloat16, "cpu"), reason="no bfloat16 instructions on this CPU"
)
def test_packed_linear_in_bfloat16_agrees_to_bfloat16_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(128, 256).to(torch.bfloat16)
    packed = PackedLinear(linear)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x).float(), linear(x).float(), rtol=2e-2, atol=2e-2)


def test_packing_applies_only_where_onednn_runs():
    assert not packing_supported(torch.float32, "cuda")
    assert not packing_supported(torch.float16, "cpu")
    half = nn.Sequential(nn.Linear(8, 8).half())
    assert pack_linears(half) == 0 and type(half[0]) is nn.Linear
    assert type(pack_matrix(torch.randn(4, 8, dtype=torch.float16))) is nn.Linear


@pytest.fixture(scope="module")
def models(debug_model_dir):
    plain = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    packed = copy.deepcopy(plain)
    linears = sum(type(m) is nn.Linear for m in plain.modules())
    assert pack_linears(packed) == linears > 0
    assert pack_linears(packed) == 0  # packing twice is a no-op
    return plain, packed


def test_a_packed_model_keeps_its_weights_ties_and_state_dict(models):
    plain, packed = models
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert set(packed.state_dict()) == set(plain.state_dict())  # the packed copy is not saved
    if plain.config.tie_word_embeddings:
        assert packed.lm_head.weight is packed.get_input_embeddings().weight
    for name, tensor in packed.state_dict().items():
        torch.testing.assert_close(tensor, plain.state_dict()[name], rtol=0, atol=0)


def test_a_packed_model_decodes_as_the_plain_one(models, debug_model_dir):
    plain, packed = models
    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    eos = [plain.generation_config.eos_token_id]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain attention and key-value caches."}],
        add_generation_prompt=True,
    )["input_ids"]
    with torch.inference_mode():
        logits = {name: m(torch.tensor([ids])).logits for name, m in (("a", plain), ("b", packed))}
    torch.testing.assert_close(logits["b"], logits["a"], rtol=1e-4, atol=1e-4)
    reference = greedy_decode(plain, ids, 32, eos)
    assert greedy_decode(packed, ids, 32, eos).tokens == reference.tokens

    # A head packed by its drafter drafts what the unpacked one drafts, and decoding stays greedy.
    parts = load_base_model_parts(str(debug_model_dir))
    head = build_head(
        hidden_size=64, vocab_size=parts.vocab_size, mask_token_id=319, block_length=4,
        feature_layers=[1, 2], num_target_layers=parts.num_hidden_layers, base=parts,
        draft_vocab=list(range(0, parts.vocab_size, 3)),
    ).eval()  # fmt: skip
    drafts = {}
    for packed_head in (False, True):
        drafter = Recording(
            HeadDrafter(copy.deepcopy(head), 4, 319, parts.vocab_size, packed=packed_head)
        )
        result = speculative_decode(packed, drafter, ids, 32, 4, eos)
        assert result.tokens == reference.tokens
        drafts[packed_head] = drafter.drafts
    assert drafts[True] == drafts[False] and len(drafts[True]) > 5


class Recording:
    """A drafter that keeps what the drafter it wraps proposed."""

    name = "recording"

    def __init__(self, drafter):
        self.drafter, self.drafts = drafter, []
        self.block_length, self.feature_layers = drafter.block_length, drafter.feature_layers

    def start(self, prompt_ids):
        self.drafter.start(prompt_ids)

    def draft(self, context):
        self.drafts.append(self.drafter.draft(context))
        return self.drafts[-1]
