"""The DFlash-style head: shapes, what a block sees, the draft cache, the borrowed vocabulary, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dmtp.errors import DmtpError, ModelLoadError
from dmtp.head import (
    DraftCache,
    MTPHeadConfig,
    MTPHeadModel,
    build_head,
    load_base_model_parts,
    load_head,
)
from dmtp.loss import block_loss

HIDDEN, VOCAB, BLOCK = 64, 320, 4  # the debug model's hidden size and vocabulary
LAYERS = [1, 2]  # output_hidden_states indices of the 2-layer debug model (2 = the final state)
FEATURES = len(LAYERS) * HIDDEN
MASK = VOCAB - 1  # a base token id, as plan_training picks one
# DFlashDraftModel's tensor names: an export is a rename-free copy
DFLASH_TENSORS = {
    "fc.weight", "hidden_norm.weight", "norm.weight",
    *(f"layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
    *(f"layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
    "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
}  # fmt: skip


@pytest.fixture(scope="module")
def base_parts(debug_model_dir):
    return load_base_model_parts(str(debug_model_dir), layers=[1])


def _head(base_parts, **overrides) -> MTPHeadModel:
    values = dict(
        hidden_size=HIDDEN, vocab_size=VOCAB, mask_token_id=MASK, block_length=BLOCK,
        feature_layers=LAYERS, num_target_layers=2, base=base_parts,
    )  # fmt: skip
    values.update(overrides)
    return build_head(**values).eval()


@pytest.fixture(scope="module")
def head(base_parts):
    return _head(base_parts)


def _features(batch: int = 2, rows: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, rows, FEATURES, generator=torch.Generator().manual_seed(seed))


def _blocks(batch: int, n_blocks: int, seed: int = 0) -> torch.Tensor:
    """[B, A, L]: a clean bonus token, then MASK."""
    ids = torch.full((batch, n_blocks, BLOCK), MASK)
    ids[..., 0] = torch.randint(
        0, VOCAB - 1, (batch, n_blocks), generator=torch.Generator().manual_seed(seed)
    )
    return ids


def _states(head, features, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return head(in_hidden_states=features, input_ids=ids, **kwargs).hidden_states


# ----------------------------------------------------------------------------------------------
# shapes and the borrowed vocabulary


def test_forward_shapes(head):
    features, ids = _features(), _blocks(2, 3)
    anchors = torch.tensor([[2, 5, 9], [0, 4, 7]])
    with torch.no_grad():
        out = head(in_hidden_states=features, input_ids=ids, anchors=anchors)
        assert out.hidden_states.shape == (2, 3, BLOCK, HIDDEN) and out.logits is None
        out = head(in_hidden_states=features, input_ids=ids, anchors=anchors, with_logits=True)
        assert out.logits.shape == (2, 3, BLOCK, VOCAB)
        # one block after the last row
        single = head(in_hidden_states=features, input_ids=ids[:, 0])
        assert single.hidden_states.shape == (2, 1, BLOCK, HIDDEN)
        assert single.logits.shape == (2, BLOCK, VOCAB)
        # [B, S, F, H] is the same input as [B, S, F·H]
        four_d = head(
            in_hidden_states=features.view(2, 10, len(LAYERS), HIDDEN), input_ids=ids[:, 0]
        )
        assert torch.equal(four_d.logits, single.logits)
        # [B, F·H]: one context row, the seed's case
        seed_case = head(in_hidden_states=features[:, 4], input_ids=ids[:, 0]).logits
        one_row = head(in_hidden_states=features[:, 4:5], input_ids=ids[:, 0]).logits
        assert seed_case.shape == (2, BLOCK, VOCAB) and torch.equal(seed_case, one_row)


def test_logits_and_embeddings_are_the_base_models(head, base_parts):
    features, ids = _features(), _blocks(2, 1)
    with torch.no_grad():
        out = head(in_hidden_states=features, input_ids=ids[:, 0])
        expected = out.hidden_states[:, 0] @ base_parts.lm_head.T
        torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(head.embed(torch.tensor([MASK, 3])), base_parts.embeddings[[MASK, 3]])


def test_head_owns_no_copy_of_the_base_vocabulary(head, base_parts):
    assert set(head.state_dict()) == DFLASH_TENSORS
    assert all(VOCAB not in p.shape for p in head.parameters())
    assert head.config.dflash_target_layer_ids == [0, 1]
    bare = MTPHeadModel(head.config)
    with pytest.raises(DmtpError, match="call attach_base"):
        bare(in_hidden_states=_features(), input_ids=_blocks(2, 1)[:, 0])
    with pytest.raises(DmtpError, match="do not fit a head of hidden size 64"):
        bare.attach_base(torch.zeros(VOCAB, 32), torch.zeros(VOCAB, 32))


def test_draft_vocabulary_restricts_the_logits_and_the_labels(base_parts, tmp_path):
    draft_vocab = [3, 7, 100, 250]
    head = _head(base_parts, draft_vocab=draft_vocab)
    states = torch.randn(2, 5, HIDDEN)
    torch.testing.assert_close(
        head.draft_logits(states), head.compute_logits(states)[..., draft_vocab]
    )
    assert head.draft_token_ids().tolist() == draft_vocab
    # labels become indices into the draft vocabulary; other tokens drop out of the loss
    labels = torch.tensor([[7, 250, 5, -100]])
    assert head.to_draft_labels(labels).tolist() == [[1, 3, -100, -100]]
    assert _head(base_parts).to_draft_labels(labels) is labels  # no draft vocabulary: unchanged
    head.save_pretrained(tmp_path / "head")
    assert load_head(tmp_path / "head").config.draft_vocab == draft_vocab


def test_loss_over_a_draft_vocabulary_drops_the_other_tokens():
    draft_vocab = [1, 4, 6]
    head = build_head(
        hidden_size=16, vocab_size=11, mask_token_id=10, block_length=3, feature_layers=[-1],
        num_target_layers=-1, draft_vocab=draft_vocab,
    )  # fmt: skip
    states = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(11))
    labels = torch.tensor([[1, 4, 5], [6, 2, 1]])
    masked = torch.tensor([[False, True, True], [False, True, True]])
    loss = block_loss(head, states, labels, masked, torch.ones(2), objective="decode")
    # counted: (0,1) token 4 = draft index 1 and (1,2) token 1 = index 0; tokens 5 and 2 are not draftable
    rows = head.lm_head.weight[draft_vocab]
    logits = torch.stack([states[0, 1], states[1, 2]]) @ rows.T
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------------------------
# what a block sees: its own block (both ways), and context rows up to its anchor in its own row


def test_packed_blocks_equal_one_forward_per_block(head):
    """Many anchored blocks in one forward give what each block gives alone on rows <= anchor."""
    features, ids = _features(batch=2, rows=12), _blocks(2, 4, seed=1)
    anchors = torch.tensor([[0, 3, 7, 11], [2, 5, 6, 10]])
    packed = _states(head, features, ids, anchors=anchors)
    for b in range(2):
        for a in range(4):
            anchor = int(anchors[b, a])
            alone = _states(head, features[b : b + 1, : anchor + 1], ids[b : b + 1, a])
            torch.testing.assert_close(packed[b, a], alone[0, 0], rtol=1e-5, atol=1e-5)


def test_a_block_never_sees_later_rows_other_blocks_or_other_sequences(head):
    features, ids = _features(batch=2, rows=10), _blocks(2, 2, seed=2)
    anchors = torch.tensor([[4, 7], [4, 7]])
    before = _states(head, features, ids, anchors=anchors)

    later = features.clone()
    later[0, 5:] += 3.0  # rows after block 0's anchor
    after = _states(head, later, ids, anchors=anchors)
    assert torch.equal(after[0, 0], before[0, 0]) and torch.equal(after[1], before[1])
    assert not torch.allclose(after[0, 1], before[0, 1])  # block 1 (anchor 7) does see rows 5..7

    other_block = ids.clone()
    other_block[0, 1, 0] = (ids[0, 1, 0] + 1) % (VOCAB - 1)
    after = _states(head, features, other_block, anchors=anchors)
    assert torch.equal(after[0, 0], before[0, 0]) and not torch.allclose(after[0, 1], before[0, 1])

    other_sequence = features.clone()
    other_sequence[1] += 3.0
    after = _states(head, other_sequence, ids, anchors=anchors)
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])

    earlier = features.clone()
    earlier[0, 0] += 3.0  # the first row of the sequence: every block of it sees it
    after = _states(head, earlier, ids, anchors=anchors)
    assert not torch.allclose(after[0, 0], before[0, 0])


def test_rows_outside_the_context_mask_are_never_seen(head):
    """Padding rows (a shorter sequence in the batch) are invisible even at or before an anchor."""
    features, ids = _features(batch=1, rows=8), _blocks(1, 1, seed=3)
    context_mask = torch.ones(1, 8, dtype=torch.bool)
    context_mask[0, :3] = False
    anchors = torch.tensor([[6]])
    before = _states(head, features, ids, anchors=anchors, context_mask=context_mask)
    changed = features.clone()
    changed[0, :3] += 3.0
    assert torch.equal(
        _states(head, changed, ids, anchors=anchors, context_mask=context_mask), before
    )
    assert not torch.allclose(_states(head, changed, ids, anchors=anchors), before)


def test_context_window_limits_the_rows_a_block_sees(base_parts):
    head = _head(base_parts, context_window=3)
    features, ids = _features(batch=1, rows=10), _blocks(1, 1, seed=4)
    anchors = torch.tensor([[8]])  # sees rows 6, 7, 8
    before = _states(head, features, ids, anchors=anchors)
    outside, inside = features.clone(), features.clone()
    outside[0, :6] += 3.0
    inside[0, 6] += 3.0
    assert torch.equal(_states(head, outside, ids, anchors=anchors), before)
    assert not torch.allclose(_states(head, inside, ids, anchors=anchors), before)


def test_attention_inside_the_block_is_bidirectional(head):
    features, ids = _features(batch=1), _blocks(1, 1, seed=5)
    changed = ids.clone()
    changed[0, 0, BLOCK - 1] = 7  # the last position
    before, after = _states(head, features, ids), _states(head, features, changed)
    assert not torch.allclose(before[0, 0, 0], after[0, 0, 0])  # position 0 sees position L-1


def test_attention_mask_hides_positions_past_the_end(head):
    features, ids = _features(batch=1), _blocks(1, 1, seed=6)[:, 0]
    attention_mask = torch.ones(1, BLOCK, dtype=torch.long)
    attention_mask[0, -1] = 0
    changed = ids.clone()
    changed[0, -1] = 7
    before = _states(head, features, ids, attention_mask=attention_mask)
    after = _states(head, features, changed, attention_mask=attention_mask)
    assert torch.equal(before[0, 0, :-1], after[0, 0, :-1])
    assert not torch.allclose(
        _states(head, features, ids)[0, 0, :-1], _states(head, features, changed)[0, 0, :-1]
    )


# ----------------------------------------------------------------------------------------------
# decoding with the draft cache


@pytest.mark.parametrize("context_window", [None, 4])
def test_draft_step_equals_the_training_forward(base_parts, context_window):
    """Context fed to the cache in pieces (as rounds accept positions) gives the packed forward's states."""
    head = _head(base_parts, context_window=context_window)
    features = _features(batch=1, rows=11, seed=7)[0]
    block = _blocks(1, 1, seed=8)[0, 0]
    cache = DraftCache(head.config.num_hidden_layers)
    with torch.no_grad():
        head.draft_step(features[:5], block, start=5, cache=cache)  # the prompt's rows
        assert len(cache) == 5  # the block's entries are cropped away
        head.draft_step(features[5:7], block, start=7, cache=cache)  # a round accepted 2 positions
        stepped = head.draft_step(features[7:11], block, start=11, cache=cache)
        assert len(cache) == 11
        forward = _states(head, features[None], block[None, None], anchors=torch.tensor([[10]]))
        torch.testing.assert_close(stepped, forward[0, 0], rtol=1e-5, atol=1e-5)
        # a second denoising step of the same round feeds no new context
        again = head.draft_step(features[:0], block, start=11, cache=cache)
        torch.testing.assert_close(again, stepped, rtol=1e-5, atol=1e-5)
        with pytest.raises(DmtpError, match="draft cache holds 11 positions, expected 10"):
            head.draft_step(features[:2], block, start=12, cache=cache)


# ----------------------------------------------------------------------------------------------
# initialisation, save and load


def test_init_from_base_copies_the_last_base_layer(base_parts, debug_model_dir):
    from dataclasses import replace

    from safetensors.torch import load_file

    weights = load_file(str(debug_model_dir / "model.safetensors"))
    # The debug model's norms are all ones: give the final norm values a copy can be told by.
    final_norm = torch.rand(HIDDEN, generator=torch.Generator().manual_seed(10)) + 0.5
    parts = replace(base_parts, final_norm=final_norm)
    copied = _head(parts, init_from_base=True)
    fresh = _head(parts)
    layer = copied.layers[0]
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight"):  # fmt: skip
        expected = weights[f"model.layers.1.{name}"]
        assert torch.equal(layer.get_parameter(name), expected), name
        assert not torch.equal(fresh.layers[0].get_parameter(name), expected), name
    assert torch.equal(layer.self_attn.q_norm.weight, torch.ones(16))  # DFlash's; the base has none
    # `norm` feeds the base LM head as the base model's final norm does, in both cases
    assert torch.equal(copied.norm.weight, final_norm)
    assert torch.equal(fresh.norm.weight, final_norm)


def test_saved_head_reloads_with_identical_outputs_and_no_pickle(head, base_parts, tmp_path):
    head.save_pretrained(tmp_path / "head")
    files = sorted(p.name for p in (tmp_path / "head").iterdir())
    assert files == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "head" / "model.safetensors", framework="pt") as handle:
        assert set(handle.keys()) == DFLASH_TENSORS  # the base embedding and LM head are not saved
    reloaded = load_head(tmp_path / "head").eval()
    with pytest.raises(DmtpError, match="call attach_base"):
        reloaded(in_hidden_states=_features(), input_ids=_blocks(2, 1)[:, 0])
    reloaded.attach_base(base_parts.embeddings, base_parts.lm_head)
    features, ids = _features(batch=3, seed=9), _blocks(3, 2, seed=9)
    anchors = torch.tensor([[1, 9]] * 3)
    saved, loaded = head.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        expected = head(in_hidden_states=features, input_ids=ids, anchors=anchors, with_logits=True)
        actual = reloaded(
            in_hidden_states=features, input_ids=ids, anchors=anchors, with_logits=True
        )
    # equal weights; BLAS may pick another kernel for differently aligned memory (~1e-7)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_head_folder_describes_its_base_model(base_parts, tmp_path, debug_model_dir):
    _head(base_parts, context_window=32).save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["model_type"] == "dmtp_mtp_head"
    assert [config[k] for k in ("hidden_size", "vocab_size", "mask_token_id")] == [
        HIDDEN,
        VOCAB,
        MASK,
    ]
    assert config["block_length"] == BLOCK and config["num_hidden_layers"] == 1
    assert config["feature_layers"] == LAYERS and config["context_window"] == 32
    assert config["num_target_layers"] == 2 and config["owns_vocabulary"] is False
    assert config["base_model"]["name_or_path"] == str(debug_model_dir)
    assert len(config["base_model"]["fingerprint"]) == 32
    assert config["base_model"]["hidden_state"].startswith("hidden_states[-1]")
    assert config["decoder_config"]["model_type"] == "qwen2"
    assert config["decoder_config"]["num_attention_heads"] == 4
    assert "vocab_size" not in config["decoder_config"]  # the layer's shape only


def test_llama_base_with_tied_embeddings(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )
    )  # fmt: skip
    base.save_pretrained(tmp_path / "llama")
    parts = load_base_model_parts(str(tmp_path / "llama"), layers=[2])
    assert torch.equal(parts.lm_head, parts.embeddings)  # tied: the LM head is the embedding
    assert parts.num_hidden_layers == 3 and parts.vocab_size == 100
    head = build_head(
        hidden_size=32, vocab_size=100, mask_token_id=99, block_length=3, feature_layers=[1, 3],
        num_target_layers=3, base=parts, init_from_base=True,
    )  # fmt: skip
    assert torch.equal(head.layers[0].mlp.up_proj.weight, base.model.layers[2].mlp.up_proj.weight)
    logits = head(in_hidden_states=torch.randn(2, 5, 64), input_ids=torch.full((2, 3), 99)).logits
    assert logits.shape == (2, 3, 100)


def test_head_of_its_own_vocabulary_trains_and_saves_it(tmp_path):
    """No base model (the guide's §3.2): the head's own embedding and LM head, mask = one extra row."""
    head = build_head(
        hidden_size=48, vocab_size=51, mask_token_id=50, block_length=2, feature_layers=[-1],
        num_target_layers=-1, num_hidden_layers=2,
    )  # fmt: skip
    assert head.config.owns_vocabulary and head.config.base_model is None and len(head.layers) == 2
    logits = head(in_hidden_states=torch.randn(3, 48), input_ids=torch.tensor([[3, 50]] * 3)).logits
    assert logits.shape == (3, 2, 51)
    logits.logsumexp(-1).sum().backward()
    assert head.embed_tokens.weight.grad.abs().sum() > 0
    assert head.lm_head.weight.grad.abs().sum() > 0
    head.save_pretrained(tmp_path / "own")
    with safe_open(tmp_path / "own" / "model.safetensors", framework="pt") as handle:
        assert {"embed_tokens.weight", "lm_head.weight"} <= set(handle.keys())
    reloaded = load_head(tmp_path / "own")  # usable without attach_base
    ids = torch.tensor([[3, 50]])
    features = torch.randn(1, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(in_hidden_states=features, input_ids=ids).logits,
            head(in_hidden_states=features, input_ids=ids).logits,
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip


def test_config_rejects_bad_values():
    with pytest.raises(DmtpError, match="block_length must be >= 1"):
        MTPHeadConfig(hidden_size=64, vocab_size=10, block_length=0)
    with pytest.raises(DmtpError, match="mask_token_id 10 is outside"):
        MTPHeadConfig(hidden_size=64, vocab_size=10, mask_token_id=10)
    with pytest.raises(DmtpError, match="context_window must be >= 1"):
        MTPHeadConfig(hidden_size=64, vocab_size=10, context_window=0)
    with pytest.raises(DmtpError, match="feature_layers must be distinct"):
        MTPHeadConfig(hidden_size=64, vocab_size=10, feature_layers=[2, 2])
    with pytest.raises(DmtpError, match="hidden_size 64 != the base architecture's 32"):
        MTPHeadConfig(hidden_size=64, vocab_size=10, decoder_config={"hidden_size": 32})
    assert MTPHeadConfig(hidden_size=64, vocab_size=10).mask_token_id == 9


def test_build_head_refuses_a_base_of_another_size(base_parts):
    with pytest.raises(DmtpError, match="the base model's hidden size is 64, the head's 32"):
        build_head(
            hidden_size=32, vocab_size=VOCAB, mask_token_id=MASK, block_length=BLOCK,
            feature_layers=LAYERS, num_target_layers=2, base=base_parts,
        )  # fmt: skip


def test_load_head_refuses_what_is_not_a_head_of_this_layout(debug_model_dir, tmp_path):
    with pytest.raises(
        ModelLoadError, match="not a dmtp head; pass a base model as --base_model_path"
    ):
        load_head(debug_model_dir)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_head(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "dmtp_mtp_head", "hidden_size": 64}))
    with pytest.raises(ModelLoadError, match="earlier layout .* retrain it"):
        load_head(old)
