"""The learned switch from thoughts to language: labels, loss and gradients against the reference, save/load,
auto-length generation (torch backend and paged engine) against a per-prompt reference, training keys."""
import pytest
import torch
import torch.nn.functional as F

from coconut_fast import CoconutModel
from coconut_fast.reference import default_position_ids, last_hidden_states, reference_forward, reference_generate
from coconut_fast.switch_head import SwitchHead, switch_targets
from conftest import make_coconut
from engine_helpers import EOS, engine_model

pytestmark = pytest.mark.usefixtures("one_thread")
GRAD_RTOL = 1e-5


def block(cm, k):
    ids = cm.latent_ids
    return [ids.start] + [ids.latent] * k + [ids.end]


def training_batch(cm):
    """Left- and right-padded rows with 0, 1, 2 and 3 thoughts; labels on the answers."""
    rows = [[3, 4] + block(cm, 2) + [7, 8], [5] + block(cm, 0) + [9], [6, 2, 1] + block(cm, 3) + [4],
            [2] + block(cm, 1) + [5, 6, 7]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 63)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        lo = width - len(r) if b % 2 == 0 else 0  # even rows left-padded, odd rows right-padded
        ids[b, lo : lo + len(r)] = torch.tensor(r)
        mask[b, lo : lo + len(r)] = 1
    labels = torch.where(mask.bool() & (ids < 60), ids, -100)
    return ids, mask, labels


def test_labels_mark_bot_and_latents_and_the_last_one_switches():
    cm = make_coconut("gpt2")
    ids, mask, _ = training_batch(cm)
    labelled, target = switch_targets(ids, mask, cm.latent_ids)
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()].tolist()
        k = row.count(cm.latent_ids.latent)
        got = target[b][labelled[b]].tolist()
        assert got == [0.0] * k + [1.0], f"row {b}"
        assert ids[b][labelled[b]].tolist() == [cm.latent_ids.start] + [cm.latent_ids.latent] * k


@pytest.mark.parametrize("family, kind", [("gpt2", "linear"), ("llama", "mlp")])
def test_switch_loss_and_gradients_match_the_reference(family, kind):
    torch.manual_seed(0)
    cm = make_coconut(family)
    cm.add_switch_head(kind)
    ids, mask, labels = training_batch(cm)
    weight = 0.7
    out = cm(ids, mask, labels, switch_loss_weight=weight)
    params = [p for p in cm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)

    pos = default_position_ids(mask)
    ref_lm, _, embeds = reference_forward(cm.model, ids, cm.latent_ids.latent, mask, labels, pos)
    hidden = last_hidden_states(cm.model, embeds, mask, pos)
    labelled, target = switch_targets(ids, mask, cm.latent_ids)
    ref_switch = F.binary_cross_entropy_with_logits(cm.switch_head(hidden[labelled]).float(), target[labelled])
    ref_grads = torch.autograd.grad(ref_lm + weight * ref_switch, params, allow_unused=True)

    assert torch.allclose(out.switch_loss, ref_switch, rtol=GRAD_RTOL, atol=0)
    assert torch.allclose(out.loss, ref_lm + weight * ref_switch, rtol=GRAD_RTOL, atol=0)
    head_params = {id(p) for p in cm.switch_head.parameters()}
    for p, g, r in zip(params, grads, ref_grads):
        assert (g is None) == (r is None)
        if g is None:
            continue
        err = (g - r).abs().max() / r.abs().max().clamp(min=1e-12)
        assert err <= GRAD_RTOL, f"gradient differs by {err:.2e} (relative), shape {tuple(p.shape)}"
        if id(p) in head_params:
            assert r.abs().max() > 0


def test_loss_is_the_lm_loss_without_a_weight_and_the_switch_loss_comes_apart():
    cm = make_coconut("gpt2")
    ids, mask, labels = training_batch(cm)
    plain = cm(ids, mask, labels).loss
    cm.add_switch_head()
    out = cm(ids, mask, labels)
    assert torch.equal(out.loss, plain)
    assert out.switch_loss is not None and out.switch_loss > 0
    weighted = cm(ids, mask, labels, switch_loss_weight=2.0)
    assert torch.allclose(weighted.loss, plain + 2.0 * out.switch_loss, rtol=1e-6)
    no_bot = ids[:, :2].clone().fill_(5)
    assert cm(no_bot).switch_loss is None


def test_bad_switch_arguments_are_clear_errors():
    cm = make_coconut("gpt2")
    ids, mask, labels = training_batch(cm)
    with pytest.raises(ValueError, match="add_switch_head"):
        cm(ids, mask, labels, switch_loss_weight=1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        cm.add_switch_head("conv")
    cm.add_switch_head()
    with pytest.raises(ValueError, match="switch_loss_weight must be a number"):
        cm(ids, mask, labels, switch_loss_weight=-1.0)
    with pytest.raises(ValueError, match="needs labels"):
        cm(ids, mask, switch_loss_weight=1.0)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_save_and_load_round_trip_the_head_exactly(tmp_path, kind):
    cm = make_coconut("llama")
    head = cm.add_switch_head(kind)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    cm.save_pretrained(tmp_path / "m")
    loaded = CoconutModel.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.switch_head, SwitchHead) and loaded.switch_head.kind == kind
    saved, back = head.state_dict(), loaded.switch_head.state_dict()
    assert saved.keys() == back.keys()
    for name in saved:
        assert torch.equal(saved[name], back[name]), name
    plain = make_coconut("llama")
    plain.save_pretrained(tmp_path / "plain")
    assert CoconutModel.from_pretrained(tmp_path / "plain").switch_head is None
