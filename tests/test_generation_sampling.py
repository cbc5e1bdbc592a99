"""Sampling in `CoconutModel.generate(backend="torch")` against the model's own next-token distribution.

The first new token of N copies of one prompt is N independent draws from the warped softmax; the
true logits come from the reference forward of the full prompt (thoughts included), and the
expected distribution is computed here from them (temperature, then top-k, then top-p, as in
transformers). Empirical frequencies must match it within 5 binomial standard deviations plus 1/N
per token, and tokens outside the support must never be drawn. Draws are seeded, so the tests are
deterministic; with N = 4000 the tolerance is at most 0.04 per token.
"""
import pytest
import torch

from coconut_fast.generation import left_pad
from coconut_fast.reference import reference_forward
from conftest import make_coconut

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

N = 4000
QUESTION, THOUGHTS = [1, 2, 3], 2
SHARPEN = 15.0  # a random tiny head gives nearly flat logits (std ~0.2): scaled, they spread over several units


@pytest.fixture(scope="module")
def cm():
    model = make_coconut("qwen2", seed=4)
    head = model.model.get_output_embeddings().weight
    assert head is not model.model.get_input_embeddings().weight  # untied: scaling the head leaves the inputs
    with torch.no_grad():
        head *= SHARPEN
    return model


def full_prompt(cm, question=QUESTION, k=THOUGHTS):
    ids = cm.latent_ids
    return list(question) + [ids.start] + [ids.latent] * k + [ids.end]


@pytest.fixture(scope="module")
def logits(cm):
    """The true next-token logits after the prompt, from the reference forward."""
    with torch.no_grad():
        return reference_forward(cm.model, torch.tensor([full_prompt(cm)]), cm.latent_ids.latent)[1][0, -1].double()


def expected_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """softmax(logits / T) restricted to the k largest, then to the smallest nucleus of mass >= top_p."""
    z = logits / temperature
    if top_k:
        z = torch.where(z >= z.topk(top_k).values[-1], z, -torch.inf)
    p = z.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = p.sort(descending=True)
        size = int((sorted_p.cumsum(-1) < top_p).sum()) + 1  # the smallest prefix whose mass reaches top_p
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[:size]] = True
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    return p


def first_token_counts(cm, seed=0, **sampling):
    """How often each token is the first new token over N sampled generations of the same prompt."""
    ids = torch.tensor([QUESTION] * N)
    torch.manual_seed(seed)
    out = cm.generate(ids, torch.ones_like(ids), num_thoughts=THOUGHTS, max_new_tokens=1, do_sample=True,
                      return_dict_in_generate=True, **sampling)
    first = out.sequences[:, out.prompt_length]
    return torch.bincount(first, minlength=cm.model.config.vocab_size).double()


def assert_matches(counts, expected):
    freq = counts / N
    outside = ((expected == 0) & (counts > 0)).nonzero().flatten().tolist()
    assert not outside, f"drawn outside the support: tokens {outside}"
    tol = 5 * (expected * (1 - expected) / N).sqrt() + 1 / N
    worst = int(((freq - expected).abs() - tol).argmax())
    assert (freq - expected).abs()[worst] <= tol[worst], (
        f"token {worst}: frequency {freq[worst]:.4f}, expected {expected[worst]:.4f} (tolerance {tol[worst]:.4f})")


@pytest.mark.parametrize("k", [3, 8])
def test_top_k_draws_exactly_the_k_largest(cm, logits, k):
    counts = first_token_counts(cm, top_k=k)
    top = set(logits.topk(k).indices.tolist())
    assert set(counts.nonzero().flatten().tolist()) == top  # only the top k, and every one of them
    assert_matches(counts, expected_probs(logits, top_k=k))


def test_top_p_draws_from_the_smallest_nucleus(cm, logits):
    sorted_p = logits.softmax(-1).sort(descending=True).values
    mass = sorted_p.cumsum(-1)
    size = 4
    top_p = float(mass[size - 2] + mass[size - 1]) / 2  # between the mass of the 3 and the 4 most likely tokens
    assert sorted_p[size - 1] * N >= 50  # the last nucleus token shows up many times in N draws
    counts = first_token_counts(cm, top_p=top_p)
    nucleus = set(logits.topk(size).indices.tolist())
    assert set(counts.nonzero().flatten().tolist()) == nucleus
    assert_matches(counts, expected_probs(logits, top_p=top_p))


def test_temperature_then_top_k_then_top_p(cm, logits):
    """All three together, in transformers' order: the nucleus is taken of the tempered top-k distribution."""
    sampling = dict(temperature=1.5, top_k=10, top_p=0.8)
    expected = expected_probs(logits, **sampling)
    assert 3 <= int((expected > 0).sum()) < 10  # top-p cuts inside the top 10
    assert_matches(first_token_counts(cm, **sampling), expected)


def test_temperature_reshapes_the_distribution(cm, logits):
    """Low temperature concentrates the draws on the argmax, high temperature flattens them, as softmax(z / T)."""
    argmax, argmax_share = int(logits.argmax()), []
    for temperature in (0.5, 1.0, 2.0):
        counts = first_token_counts(cm, temperature=temperature)
        expected = expected_probs(logits, temperature=temperature)
        assert_matches(counts, expected)
        argmax_share.append(counts[argmax] / N)
    assert argmax_share[0] > argmax_share[1] + 0.1 and argmax_share[1] > argmax_share[2] + 0.05
    # the three expected distributions are far apart compared with the tolerance, so T is really checked
    assert (expected_probs(logits, temperature=0.5) - expected_probs(logits)).abs().max() > 0.15


def test_every_step_samples_from_the_top_k(cm):
    """Later steps are warped too: each sampled token is among the 3 largest logits of its own position."""
    questions, counts = [[5, 6, 7, 8], [1, 2], [12, 13, 14]], [2, 0, 1]
    ids, mask = left_pad(questions, cm.tokenizer.pad_token_id)
    torch.manual_seed(1)
    steps = 6
    out = cm.generate(ids, mask, num_thoughts=counts, max_new_tokens=steps, do_sample=True, top_k=3, eos_token_id=[],
                      return_dict_in_generate=True)
    ranks = []
    for b, (q, k) in enumerate(zip(questions, counts)):
        prompt, new = full_prompt(cm, q, k), out.sequences[b, out.prompt_length :].tolist()
        assert len(new) == steps
        with torch.no_grad():
            row_logits = reference_forward(cm.model, torch.tensor([prompt + new]), cm.latent_ids.latent)[1][0]
        for position, token in zip(range(len(prompt) - 1, len(prompt) + steps - 1), new):
            ranks.append(int((row_logits[position] > row_logits[position, token]).sum()))
    assert max(ranks) <= 2 and len(set(ranks)) == 3  # always in the top 3, and each of the 3 ranks drawn
