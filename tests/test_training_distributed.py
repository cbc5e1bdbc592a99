"""Two CPU processes (gloo): DDP and FSDP2 follow one process with the same global batch; evaluation
keeps both ranks' forward calls in step; an FSDP2 run resumes exactly."""
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from coconut_fast.training import train
from training_setup import local_tokenizer, run_config, tiny_gpt2, tiny_records

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

TRAIN, VAL = tiny_records(16, seed=21), tiny_records(5, seed=22)  # 5 questions: 3 on rank 0, 2 on rank 1
WORLD = 2
TIMEOUT_S = 240


def dist_config(tmp_path, name, world, **over):
    # global batch of 4 = 2 per rank x 2 ranks, or 2 x 2 accumulated micro-batches in one process;
    # uniform_prob gives the ranks different numbers of latents, so FSDP2 must equalize its passes
    values = dict(num_epochs=2, epochs_per_stage=1, max_latent_stage=2, pad_latent_to_max=False, uniform_prob=0.5,
                  batch_size_training=2, gradient_accumulation_steps=WORLD // world, reset_optimizer=True,
                  eval_batch_size=1, max_new_tokens=6)
    return run_config(tmp_path, name=name, **{**values, **over})


def run(config):
    tok = local_tokenizer()
    return train(config, model=tiny_gpt2(tok), tokenizer=tok, train_records=TRAIN, val_records=VAL)


def worker(rank, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    # a rendezvous file instead of a TCP port: nothing to collide with on a busy machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results = {
            "ddp": run(dist_config(out_dir, "ddp", WORLD, parallel="ddp")),
            "fsdp2": run(dist_config(out_dir, "fsdp2", WORLD, parallel="fsdp2")),
            "fsdp2_first": run(dist_config(out_dir, "fsdp2_split", WORLD, parallel="fsdp2", stop_after_steps=3)),
            "fsdp2_second": run(dist_config(out_dir, "fsdp2_split", WORLD, parallel="fsdp2")),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # fork: the workers inherit the imported modules (spawn re-imports torch and transformers in each)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(worker, args=(str(out),), nprocs=WORLD, join=False, start_method=method)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} training processes did not finish in {TIMEOUT_S} s (a hang?)")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, run(dist_config(out, "single", 1))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_same_loss_trajectory_as_one_process(ranks, single, parallel):
    out, per_rank = ranks
    one_dir, one = single
    losses = per_rank[0][parallel]["step_losses"]
    assert len(losses) == len(one["step_losses"]) == 8  # 16 records / global batch 4, two epochs
    assert losses == per_rank[1][parallel]["step_losses"]  # every rank logs the all-reduced loss
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["step_losses"]), rtol=1e-5, atol=1e-6)
    a = load_file(out / parallel / "checkpoint_2" / "model.safetensors")
    b = load_file(one_dir / "single" / "checkpoint_2" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_evaluation_keeps_forward_calls_in_step(ranks, single, parallel):
    _, per_rank = ranks
    _, one = single
    dummy = []
    for epoch in range(2):
        rows = [r[parallel]["epochs"][epoch] for r in per_rank]
        assert rows[0]["eval_forward_calls"] == rows[1]["eval_forward_calls"]
        dummy += [r["eval_dummy_calls"] for r in rows]
        assert rows[0]["num_samples"] == rows[1]["num_samples"] == len(VAL)  # gathered from both ranks
        assert rows[0]["accuracy"] == rows[1]["accuracy"]
        assert rows[0]["val_loss"] == pytest.approx(one["epochs"][epoch]["val_loss"], rel=1e-5)
    # the ranks had different work (3 and 2 questions, answers of different lengths): some calls only kept step
    assert max(dummy) > 0


def test_fsdp2_resume_is_exact(ranks):
    out, per_rank = ranks
    first, second, straight = (per_rank[0][k] for k in ("fsdp2_first", "fsdp2_second", "fsdp2"))
    assert first["stopped_early"] and first["global_step"] == 3
    assert second["step_losses"] == straight["step_losses"][3:]
    a = load_file(out / "fsdp2" / "checkpoint_2" / "model.safetensors")
    b = load_file(out / "fsdp2_split" / "checkpoint_2" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
