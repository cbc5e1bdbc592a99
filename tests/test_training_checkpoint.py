"""Checkpoints: exact resume (mid-epoch too), newest complete checkpoint found, atomic writes."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from coconut_fast.training import checkpoint as ckpt
from coconut_fast.training import train
from coconut_fast.training.distributed import DistContext
from coconut_fast.training.trainer import build_model
from training_setup import local_tokenizer, run_config, tiny_gpt2, tiny_records

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

TRAIN, VAL = tiny_records(16, seed=3), tiny_records(3, seed=4)


def resume_config(tmp_path, name, **over):
    # 8 micro-batches of 2, accumulated in pairs: 4 optimizer steps per epoch, 12 in all; stages 0, 0, 1
    values = dict(num_epochs=3, epochs_per_stage=2, max_latent_stage=2, pad_latent_to_max=False, uniform_prob=0.3,
                  batch_size_training=2, gradient_accumulation_steps=2, reset_optimizer=True,
                  reset_optimizer_at_stage_change=True, lr_scheduler="cosine", warmup_steps=2, eval_batch_size=2,
                  max_new_tokens=4)
    return run_config(tmp_path, name=name, **{**values, **over})


def run(config, seed):
    tok = local_tokenizer()
    # dropout makes the torch RNG state matter; the model's own init is overwritten on resume
    return train(config, model=tiny_gpt2(tok, seed=seed, dropout=0.1), tokenizer=tok, train_records=TRAIN,
                 val_records=VAL)


def weights(path):
    return load_file(path / ckpt.WEIGHTS_FILE)


def test_resume_mid_epoch_gives_identical_weights(tmp_path):
    straight = run(resume_config(tmp_path, "straight"), seed=0)
    assert len(straight["step_losses"]) == 12

    first = run(resume_config(tmp_path, "split", stop_after_steps=6), seed=0)
    assert first["stopped_early"] and first["global_step"] == 6
    save_dir = tmp_path / "split"
    assert ckpt.latest_checkpoint(save_dir) == (save_dir / "checkpoint_1_4", "full")  # 4 micro-batches into epoch 2
    # debris a crash could leave: a temporary directory and a checkpoint directory without its state file
    (save_dir / ".tmp-checkpoint_3").mkdir()
    (save_dir / ".tmp-checkpoint_3" / "model.safetensors").write_bytes(b"partial")
    (save_dir / "checkpoint_2").mkdir()
    (save_dir / "checkpoint_2" / "model.safetensors").write_bytes(b"partial")

    # a fresh start in the same process state as a new one: other seeds everywhere, another model init
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    second = run(resume_config(tmp_path, "split"), seed=7)
    assert second["step_losses"] == straight["step_losses"][6:]
    final_a, final_b = weights(tmp_path / "straight" / "checkpoint_3"), weights(save_dir / "checkpoint_3")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    assert [e["accuracy"] for e in second["epochs"]] == [e["accuracy"] for e in straight["epochs"][1:]]
    assert [e["val_loss"] for e in second["epochs"]] == [e["val_loss"] for e in straight["epochs"][1:]]
    # the incomplete checkpoint_2 was replaced by a complete one
    assert (save_dir / "checkpoint_2" / ckpt.STATE_FILE).is_file()
    state = ckpt.read_trainer_state(save_dir / "checkpoint_3")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (3, 0, 12)


def test_resume_at_an_epoch_boundary_and_after_the_end(tmp_path):
    straight = run(resume_config(tmp_path, "straight", num_epochs=2), seed=0)
    first = run(resume_config(tmp_path, "split", num_epochs=2, stop_after_steps=4), seed=0)
    assert first["stopped_early"]
    second = run(resume_config(tmp_path, "split", num_epochs=2), seed=5)
    assert second["step_losses"] == straight["step_losses"][4:]
    for name, tensor in weights(tmp_path / "straight" / "checkpoint_2").items():
        assert torch.equal(tensor, weights(tmp_path / "split" / "checkpoint_2")[name]), name
    again = run(resume_config(tmp_path, "split", num_epochs=2), seed=5)  # nothing left to do
    assert again["epochs"] == [] and again["global_step"] == 4 + len(second["step_losses"])


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    for name in ("checkpoint_2", "checkpoint_10", "checkpoint_10_3", "checkpoint_9_7"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint_11").mkdir()  # no trainer_state.json: incomplete
    (tmp_path / ".tmp-checkpoint_12").mkdir()
    (tmp_path / ".tmp-checkpoint_12" / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint_x").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == (tmp_path / "checkpoint_10_3", "full")
    (tmp_path / "checkpoint_13").write_bytes(b"torch.save of the official runner")
    assert ckpt.latest_checkpoint(tmp_path) == (tmp_path / "checkpoint_13", "official")
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    tok = local_tokenizer()
    coconut = build_model(run_config(tmp_path), tiny_gpt2(tok), tok)
    optimizer = torch.optim.AdamW(coconut.parameters())
    coconut(**{k: torch.tensor([v]) for k, v in {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}.items()}).loss.backward()
    optimizer.step()
    ctx = DistContext()
    good = ckpt.save_checkpoint(tmp_path, "checkpoint_1", coconut, optimizer, {"epoch": 1}, ctx)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with torch.no_grad():
        for p in coconut.parameters():
            p.add_(1.0)
    for name in ("checkpoint_2", "checkpoint_1"):  # a new name, and overwriting the existing one
        with pytest.raises(OSError, match="disk full"):
            ckpt.save_checkpoint(tmp_path, name, coconut, optimizer, {"epoch": 2}, ctx)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1"]
        assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert ckpt.latest_checkpoint(tmp_path) == (good, "full")
    assert json.loads((good / ckpt.STATE_FILE).read_text()) == {"epoch": 1}


def test_checkpoint_contents_load_back(tmp_path):
    tok = local_tokenizer()
    coconut = build_model(run_config(tmp_path), tiny_gpt2(tok, seed=2), tok)
    optimizer = torch.optim.AdamW(coconut.parameters(), lr=0.1)
    coconut(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss.backward()
    optimizer.step()
    torch.manual_seed(11)
    path = ckpt.save_checkpoint(tmp_path, "checkpoint_1_2", coconut, optimizer, {"epoch": 1}, DistContext())
    expected_draw = torch.rand(3)
    # weights: HF names, tied embedding stored once, loadable by CoconutModel.from_pretrained
    saved = weights(path)
    assert "lm_head.weight" not in saved and "transformer.wte.weight" in saved
    from coconut_fast import CoconutModel

    loaded = CoconutModel.from_pretrained(path)
    for name, tensor in coconut.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.latent_ids == coconut.latent_ids
    # optimizer state and random state
    fresh = torch.optim.AdamW(loaded.parameters(), lr=0.1)
    ckpt.load_optimizer_state(loaded, fresh, path)
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ckpt.load_rng_state(path, rank=0)
    assert torch.equal(torch.rand(3), expected_draw)


def test_mid_epoch_resume_refuses_another_data_order(tmp_path):
    state = {"epoch": 1, "step_in_epoch": 2, "global_step": 5, "best_acc": 0.0, "optimizer_stage": 0,
             "epoch_loss_sums": [1.0, 1], "world_size": 1, "batch_size_training": 2,
             "gradient_accumulation_steps": 2, "seed": 0, "shuffle": True}
    (tmp_path / "run" / "checkpoint_1_2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint_1_2" / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="cannot resume mid-epoch .*batch_size_training changed"):
        run(resume_config(tmp_path, "run", batch_size_training=4), seed=0)
