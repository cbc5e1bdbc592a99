import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from coconut_fast.data.records import (
    TokenizedRecord,
    answer_matches,
    check_tokenization,
    extract_answer,
    extract_cot,
    load_records,
    tokenize_record,
)

RECORD = {
    "question": "Tom has 3 apples and buys 4 more. How many apples?",
    "steps": ["<<3+4=7>>", "Tom has 7 apples."],
    "answer": "7",
}


@pytest.fixture(scope="module")
def tokenizer():
    # Byte-level BPE like GPT-2, plus a BOS so add_special_tokens makes a difference.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [RECORD["question"], *RECORD["steps"], "### 7", "Mary has 2 pears.\n### 2", "How many pears?\n"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"]))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def test_tokenize_record(tokenizer):
    rec = tokenize_record(RECORD, tokenizer, idx=4)
    assert isinstance(rec, TokenizedRecord)
    assert rec.idx == 4
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert rec.question[0] == bos and bos not in rec.question[1:]
    assert tokenizer.decode(rec.question[1:]) == RECORD["question"] + "\n"
    assert [tokenizer.decode(s) for s in rec.steps] == ["<<3+4=7>>\n", "Tom has 7 apples.\n"]
    assert all(bos not in s for s in rec.steps)
    assert rec.answer[-1] == eos
    assert tokenizer.decode(rec.answer[:-1]) == "### 7"
    assert check_tokenization(RECORD, tokenizer, idx=4) == rec


def test_check_tokenization_failure(tokenizer):
    # With no steps the whole text has "\n\n" where the parts have a single "\n".
    with pytest.raises(ValueError, match="record 2: tokenizing question/steps/answer separately"):
        check_tokenization({"question": "How many pears?", "steps": [], "answer": "2"}, tokenizer, idx=2)


def test_tokenizer_without_eos(tokenizer):
    class NoEos:
        eos_token_id = None

        def encode(self, text, add_special_tokens=True):
            return [1]

    with pytest.raises(ValueError, match="eos"):
        tokenize_record(RECORD, NoEos())


def write(tmp_path, data):
    p = tmp_path / "data.json"
    p.write_text(json.dumps(data))
    return p


def test_load_records_keeps_extra_fields(tmp_path):
    data = [dict(RECORD, idx=3, meta={"source": "x"}), {"question": "q", "steps": [], "answer": "1"}]
    assert load_records(write(tmp_path, data)) == data
    assert load_records(str(write(tmp_path, data))) == data


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"steps": [], "answer": "1"}, "record 1: missing key 'question'"),
        ({"question": "q", "answer": "1"}, "record 1: missing key 'steps'"),
        ({"question": "q", "steps": []}, "record 1: missing key 'answer'"),
        ({"question": 5, "steps": [], "answer": "1"}, "record 1: key 'question' must be a string"),
        ({"question": "q", "steps": "a b", "answer": "1"}, "record 1: key 'steps' must be a list of strings"),
        ({"question": "q", "steps": ["a", 2], "answer": "1"}, "record 1: key 'steps' must be a list of strings"),
        ({"question": "q", "steps": [], "answer": 1}, "record 1: key 'answer' must be a string"),
        ("text", "record 1: expected an object"),
    ],
)
def test_load_records_errors(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        load_records(write(tmp_path, [RECORD, bad]))


def test_load_records_not_a_list(tmp_path):
    with pytest.raises(ValueError, match="JSON list"):
        load_records(write(tmp_path, {"question": "q"}))


@pytest.mark.parametrize(
    "text,answer",
    [
        ("The answer is ### 1,234 ", "1234"),
        ("Q?\n<<2*3=6>>\n### 6", "6"),
        ("step #1 then #2\n### 42", "42"),
        ("a # b ## c", "c"),
        ("no marker 17", "no marker 17"),
        ("ends with #", ""),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_cot():
    assert extract_cot("Question?\n<<1+1=2>>\n<<2*2=4>>\n### 4") == "<<1+1=2>>\n<<2*2=4>>"
    assert extract_cot("Question?\n### 4") == ""
    assert extract_cot("only one line") == ""
    assert extract_cot("Q\nstep #1\n### 3") == "step"


def test_answer_matches():
    assert answer_matches("Q\n<<a>>\n### 1,234", " 1,234 ")
    assert answer_matches("### 12", "12")
    assert not answer_matches("### 12", "13")
    assert not answer_matches("12", "1")
    assert answer_matches("a # b # Alex is a wumpus.", "Alex is a wumpus.")
