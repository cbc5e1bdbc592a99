"""Parallel latent mode (Jacobi iteration) against the sequential mode and the reference, float32 CPU.

With as many iterations as latent columns it is exact: loss within 1e-5 relative, logits within
1e-5 of the largest |logit|, every parameter gradient within 1e-5 relative. After t iterations
the first t thoughts of every sample are exact and the next one is not.
"""
import pytest
import torch

from coconut_fast.reference import default_position_ids, fill_latents, reference_forward
from conftest import backbone_call_widths, make_coconut
from test_model_parity import case_rows, rel_err
from test_training_fast import assert_grads_close, fast_run

RTOL = 1e-5


def parallel(t, **options):
    return dict(latent_mode="parallel", jacobi_iterations=t, **options)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("case", ["different_counts", "left_padding", "c_thought_2", "with_plain_sample"])
def test_as_many_iterations_as_latents_equals_sequential(family, case):
    cm = make_coconut(family)
    batch = case_rows(cm, case)
    valid = batch[1].bool()
    n = int((batch[0] == cm.latent_ids.latent).sum(1).max())
    seq, seq_grads = fast_run(cm, batch)
    for options in (parallel(n), parallel(n + 2), parallel(n, return_logits=False, gradient_checkpointing=True)):
        out, grads = fast_run(cm, batch, **options)
        assert abs(out.loss.item() - seq.loss.item()) <= RTOL * abs(seq.loss.item())
        if out.logits is not None:
            assert rel_err(out.logits[valid], seq.logits[valid]) <= RTOL
        assert rel_err(out.inputs_embeds[valid], seq.inputs_embeds[valid]) <= RTOL
        assert_grads_close(grads, seq_grads)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fewer_iterations_leave_later_thoughts_unconverged(family):
    """After t iterations thoughts 0..t-1 equal the reference's; thought t does not, nor does the loss."""
    cm = make_coconut(family)
    input_ids, mask, labels = case_rows(cm, "several_latents")  # 4 latents in each sample
    latent = cm.latent_ids.latent
    with torch.no_grad():
        exact = fill_latents(cm.model, input_ids, mask, default_position_ids(mask), latent)
        ref_loss, _, _ = reference_forward(cm.model, input_ids, latent, mask, labels)
    cols = [(row == latent).nonzero().flatten() for row in input_ids]
    for t in range(4):
        with torch.no_grad():
            out = cm(input_ids, attention_mask=mask, labels=labels, **parallel(t))
        for b, c in enumerate(cols):
            if t:
                assert rel_err(out.inputs_embeds[b, c[:t]], exact[b, c[:t]]) <= RTOL
            assert rel_err(out.inputs_embeds[b, c[t]], exact[b, c[t]]) > 1e-3
        assert abs(out.loss.item() - ref_loss.item()) > 1e-4 * abs(ref_loss.item())


def test_zero_iterations_keep_the_latent_token_embeddings():
    """With no iteration the latent slots keep the `<|latent|>` embedding: a plain HF forward of the ids."""
    cm = make_coconut("llama")
    input_ids, mask, labels = case_rows(cm, "different_counts")
    with torch.no_grad():
        out = cm(input_ids, attention_mask=mask, labels=labels, **parallel(0))
        plain = cm.model(input_ids, attention_mask=mask, position_ids=default_position_ids(mask), labels=None).logits
    valid = mask.bool()
    assert rel_err(out.logits[valid], plain[valid]) <= RTOL


def test_backbone_calls_are_prefix_iterations_and_rest():
    cm = make_coconut("gpt2")
    input_ids, mask, labels = case_rows(cm, "different_counts")  # 3, 1 and 0 latents
    with torch.no_grad():
        widths = backbone_call_widths(cm, lambda: cm(input_ids, attention_mask=mask, labels=labels, **parallel(2)))
    assert len(widths) == 1 + 2 + 1
    assert widths[1] == widths[2] == 3  # the latent span, every iteration
    assert widths[0] + widths[3] == input_ids.shape[1] + 2  # first latents in columns 5 and 3: aligned by 2


def test_gradients_flow_through_every_iteration():
    """With fewer iterations than latents the `<|latent|>` embedding that starts the iterations reaches
    the loss only through every iteration's pass; its gradient is non-zero there and zero when exact."""
    cm = make_coconut("llama")  # untied LM head: the input embedding row gets gradients from the inputs only
    batch = case_rows(cm, "several_latents")  # 4 latents
    row = cm.latent_ids.latent

    def latent_row_grad(**options):
        cm.model.zero_grad(set_to_none=True)
        cm(batch[0], attention_mask=batch[1], labels=batch[2], **options).loss.backward()
        return cm.model.get_input_embeddings().weight.grad[row].abs().max().item()

    assert latent_row_grad(**parallel(2)) > 1e-6
    assert latent_row_grad(**parallel(3)) > 1e-6
    assert latent_row_grad(**parallel(4)) == 0.0
    assert latent_row_grad() == 0.0
