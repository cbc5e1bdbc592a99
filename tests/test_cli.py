"""The command line: data generation, statistics, and a miniature demo run end to end."""
import json

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


def test_miniature_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--train-records", "24", "--valid-records", "4", "--max-latent-stage", "1",
            "--epochs-per-stage", "1", "--batch-size", "8", "--hidden", "32", "--layers", "1", "--heads", "2"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in results["stages"]] == [0, 1]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["generated_tokens"] > 0 for r in results["stages"])
    parity = results["parity"]
    assert abs(parity["fast_loss"] - parity["reference_loss"]) <= 1e-5 * abs(parity["reference_loss"])
    cm = CoconutModel.from_pretrained(out / "model")
    assert cm.latent_ids.latent == cm.tokenizer.convert_tokens_to_ids("<|latent|>")
    assert len(load_records(out / "prosqa_train.json")) == 24
