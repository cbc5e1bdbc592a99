"""The command line: data generation, statistics, and a miniature demo run end to end."""
import json

import pytest

from coconut_fast.cli import main
from coconut_fast.data import load_records
from coconut_fast.model import CoconutModel


def test_generate_data_and_stats(tmp_path, capsys):
    path = tmp_path / "train.json"
    assert main(["generate-data", "--n", "25", "--seed", "3", "--out", str(path)]) == 0
    records = load_records(path)
    assert len(records) == 25 and all(3 <= len(r["steps"]) <= 6 for r in records)
    capsys.readouterr()
    assert main(["stats", str(path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 25 and 3 <= stats["steps_mean"] <= 6


def test_miniature_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--train-records", "24", "--valid-records", "4", "--max-latent-stage", "1",
            "--epochs-per-stage", "1", "--batch-size", "8", "--hidden", "32", "--layers", "1", "--heads", "2",
            "--warmup-steps", "1", "--timing-batches", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "CoT (stage 0" in printed and "Coconut (stage 1, 1 thought)" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in results["epochs"]] == [0, 1]
    for row in (results["cot"], results["coconut"]):
        assert 0.0 <= row["accuracy"] <= 1.0 and row["generated_tokens"] > 0 and row["num_samples"] == 4
    assert results["cot"]["accuracy"] == results["epochs"][0]["accuracy"]
    timing = results["timing"]
    assert len(timing["fast_losses"]) == len(timing["reference_losses"]) == 2
    for fast, ref in zip(timing["fast_losses"], timing["reference_losses"]):
        assert abs(fast - ref) <= 1e-5 * abs(ref)
    cm = CoconutModel.from_pretrained(out / "model")
    assert cm.latent_ids.latent == cm.tokenizer.convert_tokens_to_ids("<|latent|>")
    assert len(load_records(out / "prosqa_train.json")) == 24
    assert (out / "train" / "eval" / "epoch_2.json").is_file()
    # run again: the finished run is found and reported, not retrained
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "found a previous run" in printed and "Coconut (stage 1, 1 thought)" in printed
    again = json.loads((out / "results.json").read_text())
    assert again["epochs"] == results["epochs"] and again["coconut"]["accuracy"] == results["coconut"]["accuracy"]


def test_demo_needs_a_latent_stage(tmp_path):
    from coconut_fast.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match=r"num_epochs \(2\) must exceed epochs_per_stage \(2\)"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), epochs_per_stage=2, num_epochs=2))
