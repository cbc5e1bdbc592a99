"""The trainer never loses or mixes up data: one trainer per run directory, a resumed run logs each step once,
bad data is an error before anything is built, and a checkpoint loads the model save_pretrained writes."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.cli import main
from coconut_fast.prompts import left_pad
from coconut_fast.training import RunLockedError, TrainConfig, Trainer, TrainingDataError
from coconut_fast.training import checkpoint as ckpt
from coconut_fast.training.run_lock import LOCK_FILE
from training_setup import run_config, tiny_records

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = tiny_records(12, seed=5)


def write_records(path, records):
    path.write_text(json.dumps(records))
    return str(path)


# ------------------------------------------------------------------ checkpoints and save_pretrained
def test_a_checkpoint_with_a_switch_head_loads_the_model_save_pretrained_writes(tmp_path):
    config = run_config(tmp_path, switch_head="mlp", num_epochs=1, progress_bars=False)
    trainer = Trainer(config, train_records=RECORDS[:8], val_records=RECORDS[8:])
    trainer.run()
    checkpoint = ckpt.latest_checkpoint(tmp_path / "run")[0]
    trainer.coconut.save_pretrained(tmp_path / "saved")
    from_checkpoint = CoconutModel.from_pretrained(checkpoint)
    from_saved = CoconutModel.from_pretrained(tmp_path / "saved")
    for loaded in (from_checkpoint, from_saved):
        assert loaded.switch_head is not None and loaded.switch_head.kind == "mlp"
        assert loaded.latent_ids == trainer.coconut.latent_ids
        for (name, a), b in zip(trainer.coconut.switch_head.state_dict().items(),
                                loaded.switch_head.state_dict().values()):
            assert torch.equal(a, b), name
        for (name, a), b in zip(from_saved.model.state_dict().items(), loaded.model.state_dict().values()):
            assert torch.equal(a, b), name
    ids, mask = left_pad([r.question for r in trainer.val_tok], from_saved.tokenizer.pad_token_id)
    outputs = [m.generate(ids, mask, num_thoughts="auto", max_thoughts=3, max_new_tokens=4,
                          return_dict_in_generate=True) for m in (from_checkpoint, from_saved)]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert torch.equal(outputs[0].num_thoughts, outputs[1].num_thoughts)


# ------------------------------------------------------------------ one trainer per run directory
def test_a_second_trainer_on_the_same_run_is_refused_and_names_the_first(tmp_path):
    config = run_config(tmp_path, num_epochs=1, progress_bars=False)
    first = Trainer(config, train_records=RECORDS[:8], val_records=RECORDS[8:])
    with pytest.raises(RunLockedError, match=rf"in use by another trainer \(pid {os.getpid()} on "):
        Trainer(config, train_records=RECORDS[:8], val_records=RECORDS[8:])
    first.run()  # gives the directory up when it ends
    second = Trainer(config, train_records=RECORDS[:8], val_records=RECORDS[8:])
    second.close()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from coconut_fast.training.run_lock import RunLock; "
         "RunLock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = run_config(tmp_path, num_epochs=1, progress_bars=False)
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid} "):
            Trainer(config, train_records=RECORDS[:8], val_records=RECORDS[8:])
        assert not list(run_dir.glob("*log.csv"))  # the refused trainer wrote nothing
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        trainer = Trainer(config, train_records=RECORDS[:8], val_records=RECORDS[8:])
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        trainer.close()
    finally:
        holder.kill()
        holder.wait(30)


def test_cli_reports_a_locked_run_in_one_line(tmp_path, capsys):
    data = write_records(tmp_path / "train.json", RECORDS)
    config = tmp_path / "run.yaml"
    config.write_text(f"save_path: {tmp_path}\nname: run\ncoconut: true\nmax_latent_stage: 1\ntrain_path: {data}\n"
                      "num_epochs: 1\nbatch_size_training: 4\nprogress_bars: false\ntiny_size: {hidden: 32}\n")
    (tmp_path / "run").mkdir()
    from coconut_fast.training.run_lock import RunLock

    with RunLock.acquire(tmp_path / "run"):
        assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another trainer" in err[0]


# ------------------------------------------------------------------ resume
def test_a_resumed_run_logs_each_step_once(tmp_path):
    values = dict(num_epochs=2, batch_size_training=2, save_every_steps=2, progress_bars=False, max_new_tokens=4)
    Trainer(run_config(tmp_path, **values), train_records=RECORDS[:8], val_records=RECORDS[8:10]).run()
    run_dir = tmp_path / "run"
    steps = [int(r["global_step"]) for r in csv.DictReader(open(run_dir / "train_log.csv"))]
    assert steps == list(range(1, 9))  # 4 steps per epoch
    # a crash after step 8 was logged, before its checkpoint was published: the newest left is checkpoint_1_2
    # (two micro-batches into the second epoch, step 6), so the resumed run logs steps 7 and 8 again
    shutil.rmtree(run_dir / "checkpoint_2")
    assert ckpt.latest_checkpoint(run_dir)[0].name == "checkpoint_1_2"
    Trainer(run_config(tmp_path, **values), train_records=RECORDS[:8], val_records=RECORDS[8:10]).run()
    steps = [int(r["global_step"]) for r in csv.DictReader(open(run_dir / "train_log.csv"))]
    assert steps == list(range(1, 9))
    evals = [int(r["epoch"]) for r in csv.DictReader(open(run_dir / "eval_log.csv"))]
    assert evals == [1, 2]


# ------------------------------------------------------------------ data and config errors
def test_data_files_are_checked_before_the_run_directory_or_the_model_exists(tmp_path, monkeypatch):
    import coconut_fast.training.trainer as trainer_module

    built = []
    monkeypatch.setattr(trainer_module, "build_model", lambda *a, **k: built.append(1))
    missing = run_config(tmp_path, train_path=str(tmp_path / "nope.json"))
    with pytest.raises(TrainingDataError, match=r"train_path '.*nope\.json': no such file"):
        Trainer(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"question\": 1")
    with pytest.raises(TrainingDataError, match=r"train_path '.*bad\.json': "):
        Trainer(run_config(tmp_path, train_path=str(bad)))
    no_val = run_config(tmp_path, train_path=write_records(tmp_path / "t.json", RECORDS),
                        val_path=str(tmp_path / "v.json"))
    with pytest.raises(TrainingDataError, match=r"val_path '.*v\.json': no such file"):
        Trainer(no_val)
    assert not (tmp_path / "run").exists() and not built


def test_cli_names_a_missing_data_file_in_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"save_path: {tmp_path}\nname: run\ncoconut: true\ntrain_path: {tmp_path}/missing.json\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.json': no such file" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


def test_a_record_longer_than_the_context_is_named_before_training(tmp_path):
    records = [dict(r) for r in RECORDS[:8]]
    records[5]["question"] = " ".join(["word"] * 300)
    config = run_config(tmp_path, num_epochs=1, progress_bars=False)
    with pytest.raises(TrainingDataError, match=r"training record 5: \d+ tokens at stage 0 \(question \d+ tokens\) "
                                                r"exceed the model's context of 256 positions"):
        Trainer(config, train_records=records, val_records=RECORDS[8:])
    assert not (tmp_path / "run" / "train_log.csv").exists()
    val = [dict(RECORDS[8], question=" ".join(["word"] * 300))]
    with pytest.raises(TrainingDataError, match=r"validation record 0: .*more than the model's context of 256"):
        Trainer(config, train_records=RECORDS[:8], val_records=val)
    # the lock of a refused run is released: a corrected run starts
    Trainer(config, train_records=RECORDS[:8], val_records=RECORDS[8:]).close()


@pytest.mark.parametrize("key, value", [("lr", ".nan"), ("lr", ".inf"), ("weight_decay", ".nan"),
                                        ("switch_loss_weight", ".nan"), ("max_grad_norm", "-.inf")])
def test_non_finite_numbers_are_rejected(tmp_path, key, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(ValueError, match=rf"{key} must be a finite number"):
        TrainConfig.from_yaml(path)
