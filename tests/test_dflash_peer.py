"""The peer check (DESIGN §5): dmtp's head against the reference DFlash code, `dflash==0.1.0`.

The head's tensors load one to one into `dflash.model.DFlashDraftModel`; both draft forwards give
the same states; and `dflash_generate` and dmtp's `speculative_decode` with the same weights, base
model and prompts give greedy decoding's tokens and the same acceptance length round by round.
The head is trained for a few seconds on the tiny model's own greedy answers, so it drafts well
on some stretches and badly on others (a mix of acceptance lengths, not all 1s).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dflash_oracle import (
    DFlashUnavailable,
    dflash_config,
    dflash_draft_from_head,
    fit_head,
    load_dflash,
    run_peers,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from dmtp.head import DraftCache, build_head, load_base_model_parts, load_head
from dmtp.specdec import greedy_decode

# dflash_generate passes the base model's cache as `past_key_values`, deprecated in transformers 5.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

BLOCK = 8
MAX_NEW = 45
FEATURE_LAYERS = [1, 2]  # the tiny model's two decoder layers; DFlash's target_layer_ids [0, 1]
TRAIN_STEPS = 200  # ~4 s; acceptance lengths 1…8, most of them 1
QUESTIONS = [
    "Write a story about a lighthouse keeper.",
    "Explain attention and key-value caches.",
    "The quick brown fox",
    "Write an essay about rivers, mountains, cities and the history of the sea.",
]
# Not trained on: the head drafts them mostly wrong.
HELD_OUT = [
    "Please write a story of 500 words about a lighthouse keeper.",
    "Explain how a transformer computes attention.",
]


@pytest.fixture(scope="module")
def dflash():
    try:
        return load_dflash()
    except DFlashUnavailable as error:
        pytest.skip(f"the DFlash reference is not available: {error}")


@pytest.fixture(scope="module")
def base(debug_model_dir):
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def eos(base):
    return [base[0].generation_config.eos_token_id]


def encode(tokenizer, question: str) -> list[int]:
    chat = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]


@pytest.fixture(scope="module")
def head(base, debug_model_dir, eos):
    model, tokenizer = base
    parts = load_base_model_parts(str(debug_model_dir))
    vocab = parts.vocab_size
    head = build_head(
        hidden_size=parts.embeddings.shape[1],
        vocab_size=vocab,
        # dmtp train's choice: a token the base model does not output (here the last BPE merge).
        # It must stay one the head never predicts: dmtp's HeadDrafter never drafts the mask
        # token, dflash_generate drafts whatever the argmax is.
        mask_token_id=vocab - 1,
        block_length=BLOCK,
        feature_layers=FEATURE_LAYERS,
        num_target_layers=parts.num_hidden_layers,
        context_window=None,
        base=parts,
    )
    answers = []
    for question in QUESTIONS:
        prompt = encode(tokenizer, question)
        answers.append(prompt + greedy_decode(model, prompt, 96, eos).tokens)
    fit_head(head, model, answers, TRAIN_STEPS)
    return head


@pytest.fixture(scope="module")
def draft(dflash, head):
    return dflash_draft_from_head(head, dflash)


def test_head_tensors_map_one_to_one(dflash, head, base, tmp_path):
    draft = dflash.DFlashDraftModel(dflash_config(head))
    ours = head.state_dict()
    theirs = draft.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    assert draft.target_layer_ids == [i - 1 for i in FEATURE_LAYERS]
    assert draft.block_size == BLOCK and draft.mask_token_id == head.config.mask_token_id
    # Non-persistent buffers are not in a state dict: the rotary frequencies must agree by config.
    torch.testing.assert_close(draft.rotary_emb.inv_freq, head.rotary_emb.inv_freq)
    # …and follow the base model's (the features carry its positions).
    torch.testing.assert_close(head.rotary_emb.inv_freq, base[0].model.rotary_emb.inv_freq)
    assert draft.rotary_emb.attention_scaling == head.rotary_emb.attention_scaling
    assert draft.layers[0].self_attn.head_dim == head.layers[0].self_attn.head_dim
    # The block attends to itself both ways in both: DFlash's layer is causal only when sliding.
    assert draft.layers[0].self_attn.is_causal is False
    assert draft.layers[0].self_attn.sliding_window is None
    # A saved head exports as well: its folder's tensors load strictly into DFlash's model.
    head.save_pretrained(tmp_path / "head")
    exported = dflash_draft_from_head(load_head(tmp_path / "head"), dflash)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, atol=0, rtol=0)


def test_draft_forward_equals_dflash(dflash, head, draft, base):
    """Two decoding steps with the draft-side caches: the same block states, the same cache."""
    generator = torch.Generator().manual_seed(1)
    width = len(FEATURE_LAYERS) * head.config.hidden_size
    embeddings = base[0].get_input_embeddings().weight
    ours, theirs = DraftCache(head.config.num_hidden_layers), dflash._make_cache(draft.config)
    start = 0
    for new in (11, 3):  # the prompt's positions, then a round's bonus and 2 accepted drafts
        features = torch.randn(new, width, generator=generator)
        start += new
        block = torch.full((BLOCK,), head.config.mask_token_id)
        block[0] = int(torch.randint(0, 300, (1,), generator=generator))
        with torch.inference_mode():
            expected = draft(
                target_hidden=features[None],
                noise_embedding=F.embedding(block, embeddings)[None],
                position_ids=torch.arange(start - new, start + BLOCK)[None],
                past_key_values=theirs,
                use_cache=True,
            )[0]
            dflash._crop_to(theirs, start)
            states = head.draft_step(features, block, start, ours)
        torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)
        assert len(ours) == theirs.get_seq_length() == start
        torch.testing.assert_close(ours.keys[0], theirs.layers[0].keys, atol=1e-5, rtol=1e-5)


def check_peers(dflash, draft, head, model, prompt, max_new_tokens, stop_ids) -> list[int]:
    """Both lossless; the same rounds, aligned at the token limit as `clip_to_limit` explains."""
    run = run_peers(dflash, draft, head, model, prompt, max_new_tokens, stop_ids)
    assert run.dmtp.tokens == run.greedy, "dmtp's speculative decoding is not lossless"
    assert run.dflash_tokens == run.greedy, "dflash_generate is not lossless here"
    assert run.dmtp_lengths == run.dflash_lengths_aligned
    # At the same limit, every round dflash started with a full block (R >= L - 1) is the same.
    generated = 1
    for ours, theirs in zip(run.dmtp_lengths, run.dflash.acceptance_lengths, strict=False):
        if max_new_tokens - generated < BLOCK - 1:
            break
        assert ours == theirs
        generated += ours
    assert sum(run.dmtp_lengths) == sum(run.dflash.acceptance_lengths) == len(run.greedy) - 1
    return run.dmtp_lengths


def test_dflash_generate_and_dmtp_agree(dflash, draft, head, base, eos):
    model, tokenizer = base
    lengths: list[int] = []
    for question in QUESTIONS + HELD_OUT:
        prompt = encode(tokenizer, question)
        lengths += check_peers(dflash, draft, head, model, prompt, MAX_NEW, eos)
    # The check means something only if the head drafts right and wrong.
    assert min(lengths) == 1 and max(lengths) >= BLOCK // 2 and len(set(lengths)) >= 4, lengths


def test_agree_at_a_stop_token(dflash, draft, head, base, eos):
    """A stop token mid-answer: both cut the round at it, the stop token included."""
    model, tokenizer = base
    for question in QUESTIONS[:2] + HELD_OUT[:1]:
        prompt = encode(tokenizer, question)
        answer = greedy_decode(model, prompt, MAX_NEW, eos).tokens
        stop = [answer[20]]
        committed = check_peers(dflash, draft, head, model, prompt, MAX_NEW, stop)
        assert sum(committed) + 1 <= 21
