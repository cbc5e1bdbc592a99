"""Evaluation: official accuracy, CoT match and generated-token counts, batched, as JSON from a run."""
import json

import pytest

from coconut_fast.data import answer_matches, build_eval_example, extract_answer, extract_cot, tokenize_record
from coconut_fast.generation import left_pad
from coconut_fast.training import evaluate_generation, train
from coconut_fast.training.trainer import build_model
from training_setup import local_tokenizer, run_config, tiny_gpt2, tiny_records

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

STAGE, NEW_TOKENS, BATCH = 1, 12, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    config = run_config(tmp, max_latent_stage=2, pad_latent_to_max=True)
    tok = local_tokenizer()
    coconut = build_model(config, tiny_gpt2(tok, seed=3), tok)
    records = tiny_records(7, seed=9)
    tokenized = [tokenize_record(r, tok, idx=i) for i, r in enumerate(records)]
    # the direct computation: generate in the same left-padded batches of 3 (batch composition changes
    # float rounding, and a random model has near-ties), cut at EOS, decode with the prompt
    direct = []
    prompts = [build_eval_example(r, STAGE, config.curriculum, coconut.latent_ids)["input_ids"] for r in tokenized]
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start : start + BATCH]
        out = coconut.generate(*left_pad(chunk, tok.pad_token_id), max_new_tokens=NEW_TOKENS)
        for prompt, row in zip(chunk, out[:, max(map(len, chunk)) :].tolist()):  # new tokens after the padded prompts
            new = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
            direct.append((prompt, new, tok.decode(prompt + new, skip_special_tokens=True)))
    # make some references agree with what the model says, so the metrics are neither 0 nor 1
    for i, (_, _, text) in enumerate(direct):
        if i % 2 == 0:
            records[i] = {**records[i], "answer": extract_answer(text)}
        if i % 3 == 0:
            records[i] = {**records[i], "steps": extract_cot(text).split("\n")}
    return config, coconut, records, tokenized, direct


def test_metrics_equal_a_direct_computation(setup):
    config, coconut, records, tokenized, direct = setup
    result = evaluate_generation(coconut, records, tokenized, STAGE, config.curriculum, batch_size=BATCH,
                                 max_new_tokens=NEW_TOKENS, progress=False)
    accuracy = sum(answer_matches(text, r["answer"]) for (_, _, text), r in zip(direct, records)) / len(records)
    cot = sum(extract_cot(text) == "\n".join(r["steps"]) for (_, _, text), r in zip(direct, records)) / len(records)
    tokens = sum(len(new) for _, new, _ in direct) / len(records)
    assert 0 < accuracy < 1 and 0 < cot < 1
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["cot_match"] == pytest.approx(cot)
    assert result["generated_tokens"] == pytest.approx(tokens)
    assert result["num_samples"] == len(records) and result["stage"] == STAGE
    for sample, (prompt, new, text), rec in zip(result["samples"], direct, records):
        assert sample["text"] == text and sample["generated_tokens"] == len(new)
        assert sample["correct"] == answer_matches(text, rec["answer"])
        assert sample["num_thoughts"] == STAGE * config.c_thought
    assert [s["idx"] for s in result["samples"]] == list(range(len(records)))


def test_only_eval_writes_the_json(setup, tmp_path):
    config, coconut, records, tokenized, direct = setup
    weights = tmp_path / "weights"
    coconut.save_pretrained(weights)  # a CoconutModel directory: model.safetensors with HF names
    only = run_config(tmp_path, name="only", only_eval=True, load_model_path=str(weights), resume=STAGE,
                      epochs_per_stage=1, max_latent_stage=2, pad_latent_to_max=True, eval_batch_size=BATCH,
                      max_new_tokens=NEW_TOKENS)
    tok = local_tokenizer()
    result = train(only, model=tiny_gpt2(tok, seed=11), tokenizer=tok, val_records=records)
    assert [e["stage"] for e in result["epochs"]] == [STAGE] and result["checkpoints"] == []
    report = json.loads((tmp_path / "only" / "eval" / f"only_eval_stage{STAGE}.json").read_text())
    assert [s["text"] for s in report["samples"]] == [text for _, _, text in direct]
    correct = [answer_matches(s["text"], r["answer"]) for s, r in zip(report["samples"], records)]
    assert report["accuracy"] == pytest.approx(sum(correct) / len(records)) == result["epochs"][0]["accuracy"]
    assert report["generated_tokens"] == pytest.approx(sum(len(n) for _, n, _ in direct) / len(records))
    assert "val_loss" not in report  # only_eval generates only, like the official runner
