"""`dmtp export --format dflash`: the reference DFlash code serves the exported folder as dmtp does.

A tiny head is trained for a few seconds on the tiny model's own greedy answers (so it drafts some
stretches right and others wrong), saved as `dmtp train` saves it, evaluated by `dmtp evaluate` and
exported by the `dmtp export` command. `dflash.model.DFlashDraftModel.from_pretrained` (the
reference code, `dflash==0.1.0`, unpacked at test time, never installed) loads the folder, and its
`dflash_generate` gives greedy decoding's tokens and the acceptance lengths `dmtp evaluate`
recorded, round by round. Heads the layout cannot express are refused with one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from dflash_oracle import DFlashUnavailable, fit_head, load_dflash, run_peers
from safetensors.torch import load_file

from dmtp.cli import main as dmtp_main
from dmtp.config import EvalConfig
from dmtp.evaluate import evaluate
from dmtp.export import dflash_problems, serving_caveats
from dmtp.head import build_head, load_base_model_parts, load_head
from dmtp.models import encode_prompt, eos_token_ids, load_base_model
from dmtp.prompts import iter_prompts
from dmtp.specdec import greedy_decode

# dflash_generate passes the base model's cache as `past_key_values`, deprecated in transformers 5.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

BLOCK = 8
MAX_NEW = 45
FEATURE_LAYERS = [
    1,
    2,
]  # the tiny model's two decoder layers' outputs; the second is the final state
TRAIN_STEPS = 200  # ~4 s; acceptance lengths 1…8
QUESTIONS = [
    "Write a story about a lighthouse keeper.",
    "Explain attention and key-value caches.",
    "The quick brown fox",
    "Write an essay about rivers, mountains, cities and the history of the sea.",
]
HELD_OUT = ["Please write a story of 500 words about a lighthouse keeper."]


@pytest.fixture(scope="module")
def dflash():
    try:
        return load_dflash()
    except DFlashUnavailable as error:
        pytest.skip(f"the DFlash reference is not available: {error}")


@pytest.fixture(scope="module")
def base(debug_model_dir):
    return load_base_model(str(debug_model_dir), "cpu", "float32")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS + HELD_OUT))
    return path


def _new_head(debug_model_dir, **overrides):
    parts = load_base_model_parts(str(debug_model_dir))
    settings = {
        "hidden_size": parts.embeddings.shape[1],
        "vocab_size": parts.vocab_size,
        "mask_token_id": parts.vocab_size - 1,  # a token the tiny model does not output
        "block_length": BLOCK,
        "feature_layers": FEATURE_LAYERS,
        "num_target_layers": parts.num_hidden_layers,
        "base": parts,
        **overrides,
    }
    return build_head(**settings)


@pytest.fixture(scope="module")
def trained_head(base, debug_model_dir, prompts_file, tmp_path_factory):
    """A head fitted to the tiny model's answers, saved where `dmtp train` puts a final head."""
    head = _new_head(debug_model_dir)
    stop = eos_token_ids(base)
    answers = []
    for prompt in list(iter_prompts(prompts_file))[: len(QUESTIONS)]:
        ids = encode_prompt(prompt, base.tokenizer)
        answers.append(ids + greedy_decode(base.model, ids, 96, stop).tokens)
    fit_head(head, base.model, answers, TRAIN_STEPS)
    folder = tmp_path_factory.mktemp("run") / "final"
    head.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluation(trained_head, debug_model_dir, prompts_file, tmp_path_factory, monkeypatch_module):
    """`dmtp evaluate` of the head: greedy speculative decoding, as a user runs it."""
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    output = tmp_path_factory.mktemp("evaluation") / "results.json"
    config = EvalConfig(
        base_model_path=str(debug_model_dir),
        head_path=str(trained_head),
        input_data_path=str(prompts_file),
        max_new_tokens=MAX_NEW,
        prompt_lookup=True,
        device="cpu",
        dtype="float32",
        warmup_tokens=0,
        output=str(output),
    )
    evaluate(config, progress=False)
    return output


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def exported(trained_head, evaluation, tmp_path_factory):
    output = tmp_path_factory.mktemp("exports") / "tiny-dflash"
    argv = ["export", "--head_path", str(trained_head), "--format", "dflash"]
    argv += ["--output_dir", str(output), "--evaluation", str(evaluation)]
    assert dmtp_main(argv) == 0
    return output


def test_the_folder_is_the_dflash_layout_with_the_heads_tensors(exported, trained_head):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {
        "block_size": BLOCK,
        "mask_token_id": json.loads((trained_head / "config.json").read_text())["mask_token_id"],
        "target_layer_ids": [i - 1 for i in FEATURE_LAYERS],
    }
    assert config["num_target_layers"] == 2 and config["block_size"] == BLOCK
    assert config["tie_word_embeddings"] is False
    ours, theirs = (
        load_file(trained_head / "model.safetensors"),
        load_file(exported / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name


def test_dflash_generate_on_the_export_matches_dmtp_evaluate(
    dflash, exported, trained_head, evaluation, base, prompts_file
):
    """Same tokens as greedy decoding, and the rounds `dmtp evaluate` recorded, prompt by prompt."""
    draft = dflash.DFlashDraftModel.from_pretrained(exported).eval()
    assert draft.target_layer_ids == [i - 1 for i in FEATURE_LAYERS] and draft.block_size == BLOCK
    head = load_head(trained_head)
    head.attach_base(
        base.model.get_input_embeddings().weight, base.model.get_output_embeddings().weight
    )
    head.eval()
    records = json.loads(evaluation.read_text())["prompts"]
    stop = eos_token_ids(base)
    lengths: list[int] = []
    for prompt, record in zip(iter_prompts(prompts_file), records, strict=True):
        ids = encode_prompt(prompt, base.tokenizer)
        run = run_peers(dflash, draft, head, base.model, ids, record["max_new_tokens"], stop)
        assert run.dflash_tokens == run.greedy == run.dmtp.tokens
        aligned = run.dflash_lengths_aligned  # DFlash's rounds, cut where dmtp's stop (oracle)
        assert aligned == run.dmtp_lengths
        assert record["generated_tokens"] == len(run.greedy)
        assert record["drafters"]["head"]["rounds"] == len(aligned)
        assert record["drafters"]["head"]["committed"] == sum(aligned)
        lengths += aligned
    # The comparison means something only if the head drafts right and wrong.
    assert min(lengths) == 1 and max(lengths) >= BLOCK // 2 and len(set(lengths)) >= 3, lengths


def test_the_model_card_says_what_a_user_needs(exported, evaluation):
    card = (exported / "README.md").read_text()
    result = json.loads(evaluation.read_text())
    fingerprint = result["base_model"]["fingerprint"]
    tau = result["drafters"]["head"]["overall"]["tau"]
    assert f"`{fingerprint}`" in card
    assert f"| this head | {tau:.3f} |" in card and "| prompt lookup (no training) |" in card
    assert "--speculative-algorithm DFLASH" in card
    assert f"--speculative-draft-model-path {exported.resolve()}" in card
    assert '"method": "dflash"' in card and f'"model": "{exported.resolve()}"' in card
    # Feature layer 2 is the tiny model's final state after its final norm: served differently.
    assert "### Caveats" in card and "target_layer_id 1 is the base model's final state" in card


def test_a_bfloat16_export_loads_in_dflash(dflash, trained_head, tmp_path):
    output = tmp_path / "bf16"
    argv = ["export", "--head_path", str(trained_head), "--output_dir", str(output)]
    assert dmtp_main([*argv, "--dtype", "bfloat16"]) == 0
    draft = dflash.DFlashDraftModel.from_pretrained(output, dtype=torch.bfloat16)
    assert next(draft.parameters()).dtype == torch.bfloat16
    # An existing export is replaced only when asked.
    assert dmtp_main(argv) == 2
    assert dmtp_main([*argv, "--overwrite"]) == 0


# ----------------------------------------------------------------------------------------------
# refusals and bad input: one line, non-zero exit


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"draft_vocab": list(range(64))}, "draft vocabulary of 64 tokens"),
        ({"context_window": 1}, "last 1 context position"),
        ({"base": None, "base_model_identity": {"name_or_path": "x"}}, "owns its embedding"),
    ],
    ids=["draft_vocab", "context_window", "own_vocabulary"],
)
def test_heads_dflash_cannot_express_are_refused(
    debug_model_dir, tmp_path, capsys, overrides, reason
):
    head = _new_head(debug_model_dir, **overrides)
    head.save_pretrained(tmp_path / "final")
    assert dflash_problems(head.config)
    capsys.readouterr()  # saving prints a progress bar
    code = dmtp_main(
        ["export", "--head_path", str(tmp_path / "final"), "--output_dir", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and reason in err, err
    assert not (tmp_path / "out").exists()


def test_the_final_state_is_exported_with_a_caveat(debug_model_dir):
    final_state = _new_head(debug_model_dir).config
    inner_only = _new_head(debug_model_dir, feature_layers=[1]).config
    assert not dflash_problems(final_state) and not dflash_problems(inner_only)
    assert len(serving_caveats(final_state)) == 1 and serving_caveats(inner_only) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--head_path", "{tmp}/nowhere"], "head not found: {tmp}/nowhere"),
        (
            ["--head_path", "{tmp}", "--format", "eagle3"],
            "format must be one of dflash; got 'eagle3'",
        ),
        (["--head_path", "{tmp}"], "not a head folder (no config.json)"),
        (["--output_dir", "{tmp}/x"], "pass the head to export"),
    ],
    ids=["missing_folder", "wrong_format", "not_a_head", "no_head_path"],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    code = dmtp_main(["export", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("dmtp export: error: ") and message.format(tmp=tmp_path) in err, err


def test_the_flows_export_task_reports_a_refused_head_and_goes_on(debug_model_dir, tmp_path):
    """`make head`'s recipe (a draft vocabulary) has no DFlash export: the flow's task records why
    (for its cache and the flow's summary) instead of failing the run."""
    from tasks.export import REFUSED_FILE, export_head, export_problem
    from tasks.manifests import HeadManifest, ModelRef, StoreManifest

    run = tmp_path / "heads" / "tiny-qwen2-0"
    _new_head(debug_model_dir, draft_vocab=list(range(64))).save_pretrained(run / "final")
    head = HeadManifest(
        head_path=str(run / "final"),
        output_dir=str(run),
        mlflow_tracking_uri="sqlite:///unused.db",
        mlflow_run_id=None,
        mlflow_experiment="dmtp",
        nproc_per_node=1,
        seconds=1.0,
        log_path=str(run / "logs" / "train.log"),
    )
    store = StoreManifest(
        store_path=str(tmp_path / "store"),
        identity_sha256="0" * 64,
        model=ModelRef(requested=str(debug_model_dir), name="tiny-qwen2", fingerprint="f"),
        rows=1,
        sequences=1,
        bytes_on_disk=1,
        report_path=str(tmp_path / "validation.json"),
        shard_rows=[1],
    )
    manifest = export_head.fn(head, store, None, {"format": "dflash", "dtype": "auto"})
    assert not manifest.exported and "draft vocabulary of 64 tokens" in manifest.reason
    folder = run / "exports"
    [record] = folder.glob(f"dflash-*/{REFUSED_FILE}")
    assert manifest.reason in record.read_text()
    assert export_problem(record.parent) is None  # what a later run's cache hit checks
