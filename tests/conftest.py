import copy
import os
import torch  # before anything imports the kernels: triton fixes their mode when they are defined
if not torch.cuda.is_available():  # no GPU: the Triton kernels run in triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from coconut_fast import CoconutModel
from coconut_fast.tiny import tiny_model

VOCAB = 64  # words w0..w59, then <eos>, <<, <unk>, <pad>


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over 'w0' … 'w59' with EOS, '<<' and a distinct pad token."""
    vocab = {f"w{i}": i for i in range(60)}
    vocab.update({"<eos>": 60, "<<": 61, "<unk>": 62, "<pad>": 63})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


def make_coconut(family: str, seed: int = 0, **size) -> CoconutModel:
    """A tiny random CoconutModel; the new token rows get noise so greedy argmax never meets exact ties."""
    model = tiny_model(family, VOCAB, seed=seed, **size)
    cm = CoconutModel.from_pretrained(model, tokenizer=word_tokenizer())
    ids = cm.latent_ids
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for w in {cm.model.get_input_embeddings().weight, cm.model.get_output_embeddings().weight}:
            rows = [ids.start, ids.latent, ids.end]
            w[rows] += 0.02 * torch.randn(len(rows), w.shape[1], generator=gen)
    return cm


def backbone_call_widths(cm: CoconutModel, run) -> list[int]:
    """The number of columns of every backbone call that `run()` makes."""
    widths = []
    original = cm.backbone.model.forward

    def counting(*args, **kwargs):
        widths.append(kwargs["inputs_embeds"].shape[1])
        return original(*args, **kwargs)

    cm.backbone.model.forward = counting
    try:
        run()
    finally:
        del cm.backbone.model.forward
    return widths


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a busy machine (use via pytestmark)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tokenizer():
    return word_tokenizer()


def pytest_configure(config):
    torch.set_num_threads(min(4, os.cpu_count() or 1))
