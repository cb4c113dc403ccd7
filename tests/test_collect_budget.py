"""Fixed-size shards (`--prompts_per_shard`): a larger `--num_shards` is a larger data budget that
adds shards to the same store and recollects none of those it has."""

from __future__ import annotations

import numpy as np

from dmtp.cli import main
from dmtp.collect import collect, shard_prompts
from dmtp.store import ROW_ARRAYS, open_store
from tests.test_collect import PROMPTS, config, write_prompts


def test_fixed_shards_hold_consecutive_prompts(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    shards = [
        [p.index for p in shard_prompts(prompts, 2, k, prompts_per_shard=4)] for k in range(3)
    ]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    # the same prompts whatever the number of shards asked for
    assert [p.index for p in shard_prompts(prompts, 9, 1, prompts_per_shard=4)] == shards[1]


def test_a_larger_budget_adds_shards_and_keeps_the_collected_ones(debug_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    collect(config(debug_model_dir, prompts, grown, num_shards=1, prompts_per_shard=4))
    small = open_store(grown / "collected_data_final")
    assert small.complete and small.num_shards == 1
    first_files = {
        p: p.stat().st_mtime_ns for p in (small.path / "shards" / "0").rglob("*") if p.is_file()
    }

    collect(config(debug_model_dir, prompts, grown, num_shards=3, prompts_per_shard=4))
    collect(config(debug_model_dir, prompts, fresh, num_shards=3, prompts_per_shard=4))
    large, reference = (
        open_store(grown / "collected_data_final"),
        open_store(fresh / "collected_data_final"),
    )
    assert large.complete and large.num_shards == 3
    assert large.n_sequences == len(PROMPTS)
    # shard 0 was not written again
    assert {p: p.stat().st_mtime_ns for p in first_files} == first_files
    for k in range(3):
        a, b = large.shard(k), reference.shard(k)
        for name in ROW_ARRAYS:
            np.testing.assert_array_equal(
                a.array(name)[: a.n_committed],
                b.array(name)[: b.n_committed],
                err_msg=f"{k}/{name}",
            )
    # a smaller budget later reads the same, larger store
    result = collect(config(debug_model_dir, prompts, grown, num_shards=2, prompts_per_shard=4))
    assert result.complete and open_store(grown / "collected_data_final").num_shards == 3


def test_a_budget_past_the_prompts_is_a_one_line_error(debug_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl")
    code = main(
        [
            "collect", f"--base_model_path={debug_model_dir}", f"--input_data_path={prompts}",
            f"--output_dir={tmp_path / 'out'}", "--num_shards=4", "--prompts_per_shard=4",
            "--device=cpu", "--max_new_tokens=4",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "at most 3 shards" in err[0]
    assert not (tmp_path / "out" / "collected_data_final").exists()
