"""`coconut-fast demo` in miniature: the summary it writes and prints, the message of a stage that did
not converge, the answer-time comparison of converged stages, and the parallel latent mode."""
import json
import os

import pytest
import torch

import coconut_fast.training.trainer as trainer_module
from coconut_fast import kernels
from coconut_fast.cli import main
from coconut_fast.data import load_records
from coconut_fast.demo import CONVERGED, DemoConfig, not_converged_message, run_demo, total_epochs
from coconut_fast.model import CoconutModel

pytestmark = pytest.mark.usefixtures("one_thread")

# one epoch of CoT, then the last (only) latent stage one epoch
MINIATURE = ["--train-records", "24", "--valid-records", "4", "--max-latent-stage", "1", "--epochs-per-stage", "1",
             "--last-stage-epochs", "1",
             "--batch-size", "8", "--hidden", "32", "--layers", "1", "--heads", "2",
             "--warmup-steps", "1", "--timing-batches", "2", "--threads", "1"]


def _demo(out, *extra):
    return main(["demo", "--out", str(out), *MINIATURE, *extra])


@pytest.fixture
def high_accuracy(monkeypatch):
    """The trainer's evaluation reports every held-out answer right (the generation itself still runs).

    The paged engine runs its torch kernels, as on a CPU without TRITON_INTERPRET (the interpreter is slow)."""
    monkeypatch.setattr(kernels, "triton_enabled", lambda: False)
    real = trainer_module.evaluate_generation

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "accuracy": 1.0}

    monkeypatch.setattr(trainer_module, "evaluate_generation", evaluate)


def test_miniature_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _demo(out) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in results["epochs"]] == [0, 1]
    for row in (results["cot"], results["coconut"]):
        assert 0.0 <= row["accuracy"] <= 1.0 and row["generated_tokens"] > 0 and row["num_samples"] == 4
    assert results["cot"]["accuracy"] == results["epochs"][0]["accuracy"]
    assert results["coconut"]["accuracy"] == results["epochs"][1]["accuracy"]
    assert (results["coconut"]["stage"], results["coconut"]["thoughts"]) == (1, 1)
    assert results["threads"] == 1 and results["torch"] == torch.__version__ and results["config"]["seed"] == 0
    assert "torch threads 1" in printed and "1 thread; trained in" in printed
    timing = results["timing"]
    assert timing["latent_mode"] == "sequential"
    assert len(timing["fast_losses"]) == len(timing["reference_losses"]) == 2
    for fast, ref in zip(timing["fast_losses"], timing["reference_losses"]):
        assert abs(fast - ref) <= 1e-5 * abs(ref)
    cm = CoconutModel.from_pretrained(out / "model")
    assert cm.latent_ids.latent == cm.tokenizer.convert_tokens_to_ids("<|latent|>")
    assert len(load_records(out / "prosqa_train.json")) == 24
    assert (out / "train" / "eval" / "epoch_2.json").is_file()
    # run again: the finished run is found and reported, not retrained
    assert _demo(out) == 0
    printed = capsys.readouterr().out
    assert "found a previous run" in printed
    again = json.loads((out / "results.json").read_text())
    assert again["epochs"] == results["epochs"] and again["coconut"]["accuracy"] == results["coconut"]["accuracy"]


def test_stages_that_did_not_converge_are_named_and_not_compared(tmp_path, capsys):
    # 24 questions seen once each cannot teach the task: both stages stay below the threshold
    out = tmp_path / "demo"
    assert _demo(out) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["cot"]["accuracy"] < CONVERGED and results["coconut"]["accuracy"] < CONVERGED
    assert results["converged"] == {"cot": False, "coconut": False} and results["answer_time"] is None
    assert f"CoT (stage 0) did not converge: {results['cot']['accuracy']:.1%} held-out accuracy after epoch 1" in printed
    assert "Coconut (stage 1) did not converge" in printed
    assert "Try more epochs (--epochs-per-stage, --last-stage-epochs)" in printed and "another --seed" in printed
    # no comparison as if it were a finding
    assert "CoT (stage 0, written steps)" not in printed and "answer time" not in printed


def test_not_converged_message_names_only_the_stage_below_the_threshold():
    results = {"cot": {"stage": 0, "epoch": 4, "accuracy": 0.99}, "coconut": {"stage": 1, "epoch": 5, "accuracy": 0.6},
               "converged": {"cot": True, "coconut": False}}
    message = not_converged_message(results)
    assert "Coconut (stage 1) did not converge: 60.0% held-out accuracy after epoch 5" in message
    assert "CoT" not in message.splitlines()[0] and len(message.splitlines()) == 3
    results["converged"]["coconut"] = True
    assert not_converged_message(results) == ""


def test_converged_stages_are_compared_with_their_answer_time(tmp_path, capsys, high_accuracy):
    out = tmp_path / "demo"
    assert _demo(out, "--answer-repeats", "2") == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["converged"] == {"cot": True, "coconut": True}
    assert "did not converge" not in printed
    rows = {line[:34].strip(): line[34:].split() for line in printed.splitlines()}
    assert rows["CoT (stage 0, written steps)"] == ["100.0%", f"{results['cot']['generated_tokens']:.1f}"]
    assert rows["Coconut (stage 1, 1 thought)"] == ["100.0%", f"{results['coconut']['generated_tokens']:.1f}"]
    answers = results["answer_time"]
    assert answers["questions"] == 4 and answers["repeats"] == 2
    for backend in ("torch", "paged"):
        for name, key in (("cot", "cot"), ("coconut", "coconut")):
            timed = answers[backend][name]
            assert len(timed["seconds"]) == 2 and timed["ms_per_question"] > 0
            # the timed model is the stage's own: it generates what the trainer's evaluation of that epoch did
            assert timed["generated_tokens"] == results[key]["generated_tokens"]
        row = next(line for line in printed.splitlines() if line.startswith(backend + " "))
        cot_ms, coconut_ms = answers[backend]["cot"]["ms_per_question"], answers[backend]["coconut"]["ms_per_question"]
        assert row.split()[1:3] == [f"{cot_ms:.2f}", f"{coconut_ms:.2f}"]
    assert answers["paged_kernels"] == "torch"
    assert "answer time: 4 held-out questions as one batch" in printed


def test_cot_answers_are_timed_on_the_stage_0_checkpoint(tmp_path, high_accuracy, monkeypatch):
    loaded = []
    real = CoconutModel.from_pretrained.__func__

    def from_pretrained(cls, source, *args, **kwargs):
        if isinstance(source, (str, os.PathLike)):  # the trainer wraps its in-memory model: not a load
            loaded.append(str(source))
        return real(cls, source, *args, **kwargs)

    monkeypatch.setattr(CoconutModel, "from_pretrained", classmethod(from_pretrained))
    run_demo(DemoConfig(out=str(tmp_path / "demo"), train_records=24, valid_records=4, epochs_per_stage=1,
                        last_stage_epochs=1, batch_size=8, hidden=32, layers=1, warmup_steps=1, timing_batches=1,
                        answer_repeats=1))
    assert loaded == [str(tmp_path / "demo" / "train" / "checkpoint_1")]


def test_miniature_demo_trains_parallel_thoughts(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _demo(out, "--latent-mode", "parallel", "--jacobi-iterations", "1") == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["latent_mode"] == "parallel" and [r["stage"] for r in results["epochs"]] == [0, 1]
    saved = json.loads((out / "train" / "checkpoint_2" / "trainer_state.json").read_text())["config"]
    assert (saved["latent_mode"], saved["jacobi_iterations"]) == ("parallel", 1)
    timing = results["timing"]
    assert timing["latent_mode"] == "parallel" and "stage 1 (parallel thoughts)" in printed
    # one Jacobi iteration is exact for one thought: the fast path's losses are the reference's
    for fast, ref in zip(timing["fast_losses"], timing["reference_losses"]):
        assert abs(fast - ref) <= 1e-5 * abs(ref)


def test_demo_epochs_train_each_stage(tmp_path):
    assert total_epochs(DemoConfig()) == 10  # the default: 8 epochs of CoT, 2 of the latent stage
    assert total_epochs(DemoConfig(epochs_per_stage=5)) == 7
    assert total_epochs(DemoConfig(epochs_per_stage=3, max_latent_stage=2, last_stage_epochs=1)) == 7
    assert total_epochs(DemoConfig(epochs_per_stage=3, num_epochs=5)) == 5
    with pytest.raises(ValueError, match=r"num_epochs \(2\) must exceed max_latent_stage x epochs_per_stage \(1 x 2\)"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), epochs_per_stage=2, num_epochs=2))
    with pytest.raises(ValueError, match=r"num_epochs \(5\) .* be at most 4, so that no epoch goes past it"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), epochs_per_stage=2, num_epochs=5))
    with pytest.raises(ValueError, match=r"last_stage_epochs must be in 1..epochs_per_stage \(1\), .* got 2"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), epochs_per_stage=1))
    with pytest.raises(ValueError, match="threads must be >= 0, got -1"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), threads=-1))
