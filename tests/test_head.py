"""The MTP head: shapes, bidirectional attention, conditioning, base-model initialisation, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from dmtp.errors import DmtpError, ModelLoadError
from dmtp.head import MTPHeadConfig, MTPHeadModel, build_head, load_base_model_parts, load_head

HIDDEN, VOCAB, BLOCK = 64, 320, 4
MASK = VOCAB  # one row past the base vocabulary


@pytest.fixture(scope="module")
def base_parts(debug_model_dir):
    return load_base_model_parts(str(debug_model_dir))


@pytest.fixture(scope="module")
def head(base_parts):
    return build_head(
        hidden_size=HIDDEN,
        vocab_size=VOCAB + 1,
        mask_token_id=MASK,
        block_length=BLOCK,
        base=base_parts,
    ).eval()


def _inputs(batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, HIDDEN, generator=generator)
    input_ids = torch.full((batch, BLOCK), MASK)
    input_ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=generator)
    return hidden, input_ids, torch.ones(batch, BLOCK, dtype=torch.long)


def test_forward_shape_and_mask_token_is_never_predicted(head):
    hidden, input_ids, attention_mask = _inputs()
    logits = head(
        in_hidden_states=hidden, input_ids=input_ids, attention_mask=attention_mask
    ).logits
    assert logits.shape == (3, BLOCK, VOCAB + 1)
    assert torch.all(logits.argmax(-1) != MASK)
    assert torch.all(logits[..., MASK] < -1e30)


def test_attention_inside_the_block_is_bidirectional(head):
    hidden, input_ids, _ = _inputs(batch=1)
    changed = input_ids.clone()
    changed[0, BLOCK - 1] = 7  # a later position
    with torch.no_grad():
        before = head(in_hidden_states=hidden, input_ids=input_ids).logits
        after = head(in_hidden_states=hidden, input_ids=changed).logits
    assert not torch.allclose(before[0, 0], after[0, 0])  # position 0 sees position L-1


def test_attention_mask_hides_positions_past_the_end(head):
    hidden, input_ids, attention_mask = _inputs(batch=1)
    attention_mask[0, -1] = 0
    changed = input_ids.clone()
    changed[0, -1] = 7
    with torch.no_grad():
        before = head(
            in_hidden_states=hidden, input_ids=input_ids, attention_mask=attention_mask
        ).logits
        after = head(
            in_hidden_states=hidden, input_ids=changed, attention_mask=attention_mask
        ).logits
    torch.testing.assert_close(before[0, :-1], after[0, :-1])


def test_logits_depend_on_the_conditioning_hidden_state(head):
    hidden, input_ids, _ = _inputs(batch=1)
    with torch.no_grad():
        a = head(in_hidden_states=hidden, input_ids=input_ids).logits
        b = head(in_hidden_states=hidden + 1.0, input_ids=input_ids).logits
    assert not torch.allclose(a, b)


def test_embedding_and_lm_head_start_as_the_base_models(head, base_parts):
    assert torch.equal(head.embed_tokens.weight[:VOCAB], base_parts.embeddings)
    assert torch.equal(head.lm_head.weight[:VOCAB], base_parts.lm_head)
    assert torch.all(head.lm_head.weight[MASK] == 0)
    assert type(head.layers[0]).__name__ == "Qwen2DecoderLayer"
    assert head.config.decoder_config["num_attention_heads"] == 4


def test_freezing_keeps_the_mask_vector_trainable(base_parts):
    head = build_head(
        hidden_size=HIDDEN,
        vocab_size=VOCAB + 1,
        mask_token_id=MASK,
        block_length=BLOCK,
        base=base_parts,
    )
    head.freeze_base_weights(embeddings=True, lm_head=True)
    trainable = {name for name, p in head.named_parameters() if p.requires_grad}
    assert "embed_tokens.weight" not in trainable and "lm_head.weight" not in trainable
    assert "mask_embedding" in trainable and "condition_proj.weight" in trainable
    hidden, input_ids, _ = _inputs()
    head(in_hidden_states=hidden, input_ids=input_ids).logits.sum().backward()
    assert head.mask_embedding.grad.abs().sum() > 0


def test_saved_head_reloads_with_identical_logits_and_no_pickle(head, tmp_path):
    head.save_pretrained(tmp_path / "head")
    files = sorted(p.name for p in (tmp_path / "head").iterdir())
    assert files == ["config.json", "model.safetensors"]
    reloaded = MTPHeadModel.from_pretrained(tmp_path / "head").eval()
    hidden, input_ids, attention_mask = _inputs(batch=5, seed=3)
    with torch.no_grad():
        expected = head(
            in_hidden_states=hidden, input_ids=input_ids, attention_mask=attention_mask
        ).logits
        actual = reloaded(
            in_hidden_states=hidden, input_ids=input_ids, attention_mask=attention_mask
        ).logits
    assert torch.equal(expected, actual)


def test_head_folder_describes_its_base_model(head, tmp_path, debug_model_dir):
    head.save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["model_type"] == "dmtp_mtp_head"
    assert (config["hidden_size"], config["vocab_size"], config["mask_token_id"]) == (
        HIDDEN,
        VOCAB + 1,
        MASK,
    )
    assert config["block_length"] == BLOCK and config["num_hidden_layers"] == 1
    assert config["base_model"]["name_or_path"] == str(debug_model_dir)
    assert len(config["base_model"]["fingerprint"]) == 32
    assert config["base_model"]["hidden_state"].startswith("hidden_states[-1]")
    assert config["decoder_config"]["model_type"] == "qwen2"


def test_llama_base_builds_llama_layers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    base.save_pretrained(tmp_path / "llama")
    parts = load_base_model_parts(str(tmp_path / "llama"))
    assert torch.equal(parts.lm_head, parts.embeddings)  # tied: the LM head is the embedding
    head = build_head(hidden_size=32, vocab_size=101, mask_token_id=100, block_length=3, base=parts)
    assert type(head.layers[0]).__name__ == "LlamaDecoderLayer"
    logits = head(in_hidden_states=torch.randn(2, 32), input_ids=torch.full((2, 3), 100)).logits
    assert logits.shape == (2, 3, 101)


def test_head_without_a_base_model_uses_a_qwen2_style_layer():
    head = build_head(
        hidden_size=48, vocab_size=50, mask_token_id=49, block_length=2, num_hidden_layers=2
    )
    assert len(head.layers) == 2 and head.config.base_model is None
    assert head(
        in_hidden_states=torch.randn(1, 48), input_ids=torch.tensor([[3, 49]])
    ).logits.shape == (1, 2, 50)


def test_config_rejects_bad_values():
    with pytest.raises(DmtpError, match="block_length must be >= 1"):
        MTPHeadConfig(hidden_size=64, vocab_size=10, block_length=0)
    with pytest.raises(DmtpError, match="mask_token_id 10 is outside"):
        MTPHeadConfig(hidden_size=64, vocab_size=10, mask_token_id=10)
    assert MTPHeadConfig(hidden_size=64, vocab_size=10).mask_token_id == 9


def test_load_head_refuses_a_base_model_folder(debug_model_dir, tmp_path):
    with pytest.raises(
        ModelLoadError, match="not a dmtp head; pass a base model as --base_model_path"
    ):
        load_head(debug_model_dir)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_head(tmp_path)
