"""TrainConfig: the official YAML keys load unchanged, unknown keys and conflicting flags are named."""
import pytest
import yaml

from coconut_fast.configs import CONFIG_DIR, config_path
from coconut_fast.training import TrainConfig
from coconut_fast.training.command import load_config
from coconut_fast.training.distributed import shard_batches
from coconut_fast.training.trainer import lr_factor

# args/prosqa_coconut.yaml of the official repository, newest version (with its local-model keys)
OFFICIAL_PROSQA_COCONUT = """\
# need 4 gpus

project: coconut
save_path: prosqa_experiments
name: prosqa-coconut

local: True
local_path: /home/someone/models--openai-community--gpt2/snapshots/abc

only_eval: False

coconut: True
special_token: False
cot: False
no_thoughts: False
no_cot: False

c_thought: 1
epochs_per_stage: 5
max_latent_stage: 6
pad_latent_to_max: True

save_only_improve: False
uniform_prob: 0.0
model_id: openai-community/gpt2
load_model_path: None
seed: 0
resume: 0
bf16: False
train_path: data/prosqa_train.json
val_path: data/prosqa_valid.json
reset_optimizer: True
batch_size_training: 32
debug: False
gradient_accumulation_steps: 1
num_epochs: 50
lr: !!float "1e-4"
weight_decay: 0.01
"""

# the official GSM8k CoT file: another set of keys (grpo) and a lower-case false
OFFICIAL_GSM_COT = """\
project: coconut
save_path: batch_size_32
name: gsm-cot
only_eval: False
coconut: False
cot: True
no_thoughts: False
no_cot: False
grpo: False
c_thought: 0
epochs_per_stage: 1
max_latent_stage: 0
pad_latent_to_max: True
save_only_improve: True
uniform_prob: 0.0
model_id: openai-community/gpt2
load_model_path: None
seed: 0
resume: 0
bf16: false
train_path: data/gsm_train.json
val_path: data/gsm_valid.json
reset_optimizer: False
batch_size_training: 32
debug: False
gradient_accumulation_steps: 1
num_epochs: 25
lr: !!float "1e-4"
weight_decay: 0.01
"""


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_official_prosqa_config_loads_every_key(tmp_path):
    raw = yaml.safe_load(OFFICIAL_PROSQA_COCONUT)
    config = TrainConfig.from_yaml(write(tmp_path, OFFICIAL_PROSQA_COCONUT))
    for key, value in raw.items():
        expected = None if value == "None" else value
        assert getattr(config, key) == expected, key
    assert config.mode == "coconut"
    assert config.lr == 1e-4 and isinstance(config.lr, float)
    assert config.load_model_path is None
    assert str(config.save_dir) == "prosqa_experiments/prosqa-coconut"
    assert config.model_source == raw["local_path"]  # local: True loads from local_path
    assert config.generation_tokens == 128
    cur = config.curriculum
    assert (cur.c_thought, cur.epochs_per_stage, cur.max_latent_stage, cur.pad_latent_to_max) == (1, 5, 6, True)


def test_official_gsm_cot_config(tmp_path):
    config = TrainConfig.from_yaml(write(tmp_path, OFFICIAL_GSM_COT))
    assert config.mode == "cot" and config.c_thought == 0 and config.save_only_improve
    assert config.generation_tokens == 64  # official: 64 new tokens when "gsm" is in val_path
    assert config.model_source == "openai-community/gpt2"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_bundled_configs_load(name):
    config = TrainConfig.from_yaml(config_path(name))
    assert config.mode in ("coconut", "cot")


def test_bundled_coconut_config_mirrors_the_official_one():
    ours = yaml.safe_load(config_path("prosqa_coconut.yaml").read_text())
    official = yaml.safe_load(OFFICIAL_PROSQA_COCONUT)
    same = {k for k in official if k not in ("local", "local_path", "special_token")}
    assert {k: ours[k] for k in same} == {k: official[k] for k in same}


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, OFFICIAL_PROSQA_COCONUT + "learning_rate: 0.1\nbatchsize: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\): batchsize, learning_rate"):
        TrainConfig.from_yaml(path)


def test_conflicting_mode_flags(tmp_path):
    with pytest.raises(ValueError, match="coconut and cot"):
        TrainConfig.from_yaml(write(tmp_path, OFFICIAL_PROSQA_COCONUT.replace("cot: False", "cot: True", 1)))
    with pytest.raises(ValueError, match="cot and no_cot"):
        TrainConfig(cot=True, no_cot=True)


@pytest.mark.parametrize("flags, mode", [
    ({"coconut": True}, "coconut"), ({"cot": True}, "cot"), ({"no_cot": True}, "no_cot"),
    ({"no_thoughts": True}, "no_thoughts"), ({"special_token": True}, "pause_as_thought"), ({}, "pause_as_thought"),
])
def test_mode_flags_select_the_curriculum(flags, mode):
    config = TrainConfig(**flags)
    assert config.mode == mode and config.curriculum.mode == mode


@pytest.mark.parametrize("values, message", [
    ({"lr": "fast"}, "lr must be a number"),
    ({"batch_size_training": 0}, "batch_size_training must be >= 1"),
    ({"num_epochs": 2.5}, "num_epochs must be an integer"),
    ({"bf16": "yes"}, "bf16 must be bool"),
    ({"parallel": "zero3"}, "parallel must be one of"),
    ({"grpo": True}, "grpo: True is not supported"),
    ({"bf16": True, "bf16_autocast": True}, "exclude each other"),
    ({"reset_optimizer_at_stage_change": True}, "needs reset_optimizer: True"),
    ({"uniform_prob": 1.5}, "uniform_prob must be in"),
    ({"tiny_size": {"width": 3}}, "tiny_size has unknown key"),
    ({"only_eval": True, "resume": 3, "num_epochs": 3}, r"resume` \(3\), which must be < num_epochs \(3\)"),
])
def test_bad_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_overrides_from_the_command_line(tmp_path):
    path = write(tmp_path, OFFICIAL_PROSQA_COCONUT)
    config = load_config(str(path), ["num_epochs=3", "lr=2e-3", "only_eval=true"])
    assert (config.num_epochs, config.lr, config.only_eval) == (3, 2e-3, True)
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(str(path), ["epochs=3"])


def test_shards_cover_the_epoch_and_match_accumulation():
    n, batch, world = 22, 3, 2
    per_rank = [shard_batches(n, batch, r, world, seed=5, epoch=1) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert sorted(i for rank in per_rank for b in rank for i in b) == sorted(range(n))  # 22 = 2 x 11: no padding
    single = shard_batches(n, batch, 0, 1, seed=5, epoch=1)
    # in every full global batch, micro-batch a of rank r is micro-batch a * world + r of one process
    for a in range(n // (batch * world)):
        for r in range(world):
            assert per_rank[r][a] == single[a * world + r]
    assert shard_batches(n, batch, 0, 1, seed=5, epoch=2) != single  # reshuffled every epoch
    padded = [shard_batches(7, 2, r, 2, seed=0, epoch=0) for r in range(2)]
    assert sum(len(b) for b in padded[0]) == sum(len(b) for b in padded[1]) == 4  # padded to a multiple of 2


def test_lr_schedules():
    config = TrainConfig(lr_scheduler="cosine", warmup_steps=2)
    factors = [lr_factor(config, s, 10) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.05
    assert lr_factor(TrainConfig(), 7, 10) == 1.0
    assert lr_factor(TrainConfig(lr_scheduler="linear"), 5, 10) == 0.5
