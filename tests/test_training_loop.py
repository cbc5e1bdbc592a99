"""The training loop: optimizer resets (official and per stage), weights loading, precision, options."""
import math

import pytest
import torch
from safetensors.torch import save_file

from coconut_fast.model import OFFICIAL_PREFIX
from coconut_fast.training import checkpoint as ckpt
from coconut_fast.training import train
from coconut_fast.training import evaluate as evaluate_module
from coconut_fast.training import trainer as trainer_module
from coconut_fast.training.trainer import build_model
from training_setup import local_tokenizer, run_config, tiny_gpt2, tiny_records

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

TRAIN, VAL = tiny_records(8, seed=5), tiny_records(2, seed=6)
STEPS = 2  # optimizer steps per epoch: 8 records, batches of 4


def run(config, **kw):
    tok = local_tokenizer()
    return train(config, model=tiny_gpt2(tok), tokenizer=tok, train_records=TRAIN, val_records=kw.get("val", VAL))


def optimizer_history(result):
    return [(e["stage"], e["optimizer_state_step"], e["optimizer_builds"]) for e in result["epochs"]]


@pytest.mark.parametrize("reset, at_stage_change, expected", [
    # official: a new AdamW at every epoch, so its step count restarts every epoch
    (True, False, [(0, STEPS, 1), (0, STEPS, 2), (1, STEPS, 3), (1, STEPS, 4)]),
    # the variant: a new AdamW only when the stage changes
    (True, True, [(0, STEPS, 1), (0, 2 * STEPS, 1), (1, STEPS, 2), (1, 2 * STEPS, 2)]),
    # no reset: one AdamW for the whole run
    (False, False, [(0, STEPS, 1), (0, 2 * STEPS, 1), (1, 3 * STEPS, 1), (1, 4 * STEPS, 1)]),
])
def test_optimizer_reset_rules(tmp_path, reset, at_stage_change, expected):
    config = run_config(tmp_path, num_epochs=4, epochs_per_stage=2, reset_optimizer=reset,
                        reset_optimizer_at_stage_change=at_stage_change, val_loss=False, eval_every_epochs=10)
    result = run(config, val=None)
    assert optimizer_history(result) == expected


def test_reset_rebuilds_the_moments(tmp_path):
    """After a reset the AdamW moments hold only the new epoch's gradients (not the previous epochs')."""
    base = dict(num_epochs=2, epochs_per_stage=2, val_loss=False)
    kept = run(run_config(tmp_path, name="kept", reset_optimizer=False, **base), val=None)
    reset = run(run_config(tmp_path, name="reset", reset_optimizer=True, **base), val=None)
    assert kept["step_losses"][:STEPS] == reset["step_losses"][:STEPS]  # the first epoch is the same
    a = torch.load(tmp_path / "kept" / "checkpoint_2" / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    b = torch.load(tmp_path / "reset" / "checkpoint_2" / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    assert int(a[0]["step"]) == 2 * STEPS and int(b[0]["step"]) == STEPS
    assert not torch.allclose(a[0]["exp_avg_sq"], b[0]["exp_avg_sq"])


def spy_training_sets(monkeypatch) -> dict:
    """Every epoch's training examples, with the tokenized records and latent ids they were built from."""
    seen, real = {}, trainer_module.build_training_set

    def spy(records, epoch, cfg, ids, rng):
        seen[epoch] = (records, real(records, epoch, cfg, ids, rng), ids)
        return seen[epoch][1]

    monkeypatch.setattr(trainer_module, "build_training_set", spy)
    return seen


@pytest.mark.parametrize("mode", ["cot", "no_thoughts", "no_cot"])
def test_no_thoughts_and_cot_modes_train(tmp_path, monkeypatch, mode):
    """Each mode trains on the official layout (never a latent or a marker) and its loss falls.

    cot: every step; no_thoughts: stage s drops the first s steps (all of them past max_latent_stage 1);
    no_cot: no step."""
    seen = spy_training_sets(monkeypatch)
    result = run(run_config(tmp_path, num_epochs=3, coconut=False, val_loss=False, **{mode: True}), val=None)
    assert sorted(seen) == [0, 1, 2]
    for epoch, (records, examples, ids) in seen.items():
        stage = epoch  # one epoch per stage
        assert any(len(r.steps) > 1 for r in records)  # so stage 1 of no_thoughts keeps a step and drops one
        for rec, ex in zip(records, examples):
            kept = {"cot": rec.steps, "no_cot": [], "no_thoughts": rec.steps[stage:] if stage <= 1 else []}[mode]
            target = [t for step in kept for t in step] + rec.answer
            assert ex["input_ids"] == rec.question + target, (mode, epoch, rec.idx)
            assert ex["labels"] == [-100] * len(rec.question) + target, (mode, epoch, rec.idx)
            assert not {ids.start, ids.latent, ids.end} & set(ex["input_ids"])
    losses = result["step_losses"]
    assert len(losses) == 3 * STEPS and all(math.isfinite(l) for l in losses)
    first, last = sum(losses[:STEPS]) / STEPS, sum(losses[-STEPS:]) / STEPS
    assert last < first - 0.15, losses  # about 6.0 falls to about 5.65 in 6 steps at lr 1e-3


def test_pure_bf16_and_autocast(tmp_path):
    pure = run(run_config(tmp_path, name="pure", num_epochs=1, bf16=True))
    weights = ckpt.read_weights(tmp_path / "pure" / "checkpoint_1")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # official bf16: the model itself is bf16
    mixed = run(run_config(tmp_path, name="mixed", num_epochs=1, bf16_autocast=True))
    weights = ckpt.read_weights(tmp_path / "mixed" / "checkpoint_1")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    fp32 = run(run_config(tmp_path, name="fp32", num_epochs=1))
    for other in (pure, mixed):  # bf16 losses follow the float32 ones to bf16 precision
        for a, b in zip(other["step_losses"], fp32["step_losses"]):
            assert abs(a - b) <= 0.05 * abs(b)
        assert other["step_losses"] != fp32["step_losses"]


def script_accuracy(monkeypatch, accuracies: list[float]) -> None:
    """The trainer's evaluations report `accuracies`, one per call, over the real generation's report."""
    scripted, real = iter(accuracies), evaluate_module.evaluate_generation

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "accuracy": next(scripted)}

    monkeypatch.setattr(trainer_module, "evaluate_generation", evaluate)


def test_debug_and_save_only_improve(tmp_path, monkeypatch):
    run(run_config(tmp_path, name="debug", debug=True))
    assert not ckpt.list_checkpoints(tmp_path / "debug")  # official: debug runs save nothing
    # saved only when the accuracy beats the best so far (which starts at 0): not on a tie, not on a fall
    accuracies = [0.0, 0.5, 0.5, 0.25, 0.75]
    script_accuracy(monkeypatch, accuracies)
    result = run(run_config(tmp_path, name="improve", save_only_improve=True, num_epochs=5, val_loss=False))
    assert [e["accuracy"] for e in result["epochs"]] == accuracies
    found = ckpt.list_checkpoints(tmp_path / "improve")
    assert [p.name for _, p, _ in found] == ["checkpoint_2", "checkpoint_5"]
    assert [ckpt.read_trainer_state(p)["best_acc"] for _, p, _ in found] == [0.5, 0.75]
    assert result["best_accuracy"] == 0.75
    # the same accuracies without save_only_improve: a checkpoint every epoch
    script_accuracy(monkeypatch, accuracies)
    run(run_config(tmp_path, name="every", num_epochs=5, val_loss=False))
    assert [p.name for _, p, _ in ckpt.list_checkpoints(tmp_path / "every")] == [f"checkpoint_{e}" for e in range(1, 6)]


def test_forward_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="forward_options: no_such_option: CoconutModel.forward does not take"):
        run(run_config(tmp_path, forward_options={"no_such_option": 1}))


def test_load_model_path_formats(tmp_path):
    tok = local_tokenizer()
    config = run_config(tmp_path)
    source = build_model(config, tiny_gpt2(tok, seed=1), tok)
    expected = source.model.state_dict()

    def check(weights, seed=2):
        fresh_tok = local_tokenizer()
        loaded = build_model(config, tiny_gpt2(fresh_tok, seed=seed), fresh_tok, weights=weights)
        for name, tensor in loaded.model.state_dict().items():
            assert torch.equal(tensor, expected[name]), (weights, name)

    # our safetensors file (tied lm_head stored once)
    state = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    check(tmp_path / "w.safetensors")
    # the official Coconut checkpoint: base_causallm.* keys plus embedding.weight
    official = {OFFICIAL_PREFIX + k: v for k, v in expected.items()}
    official["embedding.weight"] = expected["transformer.wte.weight"]
    torch.save(official, tmp_path / "checkpoint_7")
    check(tmp_path / "checkpoint_7")
    # a plain causal-LM state dict without the latent tokens (an official CoT run): loads first, then the
    # latent rows are copied from the "<<" row as the official runner does
    plain_tok = local_tokenizer()
    plain_model = tiny_gpt2(plain_tok, seed=3)
    torch.save(plain_model.state_dict(), tmp_path / "cot.pt")
    loaded = build_model(config, tiny_gpt2(local_tokenizer(), seed=4), local_tokenizer(), weights=tmp_path / "cot.pt")
    rows = loaded.model.get_input_embeddings().weight
    old = plain_model.get_input_embeddings().weight
    assert torch.equal(rows[: old.shape[0]], old)
    source_row = rows[loaded.tokenizer.convert_tokens_to_ids("<<")]
    assert torch.equal(rows[loaded.latent_ids.latent], source_row)
    with pytest.raises(ValueError, match="weights do not fit the model"):
        save_file({"nope": torch.zeros(2)}, tmp_path / "bad.safetensors")
        check(tmp_path / "bad.safetensors")


def test_auto_resume_from_an_official_checkpoint_file(tmp_path):
    """Like the official runner: a checkpoint_{n} file in the run directory restarts at epoch n."""
    tok = local_tokenizer()
    donor = build_model(run_config(tmp_path), tiny_gpt2(tok, seed=8), tok)
    official = {OFFICIAL_PREFIX + k: v for k, v in donor.model.state_dict().items()}
    official["embedding.weight"] = donor.model.get_input_embeddings().weight.detach()
    (tmp_path / "run").mkdir()
    torch.save(official, tmp_path / "run" / "checkpoint_1")
    result = run(run_config(tmp_path, num_epochs=2, val_loss=False))
    assert [e["epoch"] for e in result["epochs"]] == [2] and len(result["step_losses"]) == STEPS
    # the first step's loss is the donor's loss on that batch, not a fresh model's
    fresh = run(run_config(tmp_path, name="fresh", num_epochs=2, resume=1, val_loss=False))
    assert fresh["step_losses"][0] != result["step_losses"][0]


def test_forward_options_pass_through(tmp_path):
    """Chunked loss (the default), full logits, activation checkpointing and exact Jacobi train alike."""
    base = dict(num_epochs=2, max_latent_stage=2, val_loss=False, eval_every_epochs=10)
    runs = {
        "chunked": run(run_config(tmp_path, name="chunked", **base), val=None),
        "logits": run(run_config(tmp_path, name="logits", return_logits=True, **base), val=None),
        "checkpointed": run(run_config(tmp_path, name="ckpt", activation_checkpointing=True, **base), val=None),
        # stage 1 has one latent column: 1 Jacobi iteration is exact
        "jacobi": run(run_config(tmp_path, name="jacobi", latent_mode="parallel", jacobi_iterations=1, **base),
                      val=None),
    }
    reference = torch.tensor(runs["logits"]["step_losses"])
    assert len(reference) == 2 * STEPS
    for name, result in runs.items():
        torch.testing.assert_close(torch.tensor(result["step_losses"]), reference, rtol=1e-5, atol=1e-6,
                                   msg=name)
    with pytest.raises(ValueError, match="latent_mode: parallel needs jacobi_iterations"):
        run_config(tmp_path, latent_mode="parallel")


def test_tensorboard_is_optional(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            run(run_config(tmp_path, num_epochs=1, tensorboard=True))
    else:
        run(run_config(tmp_path, num_epochs=1, tensorboard=True))
        assert any((tmp_path / "run" / "tensorboard").iterdir())
