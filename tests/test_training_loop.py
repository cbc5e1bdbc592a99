"""The training loop: optimizer resets (official and per stage), weights loading, precision, options."""
import pytest
import torch
from safetensors.torch import save_file

from coconut_fast.model import OFFICIAL_PREFIX
from coconut_fast.training import checkpoint as ckpt
from coconut_fast.training import train
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


def test_no_thoughts_and_cot_modes_train(tmp_path):
    for flags in ({"coconut": False, "cot": True}, {"coconut": False, "no_thoughts": True},
                  {"coconut": False, "no_cot": True}):
        result = run(run_config(tmp_path, name="_".join(flags), num_epochs=1, **flags))
        assert len(result["step_losses"]) == STEPS and all(l == l for l in result["step_losses"])


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


def test_debug_and_save_only_improve(tmp_path):
    run(run_config(tmp_path, name="debug", debug=True))
    assert not ckpt.list_checkpoints(tmp_path / "debug")  # official: debug runs save nothing
    result = run(run_config(tmp_path, name="improve", save_only_improve=True, num_epochs=2))
    saved = [p.name for _, p, _ in ckpt.list_checkpoints(tmp_path / "improve")]
    accs = [e["accuracy"] for e in result["epochs"]]
    expected = [f"checkpoint_{i + 1}" for i, a in enumerate(accs) if a > max([0.0] + accs[:i])]
    assert saved == expected


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
