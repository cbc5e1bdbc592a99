"""The icot mode (stepwise internalisation of the chain of thought): token removal schedule, removal
smoothing, config keys, optimizer resets at removal steps, and a run of the trainer."""
import math
import random

import pytest

from coconut_fast.data import generate_prosqa
from coconut_fast.data.curriculum import (
    ICOT_MAX_SMOOTHING_OFFSET,
    CurriculumConfig,
    LatentIds,
    build_eval_example,
    build_eval_set,
    build_training_example,
    build_training_set,
    icot_smoothing_offset,
    stage_for_epoch,
)
from coconut_fast.data.records import TokenizedRecord
from coconut_fast.training import TrainConfig, train
from coconut_fast.training import evaluate as evaluate_module
from coconut_fast.training import trainer as trainer_module
from training_setup import local_tokenizer, run_config, tiny_gpt2, tiny_records

Q, A = [1, 2, 3], [40, 41, 99]
CHAIN = [10, 11, 20, 30, 31, 32]  # steps [10, 11], [20], [30, 31, 32] concatenated
X = -100
IDS = LatentIds(start=100, latent=101, end=102)


def rec(idx=7):
    return TokenizedRecord(question=list(Q), steps=[[10, 11], [20], [30, 31, 32]], answer=list(A), idx=idx)


def icot(**kw):
    return CurriculumConfig(mode="icot", **{"icot_removal_smoothing_lambda": None, **kw})


def kept_chain(ex) -> list[int]:
    """The chain tokens left in a training example (question and answer checked)."""
    tokens = ex["input_ids"]
    assert tokens[: len(Q)] == Q and tokens[-len(A):] == A
    assert ex["labels"] == [X] * len(Q) + tokens[len(Q):]
    assert ex["attention_mask"] == [1] * len(tokens) and ex["position_ids"] == list(range(len(tokens)))
    return tokens[len(Q): -len(A)]


# ---------------------------------------------------------------------- the removal schedule
# 2 tokens per removal step: removal cuts inside steps, and epochs 3 and 4 are question -> answer
TWO_PER_EPOCH = {0: CHAIN, 1: [20, 30, 31, 32], 2: [31, 32], 3: [], 4: []}


@pytest.mark.parametrize("epoch", sorted(TWO_PER_EPOCH))
def test_two_tokens_per_epoch(epoch):
    cfg = icot(icot_tokens_per_removal=2, icot_epochs_per_removal=1)
    assert stage_for_epoch(cfg, epoch) == epoch
    [ex] = build_training_set([rec()], epoch, cfg, IDS, random.Random(0))
    expected = Q + TWO_PER_EPOCH[epoch] + A
    assert ex["input_ids"] == expected
    assert ex["labels"] == [X] * 3 + TWO_PER_EPOCH[epoch] + A  # loss on the kept chain and the answer
    assert ex["attention_mask"] == [1] * len(expected) and ex["position_ids"] == list(range(len(expected)))
    assert ex["idx"] == 7
    [prompt] = build_eval_set([rec()], epoch, cfg, IDS)  # answers directly: the question alone
    assert prompt == {"input_ids": Q, "attention_mask": [1, 1, 1], "position_ids": [0, 1, 2], "idx": 7}


@pytest.mark.parametrize("epoch, kept", [(0, CHAIN), (1, CHAIN), (2, CHAIN[3:]), (3, CHAIN[3:]), (4, []), (9, [])])
def test_three_tokens_every_two_epochs(epoch, kept):
    cfg = icot(icot_tokens_per_removal=3, icot_epochs_per_removal=2)
    assert stage_for_epoch(cfg, epoch) == epoch // 2
    [ex] = build_training_set([rec()], epoch, cfg, IDS, random.Random(0))
    assert kept_chain(ex) == kept


def test_one_token_per_step_cuts_inside_a_reasoning_step():
    cfg = icot(icot_tokens_per_removal=1)
    kept = [kept_chain(build_training_example(rec(), stage, cfg, IDS, random.Random(0))) for stage in range(8)]
    assert kept == [CHAIN[min(s, 6):] for s in range(8)]
    assert kept[1] == [11, 20, 30, 31, 32]


def test_no_markers_or_latents_in_any_example():
    cfg = icot(icot_tokens_per_removal=2, c_thought=3, max_latent_stage=3, pad_latent_to_max=True)
    for stage in range(5):
        assert not {100, 101, 102} & set(build_training_example(rec(), stage, cfg, IDS, random.Random(0))["input_ids"])
        assert build_eval_example(rec(), stage, cfg, IDS)["input_ids"] == Q


# ---------------------------------------------------------------------- removal smoothing
def removed_counts(lam, stage, seed, n=400, tokens=2):
    cfg = icot(icot_tokens_per_removal=tokens, icot_removal_smoothing_lambda=lam)
    rng = random.Random(seed)
    return [len(CHAIN) - len(kept_chain(build_training_example(rec(), stage, cfg, IDS, rng))) for _ in range(n)]


@pytest.mark.parametrize("lam", [None, 0, 0.0, math.inf])
def test_smoothing_off_draws_nothing(lam):
    rng = random.Random(3)
    before = rng.getstate()
    cfg = icot(icot_tokens_per_removal=2, icot_removal_smoothing_lambda=lam)
    for stage in range(4):
        assert kept_chain(build_training_example(rec(), stage, cfg, IDS, rng)) == TWO_PER_EPOCH[stage]
    assert rng.getstate() == before


def test_large_lambda_never_removes_extra():
    # exp(-50) is below the smallest draw random.random() can make: o is always 0
    for stage in range(4):
        assert set(removed_counts(50.0, stage, seed=stage, n=2000)) == {min(2 * stage, 6)}


def test_small_lambda_sometimes_removes_extra_never_past_the_chain():
    counts = removed_counts(0.5, stage=1, seed=11, n=400)
    assert min(counts) == 2 and max(counts) == 6  # o = 0 happens, and o >= 4 empties the chain
    extra = sum(c > 2 for c in counts) / len(counts)
    assert abs(extra - math.exp(-0.5)) < 0.08  # P(o > 0) = exp(-lambda)
    assert set(removed_counts(0.5, stage=3, seed=12)) == {6}  # all gone: the offset removes nothing more


def test_smoothing_is_deterministic_per_seed():
    assert removed_counts(0.7, 1, seed=5) == removed_counts(0.7, 1, seed=5)
    assert removed_counts(0.7, 1, seed=5) != removed_counts(0.7, 1, seed=6)


def test_offset_distribution_is_exponential():
    rng = random.Random(0)
    draws = [icot_smoothing_offset(1.0, rng) for _ in range(20000)]
    for k in range(4):  # P(o >= k) = exp(-lambda k)
        assert abs(sum(d >= k for d in draws) / len(draws) - math.exp(-k)) < 0.015, k
    assert max(icot_smoothing_offset(1e-9, random.Random(s)) for s in range(50)) == ICOT_MAX_SMOOTHING_OFFSET


def test_training_set_draws_one_offset_per_example():
    cfg = icot(icot_tokens_per_removal=1, icot_removal_smoothing_lambda=0.3)
    records = [TokenizedRecord(question=list(Q), steps=[list(range(10, 60))], answer=list(A), idx=i) for i in range(50)]
    examples = build_training_set(records, 2, cfg, IDS, random.Random(4))
    rng = random.Random(4)
    offsets = [icot_smoothing_offset(0.3, rng) for _ in records]
    assert [50 - len(kept_chain(ex)) for ex in examples] == [2 + o for o in offsets]
    assert len(set(offsets)) > 2


# ---------------------------------------------------------------------- config keys
def icot_config(**kw) -> TrainConfig:
    return TrainConfig.from_dict({"icot": True, **kw})


def test_icot_flag_selects_the_mode_and_passes_the_keys():
    config = icot_config(icot_tokens_per_removal=3, icot_epochs_per_removal=2, icot_removal_smoothing_lambda=2)
    assert config.mode == "icot"
    cur = config.curriculum
    assert (cur.mode, cur.icot_tokens_per_removal, cur.icot_epochs_per_removal) == ("icot", 3, 2)
    assert cur.icot_removal_smoothing_lambda == 2.0 and isinstance(cur.icot_removal_smoothing_lambda, float)
    defaults = icot_config()
    assert (defaults.icot_tokens_per_removal, defaults.icot_epochs_per_removal) == (8, 1)
    assert defaults.icot_removal_smoothing_lambda == 4.0 and defaults.icot_reset_optimizer is True
    assert icot_config(icot_removal_smoothing_lambda="None").icot_removal_smoothing_lambda is None
    assert icot_config(icot_removal_smoothing_lambda="1e-1").icot_removal_smoothing_lambda == 0.1
    assert TrainConfig.from_dict({}).mode == "pause_as_thought"


@pytest.mark.parametrize("values, message", [
    ({"icot_tokens_per_removal": 0}, "icot_tokens_per_removal must be >= 1, got 0"),
    ({"icot_tokens_per_removal": -2}, "icot_tokens_per_removal must be >= 1"),
    ({"icot_tokens_per_removal": 1.5}, "icot_tokens_per_removal must be an integer, got 1.5"),
    ({"icot_tokens_per_removal": True}, "icot_tokens_per_removal must be an integer, got True"),
    ({"icot_epochs_per_removal": 0}, "icot_epochs_per_removal must be >= 1, got 0"),
    ({"icot_epochs_per_removal": "2"}, "icot_epochs_per_removal must be an integer"),
    ({"icot_removal_smoothing_lambda": -1}, r"icot_removal_smoothing_lambda must be None or a number >= 0, got -1\.0"),
    ({"icot_removal_smoothing_lambda": "fast"}, "icot_removal_smoothing_lambda must be a number, got 'fast'"),
    ({"icot_removal_smoothing_lambda": math.nan}, "icot_removal_smoothing_lambda must be None or a number >= 0"),
    ({"icot_removal_smoothing_lambda": True}, "icot_removal_smoothing_lambda must be float or None, got True"),
    ({"icot_removal_smoothing_lambda": [1]}, "icot_removal_smoothing_lambda must be float or None"),
    ({"icot_reset_optimizer": "yes"}, "icot_reset_optimizer must be bool, got 'yes'"),
    ({"coconut": True}, "mode flags coconut and icot are both set"),
    ({"cot": True}, "mode flags cot and icot are both set"),
    ({"uniform_prob": 0.5}, "uniform_prob draws a Coconut stage; icot: True has none"),
    ({"icot_step": 1}, r"unknown config key\(s\): icot_step"),
])
def test_bad_icot_keys_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        icot_config(**values)


@pytest.mark.parametrize("values, message", [
    ({"icot_tokens_per_removal": 0}, "icot_tokens_per_removal must be >= 1, got 0"),
    ({"icot_epochs_per_removal": 1.0}, "icot_epochs_per_removal must be an int"),
    ({"icot_removal_smoothing_lambda": -0.5}, "icot_removal_smoothing_lambda must be None or a number >= 0"),
    ({"icot_removal_smoothing_lambda": "4"}, "icot_removal_smoothing_lambda must be None or a number >= 0"),
    ({"uniform_prob": 0.1}, "the icot mode has none"),
])
def test_bad_curriculum_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        CurriculumConfig(mode="icot", **values)


def test_yaml_selects_icot(tmp_path):
    path = tmp_path / "icot.yaml"
    path.write_text("icot: True\nicot_tokens_per_removal: 4\nicot_removal_smoothing_lambda: None\n"
                    "icot_reset_optimizer: False\n")
    config = TrainConfig.from_yaml(path)
    assert (config.mode, config.icot_tokens_per_removal, config.icot_removal_smoothing_lambda,
            config.icot_reset_optimizer) == ("icot", 4, None, False)
    path.write_text("icot: True\nicot_epochs_per_removal: 0\n")
    with pytest.raises(ValueError, match="icot.yaml: icot_epochs_per_removal must be >= 1"):
        TrainConfig.from_yaml(path)


# ---------------------------------------------------------------------- the trainer
single_thread = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
TRAIN, VAL = tiny_records(8, seed=5), tiny_records(2, seed=6)
STEPS = 2  # optimizer steps per epoch: 8 records, batches of 4


def icot_run(tmp_path, monkeypatch, val=None, **overrides):
    """A trainer run in icot mode; returns the result and the stage of every optimizer build."""
    builds, real = [], trainer_module.Trainer._new_optimizer

    def spy(self, stage):
        builds.append(stage)
        real(self, stage)

    monkeypatch.setattr(trainer_module.Trainer, "_new_optimizer", spy)
    values = dict(coconut=False, icot=True, icot_removal_smoothing_lambda=None, val_loss=False, eval_every_epochs=10)
    config = run_config(tmp_path, **{**values, **overrides})
    tok = local_tokenizer()
    result = train(config, model=tiny_gpt2(tok), tokenizer=tok, train_records=TRAIN, val_records=val)
    return result, builds


@single_thread
@pytest.mark.parametrize("reset, builds, steps", [
    # a new AdamW at epochs 0, 2, 4: the removal steps (its step count restarts there)
    (True, [0, 1, 2], [STEPS, 2 * STEPS, STEPS, 2 * STEPS, STEPS, 2 * STEPS]),
    (False, [0], [STEPS * e for e in range(1, 7)]),
])
def test_optimizer_resets_at_removal_steps(tmp_path, monkeypatch, reset, builds, steps):
    result, built = icot_run(tmp_path, monkeypatch, num_epochs=6, icot_tokens_per_removal=2,
                             icot_epochs_per_removal=2, icot_reset_optimizer=reset)
    assert built == builds
    assert [e["stage"] for e in result["epochs"]] == [0, 0, 1, 1, 2, 2]
    assert [e["icot_removed_tokens"] for e in result["epochs"]] == [0, 0, 2, 2, 4, 4]
    assert [e["optimizer_state_step"] for e in result["epochs"]] == steps


@single_thread
def test_no_reset_once_every_chain_is_gone(tmp_path, monkeypatch):
    """As in the iCoT code: a removal step after the chains were all removed changes nothing, no reset."""
    longest = max(len(" ".join(r["steps"])) for r in TRAIN)  # characters bound the tokens of the local BPE
    result, built = icot_run(tmp_path, monkeypatch, num_epochs=4, icot_tokens_per_removal=longest + 10)
    assert built == [0, 1]  # epoch 0, then the removal step that empties every chain
    assert [e["optimizer_builds"] for e in result["epochs"]] == [1, 2, 2, 2]
    # the official per-epoch reset still applies on top
    _, built = icot_run(tmp_path / "official", monkeypatch, num_epochs=4, icot_tokens_per_removal=longest + 10,
                        reset_optimizer=True)
    assert built == [0, 1, 2, 3]


@single_thread
def test_trainer_runs_icot_end_to_end(tmp_path, monkeypatch):
    """tiny:gpt2 from model_id, generated ProsQA records: every epoch trains on the scheduled removal,
    generation is prompted with the question alone, the loss falls."""
    seen, real_set = {}, trainer_module.build_training_set

    def spy_set(records, epoch, cfg, ids, rng):
        seen[epoch] = (records, real_set(records, epoch, cfg, ids, rng), ids)
        return seen[epoch][1]

    prompts, real_prompt = [], evaluate_module.build_eval_example

    def spy_prompt(record, stage, cfg, ids):
        out = real_prompt(record, stage, cfg, ids)
        prompts.append((record.question, out["input_ids"]))
        return out

    monkeypatch.setattr(trainer_module, "build_training_set", spy_set)
    monkeypatch.setattr(evaluate_module, "build_eval_example", spy_prompt)
    records = generate_prosqa(8, seed=5, min_steps=2, max_steps=3, min_nodes=6, max_nodes=9)
    val = generate_prosqa(2, seed=6, min_steps=2, max_steps=3, min_nodes=6, max_nodes=9)
    config = TrainConfig.from_dict(dict(
        save_path=str(tmp_path), name="icot", icot=True, icot_tokens_per_removal=6, icot_epochs_per_removal=1,
        icot_removal_smoothing_lambda=1.0, model_id="tiny:gpt2",
        tiny_size={"hidden": 32, "layers": 2, "heads": 2, "context": 256}, batch_size_training=4, num_epochs=3,
        lr=1e-3, eval_batch_size=2, max_new_tokens=8, seed=0, progress_bars=False))
    result = train(config, train_records=records, val_records=val)

    assert sorted(seen) == [0, 1, 2]
    extra = 0
    for epoch, (tokenized, examples, ids) in seen.items():
        for r, ex in zip(tokenized, examples):
            chain = [t for step in r.steps for t in step]
            kept = ex["input_ids"][len(r.question): len(ex["input_ids"]) - len(r.answer)]
            removed = len(chain) - len(kept)
            assert ex["input_ids"] == r.question + chain[removed:] + r.answer
            assert ex["labels"] == [X] * len(r.question) + chain[removed:] + r.answer
            assert min(6 * epoch, len(chain)) <= removed <= len(chain)
            extra += removed > min(6 * epoch, len(chain))
            assert not {ids.start, ids.latent, ids.end} & set(ex["input_ids"])
    assert extra > 0  # lambda 1: about a third of the examples lose extra tokens
    assert prompts and all(question == prompt for question, prompt in prompts)
    assert [e["icot_removed_tokens"] for e in result["epochs"]] == [0, 6, 12]
    last = result["epochs"][-1]
    assert last["num_samples"] == 2 and math.isfinite(last["val_loss"]) and 0 <= last["accuracy"] <= 1
    losses = result["step_losses"]
    assert len(losses) == 3 * STEPS and all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0]
    assert [e["optimizer_builds"] for e in result["epochs"]] == [1, 2, 3]  # icot_reset_optimizer: True
    assert (tmp_path / "icot" / "checkpoint_3" / "model.safetensors").is_file()
