"""CoconutModel loading, saving, official checkpoints, special tokens and input errors."""
import os
from pathlib import Path

import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.generation import left_pad
from coconut_fast.tiny import FAMILIES, tiny_model
from coconut_fast.tokens import END_LATENT, LATENT, LATENT_TOKENS, START_LATENT, latent_ids
from conftest import VOCAB, make_coconut, word_tokenizer


def prompts(cm, rows):
    return left_pad(rows, cm.tokenizer.pad_token_id)


# ------------------------------------------------------------------ special tokens
@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_added_in_official_order_and_initialised_from_lt_lt(family):
    tok = word_tokenizer()
    model = tiny_model(family, VOCAB)
    src_in = model.get_input_embeddings().weight[61].clone()
    src_out = model.get_output_embeddings().weight[61].clone()
    cm = CoconutModel.from_pretrained(model, tokenizer=tok)
    assert [tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS] == [VOCAB, VOCAB + 1, VOCAB + 2]
    assert cm.model.get_input_embeddings().weight.shape[0] == VOCAB + 3
    for tid in (VOCAB, VOCAB + 1, VOCAB + 2):
        assert torch.equal(cm.model.get_input_embeddings().weight[tid], src_in)
        assert torch.equal(cm.model.get_output_embeddings().weight[tid], src_out)


def test_fallback_initialisation_is_the_eos_row_without_lt_lt():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(10)}
    vocab.update({"<eos>": 10, "<unk>": 11})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    model = tiny_model("llama", 12)
    eos_row = model.get_input_embeddings().weight[10].clone()
    cm = CoconutModel.from_pretrained(model, tokenizer=tok)
    assert torch.equal(cm.model.get_input_embeddings().weight[cm.latent_ids.latent], eos_row)
    assert tok.pad_token == "<eos>"


def test_vocab_with_room_is_not_resized():
    tok = word_tokenizer()
    model = tiny_model("qwen2", VOCAB + 16)  # Qwen pads its vocabulary
    cm = CoconutModel.from_pretrained(model, tokenizer=tok)
    assert cm.model.get_input_embeddings().weight.shape[0] == VOCAB + 16
    assert cm.latent_ids.latent == VOCAB + 2


def test_tokenizer_without_special_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"<\|start-latent\|>"):
        CoconutModel.from_pretrained(tiny_model("gpt2", VOCAB), tokenizer=word_tokenizer(), add_latent_tokens=False)
    with pytest.raises(ValueError, match="no"):
        latent_ids(word_tokenizer())


def test_latent_ids_outside_the_embedding_matrix_is_an_error():
    tok = word_tokenizer()
    tok.add_tokens([START_LATENT, END_LATENT, LATENT], special_tokens=True)
    with pytest.raises(ValueError, match="outside the model's embedding matrix"):
        CoconutModel.from_pretrained(tiny_model("gpt2", VOCAB), tokenizer=tok, add_latent_tokens=False)


def test_in_memory_model_needs_a_tokenizer_and_paths_only():
    with pytest.raises(ValueError, match="tokenizer is required"):
        CoconutModel.from_pretrained(tiny_model("gpt2", VOCAB))
    with pytest.raises(TypeError, match="path_or_model"):
        CoconutModel.from_pretrained(42, tokenizer=word_tokenizer())


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_save_and_load_round_trip(family, tmp_path):
    cm = make_coconut(family)
    ids, mask = prompts(cm, [[1, 2, 3], [4, 5, 6, 7]])
    before = cm.generate(ids, mask, num_thoughts=[2, 1], max_new_tokens=6)
    cm.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "config.json", "coconut_config.json", "tokenizer.json"} <= files
    loaded = CoconutModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.latent_ids == cm.latent_ids
    for (n, p), (n2, p2) in zip(cm.model.state_dict().items(), loaded.model.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    after = loaded.generate(ids, mask, num_thoughts=[2, 1], max_new_tokens=6)
    assert torch.equal(before, after)
    # saving again over the same directory replaces it whole and leaves no temporary directories behind
    loaded.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_plain_hf_directory_gets_the_special_tokens(tmp_path):
    model, tok = tiny_model("llama", VOCAB), word_tokenizer()
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    cm = CoconutModel.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert cm.latent_ids.latent == VOCAB + 2 and len(cm.tokenizer) == VOCAB + 3
    assert cm.model.get_input_embeddings().weight.shape[0] == VOCAB + 3
    assert torch.equal(cm.model.get_input_embeddings().weight[VOCAB + 2], model.get_input_embeddings().weight[61])
    out = cm.generate(*prompts(cm, [[1, 2, 3]]), num_thoughts=2, max_new_tokens=3)
    assert out.shape[0] == 1 and 3 + 4 < out.shape[1] <= 3 + 4 + 3
    assert out[0, :7].tolist() == [1, 2, 3, cm.latent_ids.start, cm.latent_ids.latent, cm.latent_ids.latent, cm.latent_ids.end]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cm = make_coconut("gpt2")
    cm.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cm.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        cm.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield 0o027
    os.umask(before)


def test_save_into_an_existing_directory_keeps_its_other_files(tmp_path):
    target = tmp_path / "model"
    (target / "notes").mkdir(parents=True)
    (target / "README.md").write_text("mine")
    (target / "notes" / "a.txt").write_text("kept")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"an earlier sharded save")
    (target / "model.safetensors.index.json").write_text("{}")
    inode = target.stat().st_ino
    make_coconut("gpt2").save_pretrained(target)
    assert (target / "README.md").read_text() == "mine" and (target / "notes" / "a.txt").read_text() == "kept"
    # the weights of the earlier layout go, as HF's save_pretrained removes them: one set of weights only
    assert not (target / "model-00001-of-00002.safetensors").exists()
    assert not (target / "model.safetensors.index.json").exists()
    assert target.stat().st_ino == inode  # the directory itself is never replaced: no moment without it
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no staging area left
    CoconutModel.from_pretrained(target)


def test_saved_files_and_directories_follow_the_umask(tmp_path, umask_027):
    make_coconut("gpt2").save_pretrained(tmp_path / "new" / "model")
    assert (tmp_path / "new" / "model").stat().st_mode & 0o777 == 0o750
    for name in ("model.safetensors", "config.json", "coconut_config.json", "tokenizer.json"):
        assert (tmp_path / "new" / "model" / name).stat().st_mode & 0o777 == 0o640, name


def test_save_into_a_file_path_is_an_error_and_keeps_the_file(tmp_path):
    path = tmp_path / "model"
    path.write_text("a file")
    with pytest.raises(NotADirectoryError, match="is a file"):
        make_coconut("gpt2").save_pretrained(path)
    assert path.read_text() == "a file"


def test_save_into_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cm = make_coconut("llama")
    cm.save_pretrained(".")
    loaded = CoconutModel.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.model.get_input_embeddings().weight, cm.model.get_input_embeddings().weight)


def test_each_file_is_renamed_into_place_after_it_was_written_whole(tmp_path, monkeypatch):
    """Every rename lands a complete, fsynced file in the target; at each moment the target holds a loadable
    model (the old files, the new ones, or a mix of whole files of the same model)."""
    import coconut_fast.io as io

    cm = make_coconut("gpt2")
    target = tmp_path / "model"
    cm.save_pretrained(target)
    synced, renames, replace = set(), [], os.replace
    monkeypatch.setattr(io, "fsync_path", lambda path: synced.add(str(path)))

    def checked_replace(src, dst):
        assert str(src) in synced, f"{src} renamed before it was fsynced"
        renames.append(Path(dst).name)
        replace(src, dst)
        CoconutModel.from_pretrained(target)

    monkeypatch.setattr(io.os, "replace", checked_replace)
    cm.save_pretrained(target)
    assert {"model.safetensors", "config.json", "coconut_config.json"} <= set(renames)
    assert str(target) in synced  # the directory entry of each rename, too


# ------------------------------------------------------------------ official checkpoints
def official_state(cm):
    state = {"base_causallm." + k: v.clone() for k, v in cm.model.state_dict().items()}
    state["embedding.weight"] = cm.model.get_input_embeddings().weight.detach().clone()
    return state


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_official_checkpoint_loads(family, tmp_path):
    trained = make_coconut(family, seed=5)
    path = tmp_path / "checkpoint_3"
    torch.save(official_state(trained), path)
    fresh = CoconutModel.from_pretrained(tiny_model(family, VOCAB, seed=9), tokenizer=word_tokenizer(), official_checkpoint=path)
    for k, v in trained.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k


def test_official_checkpoint_with_only_one_name_for_a_tied_weight(tmp_path):
    trained = make_coconut("gpt2", seed=5)
    state = official_state(trained)
    del state["base_causallm.lm_head.weight"]
    torch.save(state, tmp_path / "ck")
    fresh = make_coconut("gpt2", seed=9)
    fresh.load_official_checkpoint(tmp_path / "ck")
    assert torch.equal(fresh.model.lm_head.weight, trained.model.lm_head.weight)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update({"base_causallm.extra.weight": torch.zeros(2)}), "unexpected keys"),
        (lambda s: s.update({"stray": torch.zeros(2)}), "unexpected keys"),
        (lambda s: s.pop("base_causallm.model.norm.weight"), "missing keys"),
        (lambda s: s.pop("embedding.weight"), "missing keys"),
        (lambda s: s.update({"base_causallm.model.norm.weight": torch.zeros(3)}), "mismatched"),
        (lambda s: s.update({"embedding.weight": torch.zeros_like(s["embedding.weight"])}), "embedding.weight differs"),
    ],
)
def test_official_checkpoint_errors(edit, message, tmp_path):
    cm = make_coconut("llama")
    state = official_state(cm)
    edit(state)
    torch.save(state, tmp_path / "ck")
    with pytest.raises(ValueError, match=message):
        cm.load_official_checkpoint(tmp_path / "ck")


def test_plain_state_dict_is_not_an_official_checkpoint(tmp_path):
    cm = make_coconut("llama")
    torch.save(cm.model.state_dict(), tmp_path / "plain")
    with pytest.raises(ValueError, match="not an official Coconut checkpoint"):
        cm.load_official_checkpoint(tmp_path / "plain")


# ------------------------------------------------------------------ input errors
def test_generate_errors():
    cm = make_coconut("gpt2")
    L = cm.latent_ids
    ids, mask = prompts(cm, [[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="row 1 is an empty prompt"):
        cm.generate(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]), num_thoughts=1)
    with pytest.raises(ValueError, match="batch size 0"):
        cm.generate(ids[:0], num_thoughts=1)
    with pytest.raises(ValueError, match="empty prompt"):
        cm.generate(ids[:, :0], num_thoughts=1)
    with pytest.raises(ValueError, match=r"num_thoughts must be an integer >= 0 .*; got -1"):
        cm.generate(ids, mask, num_thoughts=-1)
    with pytest.raises(ValueError, match=r"num_thoughts\[1\] must be an integer >= 0, got -1"):
        cm.generate(ids, mask, num_thoughts=[1, -1])
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        cm.generate(torch.cat([ids, ids[:1]]), num_thoughts=[1, 2])
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        cm.generate(ids, mask, num_thoughts=4, max_new_tokens=250)
    with pytest.raises(ValueError, match="max_new_tokens"):
        cm.generate(ids, mask, num_thoughts=1, max_new_tokens=-2)
    carried, cmask = prompts(cm, [[1, 2, L.start, L.latent, L.end], [4, 5]])
    with pytest.raises(ValueError, match="row 0 already carries"):
        cm.generate(carried, cmask, num_thoughts=1)
    for bad, msg in [
        ([1, L.latent, 2], "outside a <bot>"),
        ([1, L.start, L.latent], "without a closing <eot>"),
        ([1, L.end], "without a <bot>"),
        ([1, L.start, L.start, L.end], "nested"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cm.generate(*prompts(cm, [bad]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        cm.generate(ids, mask, num_thoughts=1, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        cm.generate(ids, mask, num_thoughts=1, do_sample=True, top_p=1.5)


def test_forward_errors():
    cm = make_coconut("gpt2")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="labels has shape"):
        cm(ids, labels=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="input_ids must be"):
        cm(torch.tensor([1, 2, 3]))
    L = cm.latent_ids
    with pytest.raises(ValueError, match="column 0 or after padding"):
        cm(torch.tensor([[L.latent, 1, 2], [1, 2, L.latent]]))
    with pytest.raises(ValueError, match="column 0 or after padding"):
        cm(torch.tensor([[0, L.latent, 2], [1, 2, L.latent]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
