"""Trainer keys from the README's table, each run and checked for its effect: gradient clipping, the
AdamW settings, step checkpoints, the train-log cadence, progress bars, and the tiny:* model ids."""
import csv
import math

import pytest
import torch

from coconut_fast.training import checkpoint as ckpt
from coconut_fast.training.trainer import Trainer
from training_setup import local_tokenizer, run_config, tiny_gpt2, tiny_records

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

TRAIN = tiny_records(8, seed=5)  # 2 optimizer steps per epoch in batches of 4
LONG_TRAIN = tiny_records(16, seed=7)  # 4 optimizer steps per epoch


def gpt2_trainer(config, records=TRAIN, val=None) -> Trainer:
    tok = local_tokenizer()
    return Trainer(config, model=tiny_gpt2(tok), tokenizer=tok, train_records=records, val_records=val)


def first_moment_norm(trainer) -> float:
    """The global norm of AdamW's exp_avg: (1 - beta1) times the gradient's norm after one step."""
    moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in moments])))


def test_max_grad_norm_clips_the_gradient_the_optimizer_steps_with(tmp_path, monkeypatch):
    calls, real_clip = [], torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = real_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters
                                                      if p.grad is not None]))
        calls.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    clipped = gpt2_trainer(run_config(tmp_path, name="clipped", max_grad_norm=0.05, stop_after_steps=1))
    clipped.run()
    assert len(calls) == 1
    max_norm, before, after = calls[0]
    assert max_norm == 0.05 and before > 10 * max_norm and after == pytest.approx(max_norm, rel=1e-4)
    # AdamW stepped with the clipped gradient: its first moment is (1 - 0.9) times the clipped norm
    assert first_moment_norm(clipped) == pytest.approx(0.1 * max_norm, rel=1e-4)
    # off (the default 0): no clipping, and the first moment carries the full norm of the same first batch
    free = gpt2_trainer(run_config(tmp_path, name="free", stop_after_steps=1))
    free.run()
    assert len(calls) == 1
    assert first_moment_norm(free) == pytest.approx(0.1 * before, rel=1e-4)


def test_adam_betas_and_eps_drive_the_adamw_step(tmp_path):
    b1, b2, eps = 0.8, 0.95, 1e-3
    trainer = gpt2_trainer(run_config(tmp_path, adam_betas=[b1, b2], adam_eps=eps, stop_after_steps=1))
    before = [p.detach().double().clone() for p in trainer.model.parameters()]
    trainer.run()
    group = trainer.optimizer.param_groups[0]
    assert tuple(group["betas"]) == (b1, b2) and group["eps"] == eps
    lr, wd = group["lr"], group["weight_decay"]
    assert (lr, wd) == (1e-3, 0.01)
    # one AdamW step from zero moments: exp_avg = (1 - b1) g, exp_avg_sq = (1 - b2) g^2, and after the bias
    # corrections p <- p (1 - lr wd) - lr g / (|g| + eps)
    for p0, p in zip(before, trainer.model.parameters()):
        state = trainer.optimizer.state[p]
        g = state["exp_avg"].double() / (1 - b1)
        torch.testing.assert_close(state["exp_avg_sq"].double(), (1 - b2) * g * g, rtol=1e-5, atol=1e-12)
        expected = p0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)


def test_save_every_steps_checkpoints_inside_epochs(tmp_path):
    result = gpt2_trainer(run_config(tmp_path, save_every_steps=3, val_loss=False), records=LONG_TRAIN).run()
    assert len(result["step_losses"]) == 8
    found = ckpt.list_checkpoints(tmp_path / "run")
    # global steps 3 and 6 fall inside epochs (3 and 2 micro-batches in); 4 and 8 end them
    assert [p.name for _, p, _ in found] == ["checkpoint_0_3", "checkpoint_1", "checkpoint_1_2", "checkpoint_2"]
    assert [ckpt.read_trainer_state(p)["global_step"] for _, p, _ in found] == [3, 4, 6, 8]
    assert [ckpt.read_trainer_state(p)["step_in_epoch"] for _, p, _ in found] == [3, 0, 2, 0]


def test_log_every_steps_sets_the_train_log_rows(tmp_path):
    result = gpt2_trainer(run_config(tmp_path, log_every_steps=3, val_loss=False), records=LONG_TRAIN).run()
    with open(tmp_path / "run" / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == [3, 6]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["loss"]) for r in rows] == pytest.approx([result["step_losses"][2], result["step_losses"][5]])


@pytest.mark.parametrize("bars", [True, False])
def test_progress_bars_key(tmp_path, capsys, bars):
    gpt2_trainer(run_config(tmp_path, progress_bars=bars, val_loss=False), val=tiny_records(2, seed=6)).run()
    err = capsys.readouterr().err
    shown = [desc in err for desc in ("epoch 1/2 stage 0", "epoch 2/2 stage 1", "eval stage 0", "eval stage 1")]
    assert shown == [bars] * 4, err[-500:]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_tiny_model_ids_build_and_train_their_family(tmp_path, family):
    tok = local_tokenizer()
    config = run_config(tmp_path, model_id=f"tiny:{family}", num_epochs=3, val_loss=False)
    trainer = Trainer(config, tokenizer=tok, train_records=TRAIN)
    model_config = trainer.coconut.model.config
    assert model_config.model_type == family
    assert (model_config.hidden_size, model_config.num_hidden_layers) == (32, 2)  # tiny_size reached the config
    assert trainer.coconut.model.get_input_embeddings().weight.shape[0] == len(trainer.tokenizer)
    losses = trainer.run()["step_losses"]
    assert len(losses) == 6 and all(math.isfinite(l) for l in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
