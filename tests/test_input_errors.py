"""Bad arguments and files are clear errors: which argument, what was expected; the command line says it in one
line with exit status 2 and no traceback."""
import json
import subprocess
import sys

import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.engine import LLM, SamplingParams
from coconut_fast.prompts import left_pad
from conftest import make_coconut
from engine_helpers import engine_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cm():
    return engine_model("llama")


def batch(cm):
    return left_pad([[5, 6, 7], [1, 2]], cm.tokenizer.pad_token_id)


@pytest.mark.parametrize("backend", ["torch", "paged"])
@pytest.mark.parametrize("value, hint", [(2.0, ""), ("AUTO", "spelled 'auto'"), ("two", ""), (-1, ""),
                                         (True, "")])
def test_num_thoughts_of_the_wrong_kind_is_named(cm, backend, value, hint):
    with pytest.raises(ValueError, match=r"num_thoughts must be an integer >= 0 .*'auto'.*; got " + repr(value)
                       .replace("(", r"\(").replace(".", r"\.") + ".*" + hint):
        cm.generate(*batch(cm), num_thoughts=value, max_new_tokens=2, backend=backend)


def test_engine_generate_names_num_thoughts_too(cm):
    llm = LLM(cm, num_blocks=16, block_size=4, kernels="torch")
    with pytest.raises(ValueError, match=r"num_thoughts must be .*; got 2\.0"):
        llm.generate([[1, 2]], SamplingParams(max_new_tokens=2), num_thoughts=2.0, use_tqdm=False)
    with pytest.raises(ValueError, match=r"num_thoughts\[1\] must be an integer >= 0, got 1\.5"):
        llm.generate([[1, 2], [3]], SamplingParams(max_new_tokens=2), num_thoughts=[1, 1.5], use_tqdm=False)


@pytest.mark.parametrize("backend", ["torch", "paged"])
@pytest.mark.parametrize("pad", [10_000, -1, 2.5])
def test_an_out_of_vocabulary_pad_is_the_same_error_in_both_backends(cm, backend, pad):
    vocab = cm.model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=rf"pad_token_id must be a token id in \[0, {vocab}\).*got {pad}"):
        cm.generate(*batch(cm), num_thoughts=1, max_new_tokens=2, pad_token_id=pad, backend=backend)


@pytest.mark.parametrize("eos", [60, "60", [1.5], (-2,)])
def test_sampling_params_name_a_bad_eos(eos):
    with pytest.raises(ValueError, match="eos_token_ids must be None .* or a tuple of token ids"):
        SamplingParams(eos_token_ids=eos)
    assert SamplingParams(eos_token_ids=[60, 61]).eos_token_ids == (60, 61)  # a list is taken as a tuple
    with pytest.raises(ValueError, match="seed must be None or an integer"):
        SamplingParams(seed=1.5)


def test_a_missing_model_directory_is_named(tmp_path):
    for missing in (tmp_path / "nope", "runs/never/made", "./model"):
        with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
            CoconutModel.from_pretrained(missing)


def test_a_model_directory_without_a_tokenizer_or_config_is_named(tmp_path):
    cm = make_coconut("gpt2")
    cm.model.save_pretrained(tmp_path / "weights-only")
    with pytest.raises(FileNotFoundError, match="has no tokenizer .*pass tokenizer="):
        CoconutModel.from_pretrained(tmp_path / "weights-only")
    loaded = CoconutModel.from_pretrained(tmp_path / "weights-only", tokenizer=cm.tokenizer)
    assert loaded.latent_ids == cm.latent_ids
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a model directory: it has no config.json"):
        CoconutModel.from_pretrained(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        CoconutModel.from_pretrained(tmp_path / "file")


@pytest.mark.parametrize("text, problem", [("{not json", "not a valid Coconut config"),
                                           ("[1, 2]", r"not a valid Coconut config \(expected a JSON object"),
                                           ('{"switch_head": "linear"}', "its switch_head entry must be an object")])
def test_a_corrupt_coconut_config_names_the_file(tmp_path, text, problem):
    make_coconut("gpt2").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "coconut_config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"coconut_config\.json: {problem}"):
        CoconutModel.from_pretrained(tmp_path / "m")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "coconut_fast", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["stats", "/no/such/file.json"], "coconut-fast stats: error: /no/such/file.json: no such file"),
    (["generate-data", "--n", "-3", "--out", "x.json"], "argument --n: expected an integer >= 1, got -3"),
    (["generate-data", "--n", "2", "--out", "/proc/none/x.json"], "--out /proc/none: cannot create the directory"),
    (["demo", "--out", "/dev/null"], "--out /dev/null: exists and is not a directory"),
])
def test_command_line_errors_are_one_line(tmp_path, args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_stats_names_a_malformed_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"question": "not a list"}))
    result = run_cli("stats", str(bad))
    assert result.returncode == 2 and "not a ProsQA-format JSON list of records" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
