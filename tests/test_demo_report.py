"""What `make demo` prints last: where everything is, and the figures of every drafter."""

from __future__ import annotations

from flows.demo import report


def test_the_report_names_the_export_registered_model_artifacts_and_every_drafter(tmp_path):
    summary = {
        "model": "SmolLM2-135M-Instruct",
        "store": str(tmp_path / "store"),
        "store_rows": 5003,
        "store_sequences": 48,
        "cached": {"collect": True, "validate": True, "train": False, "evaluate": False},
        "head": str(tmp_path / "head"),
        "export": str(tmp_path / "head" / "exports" / "dflash-1234"),
        "metrics": {"val/tau": 1.25, "val/loss": 3.0},
        "acceptance_length": 1.31,
        "speedup": 0.81,
        "prompt_lookup_acceptance_length": 1.27,
        "drafters": {
            "head": {"tau": 1.31, "speedup": 0.81, "tokens_per_second": 12.0},
            "prompt_lookup": {"tau": 1.27, "speedup": 1.1, "tokens_per_second": 17.0},
            "lookup_head": {"tau": 1.52, "speedup": 1.02, "tokens_per_second": 15.0},
            "lookup_and_head": {"tau": 1.71, "speedup": 1.09, "tokens_per_second": 16.0},
        },
        "evaluation": str(tmp_path / "evaluation.json"),
        "registered_model_name": "dmtp-SmolLM2-135M-Instruct",
        "registered_model_version": "3",
        "artifacts": {"table": "dmtp-demo-evaluation", "link": "dmtp-demo-mlflow-run"},
    }
    text = report(summary, 174.0)
    assert text.startswith("dmtp demo: finished in 2.9 min (cached: collect, validate)")
    assert f"export      {summary['export']}" in text
    assert "head τ=1.31, speedup 0.81x vs greedy; prompt lookup τ=1.27, speedup 1.10x" in text
    assert "lookup+head τ=1.52, speedup 1.02x; lookup&head (tree) τ=1.71, speedup 1.09x" in text
    assert "registered  model dmtp-SmolLM2-135M-Instruct version 3" in text
    assert "artifacts dmtp-demo-evaluation, dmtp-demo-mlflow-run" in text
