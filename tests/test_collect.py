"""dmtp collect on the tiny random Qwen2: what it stores is what the model computes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from dmtp.cli import main
from dmtp.collect import collect
from dmtp.config import CollectConfig, StoreLayout, default_feature_layers
from dmtp.errors import StoreError
from dmtp.store import LAYER_STATES, ROW_ARRAYS, decode_hidden_states, open_store
from dmtp.validate import validate_store

PROMPTS = [
    "Write a story about a lighthouse keeper.",
    "Explain attention.",
    "Please write an essay of 500 words about rivers, mountains and the history of the sea.",
    "Why do key-value caches make decoding faster?",
    "List ten cities.",
    "Describe the quick brown fox in detail, then the lazy dog, then both of them together.",
    "Hi",
    "Draft a short letter to a friend about speculative decoding.",
    "What is a diffusion head?",
    "Count from one to twenty.",
    "Summarise the plot of a novel about the sea in three sentences.",
]


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": p, "type": "test", "length": 100}) + "\n" for p in prompts)
    )
    return path


def config(model: Path, prompts: Path, out: Path, **overrides) -> CollectConfig:
    values = dict(
        base_model_path=str(model),
        input_data_path=str(prompts),
        output_dir=str(out),
        max_new_tokens=12,
        batch_size=4,
        device="cpu",
        dtype="float32",  # compared with a float32 forward below (auto is bf16 on some CPUs)
        layout=StoreLayout(chunk_rows=16, rows_per_file=64),
    )
    return CollectConfig(**{**values, **overrides})


def sequences(store_path: Path):
    """Yield (rows, hidden float tensor) for every stored sequence, in shard order."""
    store = open_store(store_path, require_complete=True)
    for shard in store.shards():
        offsets = shard.sequence_offsets()
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
            rows = shard.read_rows(int(start), int(stop))
            yield rows, decode_hidden_states(rows.hidden_states, store.hidden_dtype).float()


@pytest.mark.parametrize("engine", ["refill", "generate"])
def test_stored_states_and_tokens_equal_a_teacher_forced_forward(
    engine, debug_model_dir, tmp_path, monkeypatch
):
    if engine == "generate":  # the path for caches RefillGenerator cannot edit (sliding windows)
        monkeypatch.setattr("dmtp.collect.refill_supported", lambda model: False)
    result = collect(config(debug_model_dir, write_prompts(tmp_path / "p.jsonl"), tmp_path / "out"))
    assert result.complete and result.sequences == len(PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.float32).eval()
    n_generated = 0
    for rows, hidden in sequences(tmp_path / "out"):
        ids = torch.from_numpy(rows.input_ids.astype(np.int64))[None]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        torch.testing.assert_close(hidden, out.hidden_states[-1][0], atol=2e-4, rtol=1e-4)
        # greedy: every stored output token is the model's argmax at that position
        assert np.array_equal(rows.tokens, out.logits[0].argmax(-1).numpy())
        generated = np.flatnonzero(rows.is_generated[:-1])
        assert np.array_equal(rows.input_ids[generated + 1], rows.tokens[generated])
        n_generated += int(rows.is_generated.sum())
        assert len(np.unique(rows.sample_ids)) == 1
    assert n_generated > 0


def test_batch_size_does_not_change_what_is_stored(debug_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    collect(config(debug_model_dir, prompts, tmp_path / "b1", batch_size=1))
    collect(config(debug_model_dir, prompts, tmp_path / "b8", batch_size=8))
    # the order within a run of batches is the order answers ended in: compare by sample id
    by_sample = lambda path: sorted(sequences(path), key=lambda seq: int(seq[0].sample_ids[0]))  # noqa: E731
    pairs = list(zip(by_sample(tmp_path / "b1"), by_sample(tmp_path / "b8"), strict=True))
    assert len(pairs) == len(PROMPTS)
    for (rows1, hidden1), (rows8, hidden8) in pairs:
        assert np.array_equal(rows1.tokens, rows8.tokens)
        assert np.array_equal(rows1.input_ids, rows8.input_ids)
        torch.testing.assert_close(hidden1, hidden8, atol=2e-4, rtol=1e-4)


def test_bfloat16_states_are_stored_losslessly_as_uint16_bits(debug_model_dir, tmp_path):
    collect(
        config(
            debug_model_dir,
            write_prompts(tmp_path / "p.jsonl", PROMPTS[:3]),
            tmp_path / "out",
            dtype="bfloat16",
        )
    )
    store = open_store(tmp_path / "out")
    assert store.hidden_dtype == "bfloat16"
    shard = store.shard(0)
    assert shard.array("hidden_states").dtype == np.uint16
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.bfloat16).eval()
    rows = shard.read_rows(0, int(shard.sequence_offsets()[1]))
    stored = decode_hidden_states(rows.hidden_states, "bfloat16")
    assert stored.dtype == torch.bfloat16
    with torch.no_grad():
        expected = model(
            torch.from_numpy(rows.input_ids.astype(np.int64))[None], output_hidden_states=True
        ).hidden_states[-1][0]
    torch.testing.assert_close(stored.float(), expected.float(), atol=0.1, rtol=0.02)


def test_plain_text_documents_are_teacher_forced(debug_model_dir, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text(
        "The quick brown fox jumps over the lazy dog.\n\nA diffusion head predicts a block of tokens.\n"
    )
    collect(config(debug_model_dir, docs, tmp_path / "out"))
    store = open_store(tmp_path / "out", require_complete=True)
    assert store.attrs["collection"]["mode"] == "teacher_forced"
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.float32).eval()
    all_rows = list(sequences(tmp_path / "out"))
    assert sorted(int(r.sample_ids[0]) for r, _ in all_rows) == [0, 1]
    for rows, hidden in all_rows:
        assert not rows.is_generated.any()
        with torch.no_grad():
            out = model(
                torch.from_numpy(rows.input_ids.astype(np.int64))[None], output_hidden_states=True
            )
        torch.testing.assert_close(hidden, out.hidden_states[-1][0], atol=2e-4, rtol=1e-4)
        assert np.array_equal(rows.tokens, out.logits[0].argmax(-1).numpy())


def test_real_longwriter_prompts(debug_model_dir, longwriter_prompts, tmp_path):
    result = collect(
        config(
            debug_model_dir,
            longwriter_prompts,
            tmp_path / "out",
            max_new_tokens=4,
            max_samples=3,
            sample_size=128,
            stride=128,
        )
    )
    store = open_store(tmp_path / "out", require_complete=True)
    assert store.attrs["prompts_count"] == 60
    # it stops at the batch that reaches --max_samples: one batch of 4 LongWriter prompts here
    assert result.sequences == 4
    assert store.attrs["collection"]["sample_size"] == 128


def test_sharded_collection_skips_finished_shards(debug_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    collect(config(debug_model_dir, prompts, tmp_path / "out", num_shards=2, shard_index=0))
    store = open_store(tmp_path / "out")
    assert not store.complete and store.shard(0).complete and not store.has_shard(1)
    first_seconds = store.shard(0).attrs["seconds"]
    collect(config(debug_model_dir, prompts, tmp_path / "out", num_shards=2, resume=True))
    store = open_store(tmp_path / "out", require_complete=True)
    assert store.shard(0).attrs["seconds"] == first_seconds  # shard 0 was not redone
    ids = sorted(int(sid) for rows, _ in sequences(tmp_path / "out") for sid in rows.sample_ids[:1])
    assert ids == list(range(len(PROMPTS)))
    assert {int(s) % 2 for s in store.shard(1).read_rows(0, 10**9).sample_ids} == {1}


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dmtp.cli", "collect", *args]


def test_kill_minus_nine_then_resume_equals_an_uninterrupted_run(debug_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS * 2)
    common = collect_args(debug_model_dir, prompts)
    reference = tmp_path / "reference"
    subprocess.run(_cli([*common, "--output_dir", str(reference)]), check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _cli([*common, "--output_dir", str(killed)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shard_meta = killed / "collected_data_final" / "shards" / "0" / "zarr.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if shard_meta.exists():
            try:
                attrs = json.loads(shard_meta.read_text())["attributes"]
            except (ValueError, KeyError):
                attrs = {}
            if attrs.get("n_sequences", 0) >= 4:
                break
        time.sleep(0.005)
    assert process.poll() is None, "collection finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = open_store(killed)
    assert not interrupted.complete
    assert 0 < interrupted.shard(0).n_sequences < len(PROMPTS) * 2

    # without --resume an interrupted store is refused, and left as it was
    assert main(["collect", *common, "--output_dir", str(killed)]) == 2
    subprocess.run(
        _cli([*common, "--output_dir", str(killed), "--resume"]), check=True, capture_output=True
    )

    a, b = (
        open_store(reference, require_complete=True).shard(0),
        open_store(killed, require_complete=True).shard(0),
    )
    assert a.n_committed == b.n_committed and np.array_equal(
        a.sequence_offsets(), b.sequence_offsets()
    )
    assert open_store(reference).stored_layers == (1,)  # auto on the 2-layer model: (1, 2)
    for name in (*ROW_ARRAYS, LAYER_STATES):
        assert np.array_equal(a.array(name)[:], b.array(name)[:]), name


@pytest.mark.parametrize(
    "case",
    [
        "missing_file",
        "malformed_json",
        "empty_prompt",
        "prompt_too_long",
        "unknown_model",
        "other_configuration",
        "feature_layers_syntax",
        "feature_layers_range",
        "feature_layers_changed",
    ],
)
def test_bad_input_is_one_line_error_and_no_complete_store(case, debug_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "out"
    args = [
        "--base_model_path",
        str(debug_model_dir),
        "--input_data_path",
        str(prompts),
        "--output_dir",
        str(out),
        "--max_new_tokens",
        "4",
        "--device",
        "cpu",
    ]
    expected: str
    if case == "missing_file":
        args[3], expected = (
            str(tmp_path / "nope.jsonl"),
            f"input file not found: {tmp_path / 'nope.jsonl'}",
        )
    elif case == "malformed_json":
        prompts.write_text('{"prompt": "ok"}\n{"prompt": "fine"}\n{"prompt": "broken\n')
        expected = f"{prompts}:3: not valid JSON"
    elif case == "empty_prompt":
        prompts.write_text('{"prompt": "ok"}\n{"prompt": "   "}\n')
        expected = f"{prompts}:2: empty prompt"
    elif case == "prompt_too_long":
        prompts.write_text(
            json.dumps({"prompt": "ok"})
            + "\n"
            + json.dumps({"prompt": "lighthouse keeper " * 3000})
            + "\n"
        )
        expected = f"{prompts}:2: prompt is"
    elif case == "unknown_model":
        args[1], expected = str(tmp_path / "no-such-model"), "base model not found"
    elif case == "feature_layers_syntax":
        args += ["--feature_layers", "1;2"]
        expected = "feature_layers must be auto, none or a comma list of layer indices like 2,15,28; got '1;2'"
    elif case == "feature_layers_range":
        args += ["--feature_layers", "0,3"]
        expected = "feature_layers: layer 3 is out of range for a base model with 2 layers"
    elif case == "feature_layers_changed":
        assert main(["collect", *args, "--feature_layers", "1"]) == 0
        args += ["--feature_layers", "0"]
        expected = "feature_layers: stored [1], requested [0]"
    else:
        assert main(["collect", *args]) == 0
        args[-3], expected = "5", "max_new_tokens: stored 4, requested 5"
    capsys.readouterr()
    assert main(["collect", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dmtp collect: error: ") and expected in err[-1], err
    if case == "other_configuration":
        assert (
            open_store(out).attrs["collection"]["max_new_tokens"] == 4
        )  # the old store is untouched
    elif case == "feature_layers_changed":
        assert open_store(out, require_complete=True).stored_layers == (1,)
    else:
        assert not (out / "collected_data_final").exists() or not open_store(out).complete


# ----------------------------------------------------------------------------------------------
# feature layers (DESIGN §3): more base layers stored beside the final state


def test_default_feature_layers_are_dflash_layers_in_output_hidden_states_numbering():
    assert default_feature_layers(30) == (2, 15, 28)  # SmolLM2-135M
    assert default_feature_layers(28) == (2, 14, 26)  # Qwen2.5-7B: DFlash's [1, 13, 25] + 1
    assert default_feature_layers(36) == (2, 18, 34)  # Qwen3-8B: DFlash's [1, 17, 33] + 1
    assert default_feature_layers(2) == (1, 2)  # tiny models: clamped, never past the final state
    assert CollectConfig().resolve_feature_layers(30) == (2, 15, 28)
    assert CollectConfig(feature_layers="28, 2,15").resolve_feature_layers(30) == (2, 15, 28)


DOCUMENTS = (
    "The quick brown fox jumps over the lazy dog.\n\n"
    "A diffusion head predicts a block of tokens.\n\nShort.\n"
)


@pytest.mark.parametrize("mode", ["generated", "teacher_forced"])
def test_stored_feature_layers_equal_output_hidden_states(mode, debug_model_dir, tmp_path):
    if mode == "generated":
        inputs = write_prompts(tmp_path / "p.jsonl", PROMPTS[:6])
    else:
        inputs = tmp_path / "docs.txt"
        inputs.write_text(DOCUMENTS)
    collect(config(debug_model_dir, inputs, tmp_path / "out", feature_layers="0,2,1"))
    store = open_store(tmp_path / "out", require_complete=True)
    # layer 2 of this 2-layer model is the final state: stored once, as hidden_states
    assert store.attrs["feature_layers"] == [0, 1] and store.attrs["num_hidden_layers"] == 2
    assert store.feature_layers == (0, 1, 2)
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.float32).eval()
    n_generated = 0
    for shard in store.shards():
        offsets = shard.sequence_offsets()
        for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
            rows = shard.read_rows(start, stop)
            assert rows.layer_states.shape == (stop - start, 2, store.hidden_size)
            n_generated += int(rows.is_generated.sum())
            with torch.no_grad():
                out = model(
                    torch.from_numpy(rows.input_ids.astype(np.int64))[None],
                    output_hidden_states=True,
                )
            features = torch.from_numpy(shard.read_features(start, stop, [0, 1, 2]))
            for j, layer in enumerate([0, 1, 2]):
                torch.testing.assert_close(
                    features[:, j], out.hidden_states[layer][0], atol=2e-4, rtol=1e-4
                )
    assert (n_generated > 0) == (mode == "generated")
    assert validate_store(tmp_path / "out").ok


def test_feature_layers_none_stores_only_the_final_state(debug_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:3])
    collect(config(debug_model_dir, prompts, tmp_path / "none", feature_layers="none"))
    assert "x the final state, estimated" in capsys.readouterr().err
    store = open_store(tmp_path / "none", require_complete=True)
    shard = store.shard(0)
    assert LAYER_STATES not in shard.group and shard.read_rows(0, 5).layer_states is None
    assert store.attrs["feature_layers"] == [] and store.feature_layers == (2,)
    assert shard.read_features(0, 5, [2]).shape == (5, 1, store.hidden_size)
    with pytest.raises(
        StoreError, match=r"feature layer 1 is not stored; this store holds layers \[2\]"
    ):
        shard.read_features(0, 5, [1])

    collect(config(debug_model_dir, prompts, tmp_path / "auto"))
    assert "x the final state + 1 feature layers" in capsys.readouterr().err
    auto = open_store(tmp_path / "auto", require_complete=True)
    assert auto.feature_layers == (1, 2)
    # the final state is the same either way
    np.testing.assert_array_equal(
        auto.shard(0).read_features(0, 5, [2]), shard.read_features(0, 5, [2])
    )


def test_validate_finds_a_damaged_layer_states_chunk(debug_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:4])
    collect(config(debug_model_dir, prompts, tmp_path / "out", feature_layers="0,1"))
    store = tmp_path / "out" / "collected_data_final"
    path = store / "shards/0/layer_states/c/0/0/0"  # rows 0-63, inner chunk 0 = rows 0-15
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    report = validate_store(store)
    assert [(f.check, f.array, f.chunk, f.rows) for f in report.errors] == [
        ("checksum", "layer_states", "c/0/0/0#0", [0, 16])
    ]


# ----------------------------------------------------------------------------------------------
# refilled generation (dmtp.generation): rows freed by finished answers take the next prompts


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_refilled_generation_answers_as_generate_does(batch_size, debug_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from dmtp.generation import RefillGenerator

    monkeypatch.setattr("dmtp.generation.GROWTH_COLUMNS", 3)  # the KV buffers regrow often

    model = AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    settings = dict(batch_size=batch_size, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)
    # A frequent answer token as EOS, so answers end at different steps and rows refill mid-run.
    first = RefillGenerator(model, eos_token_ids=[], **settings).run(list(enumerate(prompts)))
    counts = np.bincount([t for answer in first for t in answer.new_tokens[1:]])
    eos = int(counts.argmax())
    generator = RefillGenerator(model, eos_token_ids=[eos], layers=(1,), **settings)
    answers = list(generator.run(list(enumerate(prompts))))
    assert sorted(a.item for a in answers) == list(range(len(PROMPTS)))
    lengths = {len(a.new_tokens) for a in answers}
    assert len(lengths) > 1 and min(lengths) < 10  # some ended early: refills happened
    for answer in answers:
        ids = torch.tensor(prompts[answer.item])[None]
        with torch.no_grad():
            expected = model.generate(
                ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )[0, ids.shape[1] :].tolist()
            while expected and expected[-1] == eos and expected.count(eos) > 1:
                expected.pop()  # generate pads a finished row with eos (pad_token_id) in a batch
            fed = torch.tensor(answer.prompt_ids + answer.new_tokens[:-1])[None]
            out = model(fed, output_hidden_states=True)
        assert answer.new_tokens == expected
        assert answer.states.shape == (fed.shape[1], 2, model.config.hidden_size)
        torch.testing.assert_close(
            answer.states[:, 0], out.hidden_states[-1][0], atol=2e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            answer.states[:, 1], out.hidden_states[1][0], atol=2e-4, rtol=1e-4
        )


def test_refilled_generation_stops_admitting_on_request(debug_model_dir):
    from transformers import AutoTokenizer

    from dmtp.generation import RefillGenerator

    model = AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    generator = RefillGenerator(
        model, batch_size=2, max_new_tokens=3, eos_token_ids=[], pad_token_id=0
    )
    finished: list[int] = []
    prompts = [(i, tokenizer(p)["input_ids"]) for i, p in enumerate(PROMPTS)]
    for answer in generator.run(prompts, stop_admitting=lambda: len(finished) >= 3):
        finished.append(answer.item)
    assert sorted(finished) == [0, 1, 2, 3]  # the two running when the third ended still finish


# ----------------------------------------------------------------------------------------------
# faults (issue 12): a second writer, SIGTERM, a full disk


def collect_args(debug_model_dir: Path, prompts: Path) -> list[str]:
    """Small batches and files, so a kill or a fault lands between many commits (with the fault
    tests' prompts: three runs of 8 batches of 2, so a SIGTERM can land between runs)."""
    return [
        "--base_model_path",
        str(debug_model_dir),
        "--input_data_path",
        str(prompts),
        "--device",
        "cpu",
        "--max_new_tokens",
        "32",
        "--batch_size",
        "2",
        "--chunk_rows",
        "8",
        "--rows_per_file",
        "32",
    ]


@pytest.fixture(scope="module")
def uninterrupted(debug_model_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """(flags, store) of a collection that ran start to end, for the fault tests to equal."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    args = collect_args(debug_model_dir, write_prompts(folder / "p.jsonl", PROMPTS * 3))
    subprocess.run(
        _cli([*args, "--output_dir", str(folder / "out")]), check=True, capture_output=True
    )
    return args, folder / "out"


def assert_same_store(reference: Path, other: Path) -> None:
    """Row for row, every array, and the same sequence boundaries."""
    a = open_store(reference, require_complete=True).shard(0)
    b = open_store(other, require_complete=True).shard(0)
    assert a.n_committed == b.n_committed
    assert np.array_equal(a.sequence_offsets(), b.sequence_offsets())
    for name in (*ROW_ARRAYS, LAYER_STATES):
        assert np.array_equal(a.array(name)[:], b.array(name)[:]), name


def error_lines(stderr: str) -> list[str]:
    """The error lines of a run's stderr (tqdm redraws with '\\r', so split on that too)."""
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_a_second_collect_into_the_same_store_exits_2_naming_the_holder(uninterrupted, tmp_path):
    args, reference = uninterrupted
    out = tmp_path / "out"
    # Started together, as in the issue (the second used to die with a zarr traceback).
    processes = [
        subprocess.Popen(
            _cli([*args, "--output_dir", str(out)]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(process, *process.communicate(timeout=300)) for process in processes]
    assert sorted(process.returncode for process in processes) == [0, 2]
    (winner, _, _), (_, _, stderr) = sorted(results, key=lambda r: r[0].returncode)
    assert "Traceback" not in stderr
    assert error_lines(stderr) == [stderr.strip().splitlines()[-1]]
    line = error_lines(stderr)[0]
    assert line.startswith(f"dmtp collect: error: shard 0 of {out / 'collected_data_final'} ")
    assert f"is being written by pid {winner.pid} on {socket.gethostname()} since 20" in line
    assert validate_store(out).ok
    assert_same_store(reference, out)
    assert not list((out / "leases").iterdir())  # the winner released its lease


@pytest.mark.parametrize("when", ["during_the_first_run", "during_the_second_run"])
def test_sigterm_exits_75_and_resume_equals_an_uninterrupted_run(when, uninterrupted, tmp_path):
    """SIGTERM for real: the runs finished so far are committed, the one in progress dropped."""
    args, reference = uninterrupted
    out = tmp_path / "out"
    process = subprocess.Popen(
        _cli([*args, "--output_dir", str(out)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    shard_meta = out / "collected_data_final" / "shards" / "0" / "zarr.json"
    # The first run's 16 answers are committed together, at the first file flush after it ends.
    wanted = 0 if when == "during_the_first_run" else 16
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(shard_meta.read_text())["attributes"]["n_sequences"] >= wanted:
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert process.poll() is None, "collection finished before SIGTERM could be sent"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr[-2000:]
    assert "Traceback" not in stderr
    assert error_lines(stderr) == [stderr.strip().splitlines()[-1]]
    assert error_lines(stderr)[0].startswith("dmtp collect: error: SIGTERM: stopped shard 0")
    assert error_lines(stderr)[0].endswith("rerun with --resume to continue")

    shard = open_store(out).shard(0)
    assert not shard.complete and shard.n_sequences == wanted
    report = validate_store(out)
    assert {finding.check for finding in report.errors} == {"incomplete"}, report.summary()
    subprocess.run(
        _cli([*args, "--output_dir", str(out), "--resume"]), check=True, capture_output=True
    )
    assert_same_store(reference, out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_full_disk_is_one_line_and_resume_after_freeing_space_completes(
    seed, uninterrupted, tmp_path, monkeypatch, capsys
):
    """ENOSPC from the store's file writes, from a random write on (the disk stays full)."""
    import errno
    import random

    from zarr.storage import _local

    args, reference = uninterrupted
    real_put, calls = _local._put, []
    monkeypatch.setattr(_local, "_put", lambda *a, **k: calls.append(1) or real_put(*a, **k))
    assert main(["collect", *args, "--output_dir", str(tmp_path / "counted")]) == 0
    full_from = random.Random(seed).randrange(len(calls))

    def full_put(*a, **k):
        if len(calls) >= full_from:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(1)
        return real_put(*a, **k)

    calls.clear()
    monkeypatch.setattr(_local, "_put", full_put)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["collect", *args, "--output_dir", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1, stderr[-2000:]
    line = error_lines(stderr)[0]
    assert line.startswith(f"dmtp collect: error: {out / 'collected_data_final'}")
    assert "No space left on device" in line and "MiB more (it holds" in line
    assert line.endswith("then rerun with --resume")
    assert not (out / "collected_data_final" / "zarr.json").exists() or not open_store(out).complete

    monkeypatch.setattr(_local, "_put", real_put)  # space freed
    assert main(["collect", *args, "--output_dir", str(out), "--resume"]) == 0
    assert validate_store(out).ok
    assert_same_store(reference, out)
