"""dmtp evaluate on the tiny random Qwen2: results, bad input caught before decoding, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmtp import evaluate as evaluate_module
from dmtp.cli import main
from dmtp.config import DEMO_EVAL_PROMPTS, EvalConfig
from dmtp.errors import DmtpError
from dmtp.evaluate import (
    LosslessnessError,
    check_lossless,
    evaluate,
    log_evaluation_to_mlflow,
    plot_evaluation,
)
from dmtp.head import MTPHeadConfig, MTPHeadModel, build_head, load_base_model_parts
from dmtp.prompts import iter_prompts
from dmtp.specdec import GreedyResult, SpecResult

BLOCK = 4
LAYERS = [1, 2]  # output_hidden_states indices of the 2-layer debug model
RECORDS = [
    {
        "prompt": "Write a story about a lighthouse keeper.",
        "type": "Literature",
        "length": 100,
        "category": "story",
    },
    {"turns": ["Explain attention and key-value caches.", "Now shorter."], "category": "science"},
    {
        "prompt": "Why do key-value caches make decoding faster?",
        "type": "Popular Science",
        "length": 50,
    },
]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture(scope="module")
def base_parts(debug_model_dir):
    return load_base_model_parts(str(debug_model_dir))


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, base_parts) -> Path:
    """An untrained head for the debug model, saved where `dmtp train` saves one."""
    output_dir = tmp_path_factory.mktemp("heads")
    (output_dir / "train_summary.json").write_text(
        json.dumps({"mlflow_run_id": "run-that-trained-it"})
    )
    path = output_dir / "final"
    V = base_parts.vocab_size
    build_head(
        hidden_size=64, vocab_size=V, mask_token_id=V - 1, block_length=BLOCK,
        feature_layers=LAYERS, num_target_layers=2, base=base_parts,
    ).save_pretrained(path)  # fmt: skip
    return path


def eval_config(model: Path, head: Path | None, prompts: Path, **overrides) -> EvalConfig:
    values = dict(
        base_model_path=str(model),
        head_path=None if head is None else str(head),
        input_data_path=str(prompts),
        max_new_tokens=20,
        device="cpu",
        warmup_tokens=4,
    )
    return EvalConfig(**{**values, **overrides})


def test_shipped_eval_prompts_are_held_out_and_categorised():
    prompts = list(iter_prompts(DEMO_EVAL_PROMPTS))
    assert len(prompts) >= 20
    assert all(p.messages and p.category for p in prompts)
    categories = {p.category for p in prompts}
    assert len(categories) >= 4
    # Round-robin order: `--max_prompts N` takes every category alike.
    assert {p.category for p in prompts[: len(categories)]} == categories
    train = DEMO_EVAL_PROMPTS.with_name("demo_train.jsonl")
    if train.exists():
        seen = {p.messages[0]["content"] for p in iter_prompts(train) if p.messages}
        assert not seen & {p.messages[0]["content"] for p in prompts}


@pytest.fixture(scope="module")
def evaluation(debug_model_dir, head_dir, prompts_file, tmp_path_factory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("eval") / "eval.json"
    result = evaluate(
        eval_config(debug_model_dir, head_dir, prompts_file, output=str(output)), progress=False
    )
    return result, output


def test_evaluate_reports_tau_acceptance_and_speed(evaluation):
    result, output = evaluation
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert result["schema"] == "dmtp.evaluation/1" and result["lossless"] is True
    assert result["head"]["block_length"] == BLOCK
    assert result["head"]["feature_layers"] == LAYERS and result["head"]["context_window"] is None
    assert result["head"]["mask_token_id"] == 319
    assert result["head"]["mlflow_run_id"] == "run-that-trained-it"
    assert set(result["drafters"]) == {"head", "prompt_lookup", "lookup_head", "lookup_and_head"}
    assert [p["category"] for p in result["prompts"]] == ["story", "science", "Popular Science"]
    lookup_drafts = EvalConfig.prompt_lookup_num_tokens  # lookup may draft past the head's block
    for name, figures in result["drafters"].items():
        overall = figures["overall"]
        drafts = BLOCK - 1 if name == "head" else lookup_drafts
        assert 1.0 <= overall["tau"] <= drafts + 1
        assert len(overall["acceptance_by_position"]) == drafts
        assert overall["generated_tokens"] == sum(p["generated_tokens"] for p in result["prompts"])
        assert overall["speedup"] == pytest.approx(overall["greedy_seconds"] / overall["seconds"])
        assert overall["draft_seconds"] + overall["base_seconds"] <= overall["seconds"] * 1.0001
        rounds = sum(p["drafters"][name]["rounds"] for p in result["prompts"])
        assert overall["rounds"] == rounds
        assert set(figures["by_category"]) == {"story", "science", "Popular Science"}
    assert result["drafters"]["head"]["overall"]["tau"] < 1.5  # untrained: drafts are guesses


def test_a_head_of_its_own_vocabulary_is_evaluated_too(debug_model_dir, prompts_file, tmp_path):
    """A head trained without a base model (the guide's §3.2: its own embedding, LM head and a
    mask row past the base vocabulary) drafts with its own weights, losslessly."""
    head = _save_head(tmp_path / "own", hidden_size=64, vocab_size=321, mask_token_id=320)
    config = eval_config(
        debug_model_dir, head, prompts_file, max_prompts=1, max_new_tokens=12, prompt_lookup=False
    )
    result = evaluate(config, progress=False)
    assert result["lossless"] is True and list(result["drafters"]) == ["head"]
    assert result["head"]["feature_layers"] == [-1] and result["head"]["mask_token_id"] == 320
    assert 1.0 <= result["drafters"]["head"]["overall"]["tau"] <= BLOCK


def test_cli_runs_the_prompt_lookup_baseline_alone(debug_model_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "pld.json"
    argv = ["evaluate", "--base_model_path", str(debug_model_dir), "--input-data-path", str(prompts_file),
            "--block_length", "3", "--prompt_lookup_num_tokens", "5", "--max_new_tokens", "16",
            "--device", "cpu", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        line.startswith("dmtp evaluate: prompt_lookup τ=")
        and "speedup" in line
        and "lossless on 3/3" in line
    )
    result = json.loads(output.read_text())
    assert list(result["drafters"]) == ["prompt_lookup"] and result["head"] is None
    # Up to 5 drafts a round, not block_length - 1: prompt lookup's own block.
    assert len(result["drafters"]["prompt_lookup"]["overall"]["acceptance_by_position"]) == 5


def _save_head(path: Path, **kwargs) -> Path:
    """A head of its own vocabulary (no base model to borrow from) unless `config` is given."""
    values = dict(block_length=BLOCK, feature_layers=[-1], num_target_layers=-1)
    build_head(**{**values, **kwargs}).save_pretrained(path)
    return path


def _save_borrowing_head(path: Path, **config) -> Path:
    """A head that borrows a base vocabulary, saved without needing that base model."""
    values = dict(hidden_size=64, block_length=BLOCK, feature_layers=LAYERS, num_target_layers=2)
    MTPHeadModel(MTPHeadConfig(**{**values, **config})).save_pretrained(path)
    return path


def _bad_inputs(
    tmp: Path, debug_model_dir: Path, head_dir: Path, base_parts
) -> dict[str, tuple[list[str], str]]:
    V = base_parts.vocab_size
    other_hidden = _save_head(tmp / "h32", hidden_size=32, vocab_size=V + 1, mask_token_id=V)
    other_vocab = _save_head(tmp / "v1000", hidden_size=64, vocab_size=1001, mask_token_id=1000)
    borrowed_vocab = _save_borrowing_head(tmp / "b1000", vocab_size=1000, mask_token_id=999)
    deeper_base = _save_borrowing_head(tmp / "deep", vocab_size=V, feature_layers=[2, 5])
    other_model = _save_head(
        tmp / "fp", hidden_size=64, vocab_size=V + 1, mask_token_id=V,
        base_model_identity={"name_or_path": "another-model", "fingerprint": "0" * 32},
    )  # fmt: skip
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((head_dir / "config.json").read_text())
    return {
        "hidden size": (["--head_path", str(other_hidden)], "head hidden_size 32 != base model's 64"),
        "vocabulary": (["--head_path", str(other_vocab)], "does not fit the base model's 320"),
        "borrowed vocabulary": (["--head_path", str(borrowed_vocab)], "(1000 tokens) does not fit the base model's 320"),
        "feature layers": (["--head_path", str(deeper_base)], "head reads feature layers [2, 5], but the base model has 2 layers"),
        "fingerprint": (["--head_path", str(other_model)], "trained for base model another-model"),
        "missing head": (["--head_path", str(tmp / "nope")], "head not found"),
        "missing weights": (["--head_path", str(no_weights)], "weights are missing"),
        "block length": (["--head_path", str(head_dir), "--block_length", "6"], "differs from the head's block_length 4"),
        "steps": (["--head_path", str(head_dir), "--denoising_steps", "4"], "exceeds the 3 masked positions"),
        "missing prompts": (["--head_path", str(head_dir), "--input_data_path", str(tmp / "none.jsonl")], "input file not found"),
    }  # fmt: skip


def test_bad_input_is_one_line_before_any_decoding(
    debug_model_dir, head_dir, prompts_file, base_parts, tmp_path, capsys, monkeypatch
):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started despite bad input")

    monkeypatch.setattr(evaluate_module, "decode_prompts", no_decoding)
    common = [
        "evaluate",
        "--base_model_path",
        str(debug_model_dir),
        "--input_data_path",
        str(prompts_file),
        "--device",
        "cpu",
    ]
    cases = _bad_inputs(tmp_path, debug_model_dir, head_dir, base_parts)
    capsys.readouterr()
    for case, (flags, message) in cases.items():
        assert main(common + flags) == 2, case
        # Other lines on stderr are transformers' weight-loading progress bars.
        errors = [
            line
            for line in capsys.readouterr().err.splitlines()
            if line.startswith("dmtp evaluate")
        ]
        assert len(errors) == 1 and errors[0].startswith("dmtp evaluate: error: "), (case, errors)
        assert message in errors[0], (case, errors)


def test_plain_documents_and_overlong_prompts_are_refused(debug_model_dir, head_dir, tmp_path):
    documents = tmp_path / "docs.txt"
    documents.write_text("A document to read.\n")
    with pytest.raises(DmtpError, match="docs.txt:1: a plain-text document"):
        evaluate(eval_config(debug_model_dir, head_dir, documents), progress=False)
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "lighthouse " * 3000}) + "\n")
    with pytest.raises(
        DmtpError, match="long.jsonl:1: prompt is .* no room in the model's context"
    ):
        evaluate(eval_config(debug_model_dir, head_dir, long_prompt), progress=False)


def test_a_mismatch_is_an_error_naming_the_token(debug_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    greedy = GreedyResult(tokens=[5, 6, 7, 8], seconds=1.0, margins=[3.0, 2.0, 0.01, 4.0])
    check_lossless(greedy, SpecResult(tokens=[5, 6, 7, 8]), "head", "p.jsonl:3", tokenizer)
    with pytest.raises(
        LosslessnessError, match=r"p.jsonl:3: head .* token 2: speculative 9 .* near-tie"
    ):
        check_lossless(greedy, SpecResult(tokens=[5, 6, 9, 8]), "head", "p.jsonl:3", tokenizer)
    with pytest.raises(LosslessnessError, match=r"token 1: .*\(not a near-tie"):
        check_lossless(greedy, SpecResult(tokens=[5, 1]), "head", "p.jsonl:3", tokenizer)
    with pytest.raises(LosslessnessError, match="token 3: speculative end of output"):
        check_lossless(greedy, SpecResult(tokens=[5, 6, 7]), "head", "p.jsonl:3", tokenizer)


def test_results_go_to_mlflow_with_json_and_plot(evaluation, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    result, _ = evaluation
    # A file store: the same client calls as sqlite, without ~10 s of schema migrations.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    png = plot_evaluation(result, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    training = client.create_run(client.create_experiment("train")).info.run_id
    linked = log_evaluation_to_mlflow(result, uri, linked_run_id=training)
    attached = log_evaluation_to_mlflow(result, uri, run_id=training)
    assert attached == training and linked != training

    for run_id in (linked, training):
        run = client.get_run(run_id)
        assert run.data.metrics["eval/head/tau"] == pytest.approx(
            result["drafters"]["head"]["overall"]["tau"]
        )
        assert (
            "eval/prompt_lookup/speedup" in run.data.metrics
            and "eval/head/acceptance_pos3" in run.data.metrics
        )
        assert "τ=" in run.data.tags["dmtp.evaluation"]
        assert {a.path for a in client.list_artifacts(run_id, "evaluation")} == {
            "evaluation/evaluation.json", "evaluation/evaluation.png"
        }  # fmt: skip
    assert client.get_run(linked).data.tags["dmtp.evaluates_run"] == training


def test_the_tree_takes_the_heads_alternatives_when_asked(
    debug_model_dir, head_dir, prompts_file, monkeypatch
):
    from dmtp.specdec import HeadDrafter

    asked, propose = [], HeadDrafter.propose

    def spy(self, context, alternatives=0):
        asked.append(alternatives)
        return propose(self, context, alternatives)

    monkeypatch.setattr(HeadDrafter, "propose", spy)
    config = eval_config(
        debug_model_dir, head_dir, prompts_file, max_prompts=1, head_alternatives=2,
        lookup_head=False, packed_linears=False,
    )  # fmt: skip
    result = evaluate(config, progress=False)
    assert result["lossless"] is True
    assert set(result["drafters"]) == {"head", "prompt_lookup", "lookup_and_head"}
    assert result["settings"]["head_alternatives"] == 2
    assert result["settings"]["packed_linears"] is False
    assert 2 in asked and 0 in asked  # the tree asked for two, the head alone for none
