import random

import pytest

from coconut_fast.data.curriculum import (
    CurriculumConfig,
    LatentIds,
    build_eval_example,
    build_eval_set,
    build_training_example,
    build_training_set,
    stage_for_epoch,
)
from coconut_fast.data.records import TokenizedRecord

# Small made-up ids so the expected sequences below read easily.
Q = [1, 2, 3]
A = [40, 41, 99]
S, L, E = 100, 101, 102
X = -100
IDS = LatentIds(start=S, latent=L, end=E)


def rec(idx=7):
    return TokenizedRecord(question=list(Q), steps=[[10, 11], [20], [30, 31, 32]], answer=list(A), idx=idx)


def train(stage, **cfg):
    return build_training_example(rec(), stage, CurriculumConfig(**cfg), IDS, random.Random(0))


def check(ex, input_ids, n_masked):
    assert ex["input_ids"] == input_ids
    assert ex["labels"] == [X] * n_masked + input_ids[n_masked:]
    assert ex["attention_mask"] == [1] * len(input_ids)
    assert ex["position_ids"] == list(range(len(input_ids)))
    assert ex["idx"] == 7


# --- coconut, c_thought=1, max_latent_stage=3 (== number of steps) ---
COCONUT_C1 = {
    0: ([1, 2, 3, S, E, 10, 11, 20, 30, 31, 32, 40, 41, 99], 5),
    1: ([1, 2, 3, S, L, E, 20, 30, 31, 32, 40, 41, 99], 6),
    2: ([1, 2, 3, S, L, L, E, 30, 31, 32, 40, 41, 99], 7),
    3: ([1, 2, 3, S, L, L, L, E, 40, 41, 99], 8),
    4: ([1, 2, 3, S, L, L, L, E, 40, 41, 99], 8),
    5: ([1, 2, 3, S, L, L, L, E, 40, 41, 99], 8),
}


@pytest.mark.parametrize("mode", ["coconut", "pause_as_thought"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("stage", sorted(COCONUT_C1))
def test_coconut_c1(mode, pad, stage):
    check(train(stage, mode=mode, max_latent_stage=3, pad_latent_to_max=pad), *COCONUT_C1[stage])


COCONUT_C2 = {
    0: ([1, 2, 3, S, E, 10, 11, 20, 30, 31, 32, 40, 41, 99], 5),
    1: ([1, 2, 3, S, L, L, E, 20, 30, 31, 32, 40, 41, 99], 7),
    2: ([1, 2, 3, S, L, L, L, L, E, 30, 31, 32, 40, 41, 99], 9),
    3: ([1, 2, 3, S, L, L, L, L, L, L, E, 40, 41, 99], 11),
    4: ([1, 2, 3, S, L, L, L, L, L, L, E, 40, 41, 99], 11),
    5: ([1, 2, 3, S, L, L, L, L, L, L, E, 40, 41, 99], 11),
}


@pytest.mark.parametrize("mode", ["coconut", "pause_as_thought"])
@pytest.mark.parametrize("stage", sorted(COCONUT_C2))
def test_coconut_c2(mode, stage):
    check(train(stage, mode=mode, c_thought=2, max_latent_stage=3), *COCONUT_C2[stage])


# max_latent_stage=5 > 3 steps: stages 4 and 5 give as many latents as the stage
# (all steps gone); beyond 5, pad_latent_to_max decides between 5 and 3 latents.
MAX5 = {
    (3, False): ([1, 2, 3, S, L, L, L, E, 40, 41, 99], 8),
    (4, False): ([1, 2, 3, S, L, L, L, L, E, 40, 41, 99], 9),
    (5, False): ([1, 2, 3, S, L, L, L, L, L, E, 40, 41, 99], 10),
    (6, False): ([1, 2, 3, S, L, L, L, E, 40, 41, 99], 8),
    (4, True): ([1, 2, 3, S, L, L, L, L, E, 40, 41, 99], 9),
    (5, True): ([1, 2, 3, S, L, L, L, L, L, E, 40, 41, 99], 10),
    (6, True): ([1, 2, 3, S, L, L, L, L, L, E, 40, 41, 99], 10),
}


@pytest.mark.parametrize("stage,pad", sorted(MAX5))
def test_max_latent_stage_above_steps(stage, pad):
    check(train(stage, max_latent_stage=5, pad_latent_to_max=pad), *MAX5[(stage, pad)])


def test_max5_c2_pad():
    check(train(6, c_thought=2, max_latent_stage=5, pad_latent_to_max=True), [1, 2, 3, S] + [L] * 10 + [E] + A, 15)


# max_latent_stage=1: past it every step is dropped but only one latent remains.
MAX1 = {
    0: ([1, 2, 3, S, E, 10, 11, 20, 30, 31, 32, 40, 41, 99], 5),
    1: ([1, 2, 3, S, L, E, 20, 30, 31, 32, 40, 41, 99], 6),
    2: ([1, 2, 3, S, L, E, 40, 41, 99], 6),
    3: ([1, 2, 3, S, L, E, 40, 41, 99], 6),
    4: ([1, 2, 3, S, L, E, 40, 41, 99], 6),
    5: ([1, 2, 3, S, L, E, 40, 41, 99], 6),
}


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("stage", sorted(MAX1))
def test_max_latent_stage_below_steps(pad, stage):
    check(train(stage, max_latent_stage=1, pad_latent_to_max=pad), *MAX1[stage])


def test_max_latent_stage_zero_default():
    check(train(0), [1, 2, 3, S, E, 10, 11, 20, 30, 31, 32, 40, 41, 99], 5)
    check(train(1), [1, 2, 3, S, E, 40, 41, 99], 5)
    check(train(1, pad_latent_to_max=True), [1, 2, 3, S, E, 40, 41, 99], 5)


@pytest.mark.parametrize("stage", range(6))
@pytest.mark.parametrize("c", [1, 2])
def test_cot_is_full_chain_at_every_stage(stage, c):
    check(train(stage, mode="cot", c_thought=c, max_latent_stage=3), [1, 2, 3, 10, 11, 20, 30, 31, 32, 40, 41, 99], 3)


@pytest.mark.parametrize("stage", range(6))
@pytest.mark.parametrize("pad", [False, True])
def test_no_cot_is_question_then_answer(stage, pad):
    check(train(stage, mode="no_cot", c_thought=2, max_latent_stage=3, pad_latent_to_max=pad), [1, 2, 3, 40, 41, 99], 3)


NO_THOUGHTS = {
    0: ([1, 2, 3, 10, 11, 20, 30, 31, 32, 40, 41, 99], 3),
    1: ([1, 2, 3, 20, 30, 31, 32, 40, 41, 99], 3),
    2: ([1, 2, 3, 30, 31, 32, 40, 41, 99], 3),
    3: ([1, 2, 3, 40, 41, 99], 3),
    4: ([1, 2, 3, 40, 41, 99], 3),
    5: ([1, 2, 3, 40, 41, 99], 3),
}


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("stage", sorted(NO_THOUGHTS))
def test_no_thoughts(c, pad, stage):
    check(train(stage, mode="no_thoughts", c_thought=c, max_latent_stage=3, pad_latent_to_max=pad), *NO_THOUGHTS[stage])


def test_no_steps_record():
    r = TokenizedRecord(question=[1], steps=[], answer=[99], idx=0)
    cfg = CurriculumConfig(max_latent_stage=2)
    ex = build_training_example(r, 1, cfg, IDS, random.Random(0))
    assert ex["input_ids"] == [1, S, L, E, 99]
    ex = build_training_example(r, 3, cfg, IDS, random.Random(0))
    assert ex["input_ids"] == [1, S, E, 99]
    assert build_eval_example(r, 3, cfg, IDS)["input_ids"] == [1, S, E]


# --- question-only (eval) prompts ---
EVAL = [
    # (cfg kwargs, stage, expected input_ids)
    (dict(max_latent_stage=3), 0, [1, 2, 3, S, E]),
    (dict(max_latent_stage=3), 1, [1, 2, 3, S, L, E]),
    (dict(max_latent_stage=3), 2, [1, 2, 3, S, L, L, E]),
    (dict(max_latent_stage=3), 3, [1, 2, 3, S, L, L, L, E]),
    (dict(max_latent_stage=3), 5, [1, 2, 3, S, L, L, L, E]),
    (dict(max_latent_stage=3, c_thought=2), 2, [1, 2, 3, S, L, L, L, L, E]),
    (dict(max_latent_stage=3, c_thought=2), 4, [1, 2, 3, S] + [L] * 6 + [E]),
    # capped by the number of steps unless padding to max
    (dict(max_latent_stage=5), 4, [1, 2, 3, S, L, L, L, E]),
    (dict(max_latent_stage=5, pad_latent_to_max=True), 4, [1, 2, 3, S, L, L, L, L, E]),
    (dict(max_latent_stage=5, pad_latent_to_max=True), 7, [1, 2, 3, S, L, L, L, L, L, E]),
    (dict(max_latent_stage=1), 3, [1, 2, 3, S, L, E]),
    (dict(mode="pause_as_thought", max_latent_stage=3), 2, [1, 2, 3, S, L, L, E]),
    (dict(mode="cot", max_latent_stage=3), 0, [1, 2, 3]),
    (dict(mode="cot", max_latent_stage=3), 2, [1, 2, 3]),
    (dict(mode="no_cot", max_latent_stage=3), 2, [1, 2, 3]),
    (dict(mode="no_thoughts", c_thought=2, max_latent_stage=3), 0, [1, 2, 3]),
    (dict(mode="no_thoughts", c_thought=2, max_latent_stage=3), 3, [1, 2, 3]),
]


@pytest.mark.parametrize("cfg,stage,expected", EVAL)
def test_eval_example(cfg, stage, expected):
    ex = build_eval_example(rec(), stage, CurriculumConfig(**cfg), IDS)
    assert ex == {
        "input_ids": expected,
        "attention_mask": [1] * len(expected),
        "position_ids": list(range(len(expected))),
        "idx": 7,
    }


# --- stage schedule ---
def test_stage_schedule():
    cfg = CurriculumConfig(epochs_per_stage=3, max_latent_stage=3)
    assert [stage_for_epoch(cfg, e) for e in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    for mode in ("pause_as_thought", "no_thoughts"):
        cfg = CurriculumConfig(mode=mode, epochs_per_stage=2)
        assert [stage_for_epoch(cfg, e) for e in range(5)] == [0, 0, 1, 1, 2]
    for mode in ("cot", "no_cot"):
        cfg = CurriculumConfig(mode=mode, epochs_per_stage=2)
        assert [stage_for_epoch(cfg, e) for e in range(5)] == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="epoch"):
        stage_for_epoch(cfg, -1)


def test_build_sets_use_epoch_stage():
    records = [rec(0), rec(1)]
    cfg = CurriculumConfig(epochs_per_stage=2, max_latent_stage=3)
    train_set = build_training_set(records, 3, cfg, IDS, random.Random(0))
    assert [ex["idx"] for ex in train_set] == [0, 1]
    assert [ex["input_ids"] for ex in train_set] == [[1, 2, 3, S, L, E, 20, 30, 31, 32, 40, 41, 99]] * 2
    eval_set = build_eval_set(records, 4, cfg, IDS)
    assert [ex["input_ids"] for ex in eval_set] == [[1, 2, 3, S, L, L, E]] * 2
    assert [ex["idx"] for ex in eval_set] == [0, 1]


# --- uniform_prob and the random stream ---
def test_uniform_prob_zero_draws_once_per_sample():
    rng = random.Random(0)
    build_training_set([rec()] * 3, 0, CurriculumConfig(max_latent_stage=3), IDS, rng)
    # random.Random(0).random() gives 0.8444..., 0.7579..., 0.4205..., 0.2589...
    assert rng.random() == 0.25891675029296335


def test_uniform_prob_one_samples_stages_from_seeded_rng():
    # random.Random(0): random() 0.844 then choice(range(4)) -> 3; 0.040 -> 3; 0.405 -> 2; 0.968 -> 2
    cfg = CurriculumConfig(max_latent_stage=3, uniform_prob=1.0, epochs_per_stage=1)
    out = build_training_set([rec()] * 4, 1, cfg, IDS, random.Random(0))
    assert [ex["input_ids"] for ex in out] == [
        COCONUT_C1[3][0],
        COCONUT_C1[3][0],
        COCONUT_C1[2][0],
        COCONUT_C1[2][0],
    ]


def test_uniform_prob_half_mixes_scheduled_and_sampled():
    # random.Random(1): 0.134<.5 -> choice 0; 0.255 -> 3; 0.761 -> scheduled; 0.472 -> 3; 0.789 -> scheduled; 0.094 -> 0
    cfg = CurriculumConfig(max_latent_stage=3, uniform_prob=0.5)
    out = build_training_set([rec()] * 6, 1, cfg, IDS, random.Random(1))
    stages = [0, 3, 1, 3, 1, 0]
    assert [ex["input_ids"] for ex in out] == [COCONUT_C1[s][0] for s in stages]


def test_uniform_prob_stage_never_exceeds_steps():
    cfg = CurriculumConfig(max_latent_stage=6, uniform_prob=1.0)
    rng = random.Random(123)
    for _ in range(200):
        ex = build_training_example(rec(), 0, cfg, IDS, rng)
        assert ex["input_ids"].count(L) <= 3


def test_cot_ignores_uniform_stage_but_keeps_stream():
    cfg = CurriculumConfig(mode="cot", max_latent_stage=3, uniform_prob=1.0)
    rng = random.Random(0)
    out = build_training_set([rec()] * 2, 0, cfg, IDS, rng)
    assert [ex["input_ids"] for ex in out] == [[1, 2, 3, 10, 11, 20, 30, 31, 32, 40, 41, 99]] * 2
    # two random() draws and two choices consumed, as in coconut mode
    ref = random.Random(0)
    for _ in range(2):
        ref.random()
        ref.choice([0, 1, 2, 3])
    assert rng.random() == ref.random()


# --- config validation ---
def test_config_validation():
    with pytest.raises(ValueError, match="coconut, cot, no_cot, no_thoughts, pause_as_thought"):
        CurriculumConfig(mode="latent")
    for field in ("c_thought", "epochs_per_stage", "max_latent_stage"):
        with pytest.raises(ValueError, match=field):
            CurriculumConfig(**{field: -1})
    with pytest.raises(ValueError, match="epochs_per_stage"):
        CurriculumConfig(epochs_per_stage=0)
    with pytest.raises(ValueError, match="c_thought"):
        CurriculumConfig(c_thought=1.5)
    for p in (-0.1, 1.1):
        with pytest.raises(ValueError, match="uniform_prob"):
            CurriculumConfig(uniform_prob=p)
    with pytest.raises(ValueError, match="stage"):
        build_eval_example(rec(), -1, CurriculumConfig(), IDS)


def test_latent_ids_frozen():
    with pytest.raises(Exception):
        IDS.latent = 5
