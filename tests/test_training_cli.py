"""`coconut-fast train CONFIG.yaml` end to end: checkpoints, evaluation JSON, CSV logs, only_eval,
auto-resume, and the same command under torchrun with two CPU processes."""
import csv
import json
import os
import subprocess
import sys

import pytest

from coconut_fast.cli import main
from coconut_fast.configs import config_path
from coconut_fast.data import answer_matches, load_records
from coconut_fast.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

# the bundled tiny.yaml, with a global batch of 8 as 2 accumulated micro-batches of 4
SINGLE = ["--set", "batch_size_training=4", "--set", "gradient_accumulation_steps=2"]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cwd = os.getcwd()
    os.chdir(root)  # tiny.yaml names its data and run directory relative to the working directory
    try:
        assert main(["generate-data", "--n", "16", "--seed", "0", "--out", "data/tiny_train.json"]) == 0
        assert main(["generate-data", "--n", "4", "--seed", "1", "--out", "data/tiny_valid.json"]) == 0
        assert main(["train", str(config_path("tiny.yaml")), *SINGLE]) == 0
    finally:
        os.chdir(cwd)
    return root


def test_train_writes_checkpoints_eval_and_logs(run_dir):
    save_dir = run_dir / "runs" / "tiny-coconut"
    assert [p.name for _, p, kind in ckpt.list_checkpoints(save_dir)] == ["checkpoint_1", "checkpoint_2"]
    assert ckpt.read_trainer_state(save_dir / "checkpoint_2")["global_step"] == 4  # 16 records / 8, two epochs
    train_log = rows(save_dir / "train_log.csv")
    assert [int(r["global_step"]) for r in train_log] == [1, 2, 3, 4]
    assert [int(r["stage"]) for r in train_log] == [0, 0, 1, 1]
    eval_log = rows(save_dir / "eval_log.csv")
    assert [(r["epoch"], r["stage"]) for r in eval_log] == [("1", "0"), ("2", "1")]
    val = load_records(run_dir / "data" / "tiny_valid.json")
    for epoch, row in zip((1, 2), eval_log):
        report = json.loads((save_dir / "eval" / f"epoch_{epoch}.json").read_text())
        correct = [answer_matches(s["text"], r["answer"]) for s, r in zip(report["samples"], val)]
        assert report["accuracy"] == sum(correct) / len(val) == float(row["accuracy"])
        assert report["num_samples"] == len(val) and report["val_loss"] == pytest.approx(float(row["val_loss"]))
        tokens = [s["generated_tokens"] for s in report["samples"]]
        assert report["generated_tokens"] == pytest.approx(sum(tokens) / len(tokens)) and 0 < max(tokens) <= 24


def test_only_eval_and_auto_resume(run_dir, capsys):
    save_dir = run_dir / "runs" / "tiny-coconut"
    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        capsys.readouterr()
        # nothing left to train: the newest checkpoint is found and the run ends at once
        assert main(["train", str(config_path("tiny.yaml")), *SINGLE]) == 0
        assert "resuming from runs/tiny-coconut/checkpoint_2" in capsys.readouterr().out
        assert len(rows(save_dir / "train_log.csv")) == 4
        # evaluate the last checkpoint at the stage of epoch 2 (resume: 1), as the official eval configs do
        assert main(["train", str(config_path("tiny.yaml")), "--set", "only_eval=true", "--set",
                     "load_model_path=runs/tiny-coconut/checkpoint_2", "--set", "resume=1"]) == 0
    finally:
        os.chdir(cwd)
    only = json.loads((save_dir / "eval" / "only_eval_stage1.json").read_text())
    trained = json.loads((save_dir / "eval" / "epoch_2.json").read_text())
    assert [s["text"] for s in only["samples"]] == [s["text"] for s in trained["samples"]]
    assert only["accuracy"] == trained["accuracy"]
    assert [p.name for _, p, _ in ckpt.list_checkpoints(save_dir)] == ["checkpoint_1", "checkpoint_2"]


def test_torchrun_two_processes_follow_the_single_run(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "coconut_fast", "train", str(config_path("tiny.yaml")), "--set", "name=tiny-ddp",
           "--set", "batch_size_training=4"]
    done = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = rows(run_dir / "runs" / "tiny-coconut" / "train_log.csv")
    ddp = rows(run_dir / "runs" / "tiny-ddp" / "train_log.csv")
    assert len(ddp) == len(single) == 4
    for a, b in zip(ddp, single):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert a["samples"] == b["samples"]  # samples counted over both ranks
    assert ckpt.latest_checkpoint(run_dir / "runs" / "tiny-ddp")[0].name == "checkpoint_2"
    assert done.stdout.count("last epoch:") == 1  # rank 0 reports


def test_config_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("coconut: True\nlearning_rate: 0.1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "coconut-fast train: error:" in err and "unknown config key(s): learning_rate" in err
    assert main(["train", str(config_path("tiny.yaml")), "--set", "lr"]) == 2
    assert "--set expects KEY=VALUE, got 'lr'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
