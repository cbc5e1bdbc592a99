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


# ---------------------------------------------------------------- auto-length generation
def reference_auto(cm, question, max_thoughts, threshold, max_new_tokens):
    """One prompt, no cache, the plain HF model: the head reads each pass's last hidden state; then the answer
    after `<eot>` from `reference_generate`. Returns (prompt with its block, new tokens, thoughts [k, H])."""
    ids = cm.latent_ids
    embeds = cm.model.get_input_embeddings()(torch.tensor([list(question) + [ids.start]]))
    k = 0
    with torch.no_grad():
        while True:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            h = last_hidden_states(cm.model, embeds, mask, default_position_ids(mask))[:, -1:]
            p = torch.sigmoid(cm.switch_head(h[0, 0]).float())
            if p >= threshold or k == max_thoughts:
                break
            embeds = torch.cat([embeds, h], dim=1)
            k += 1
    prompt = list(question) + block(cm, k)
    tokens, thoughts = reference_generate(cm.model, prompt, ids.latent, EOS, max_new_tokens)
    return prompt, tokens, thoughts


QUESTIONS = [[3, 4, 5], [7], [9, 2, 8, 1, 6], [11, 12]]


def thought_trajectory(cm, question, n):
    """The last hidden states of n reference passes from `<bot>` on, each fed back as the next thought."""
    embeds = cm.model.get_input_embeddings()(torch.tensor([list(question) + [cm.latent_ids.start]]))
    states = []
    with torch.no_grad():
        for _ in range(n):
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            h = last_hidden_states(cm.model, embeds, mask, default_position_ids(mask))[:, -1:]
            states.append(h[0, 0])
            embeds = torch.cat([embeds, h], dim=1)
    return torch.stack(states)


def auto_model(family, kind="linear", seed=0):
    """A tiny model with a switch head whose p(switch) grows with every thought and spreads over (0, 1), so
    thresholds make rows of one batch switch at different steps: the linear head reads the mean direction in
    which the questions' thoughts drift. The MLP head is random."""
    cm = engine_model(family, seed=seed).eval()
    head = cm.add_switch_head(kind)
    with torch.no_grad():
        if kind == "mlp":
            gen = torch.Generator().manual_seed(seed + 11)
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            return cm
        runs = [thought_trajectory(cm, q, 5) for q in QUESTIONS]
        drift = torch.stack([(t[-1] - t[0]) / (t[-1] - t[0]).norm() for t in runs]).mean(0)
        logits = torch.stack([t @ drift for t in runs])
        scale = 4.0 / float(logits.max() - logits.min())
        head.net.weight.copy_(scale * drift[None])
        head.net.bias.fill_(-scale * float(logits.mean()))
    return cm


def check_against_reference(cm, out, questions, max_thoughts, threshold, max_new_tokens):
    counts = []
    for b, q in enumerate(questions):
        prompt, tokens, thoughts = reference_auto(cm, q, max_thoughts, threshold, max_new_tokens)
        k = len(prompt) - len(q) - 2
        counts.append(k)
        assert int(out.num_thoughts[b]) == k, f"prompt {b}: {int(out.num_thoughts[b])} thoughts, reference {k}"
        row = out.sequences[b].tolist()
        assert row[out.prompt_length - len(prompt) : out.prompt_length] == prompt
        new = row[out.prompt_length :]
        assert new[: len(tokens)] == tokens, f"prompt {b} with {k} thoughts"
        assert all(t == cm.tokenizer.pad_token_id for t in new[len(tokens) :])
        got = out.thoughts[b, :k]
        assert torch.all(out.thoughts[b, k:] == 0)
        if k:
            err = (got - thoughts).abs().max() / thoughts.abs().max()
            assert err <= 1e-5, f"thoughts differ by {err:.2e} (relative)"
    return counts


@pytest.mark.parametrize("family, kind", [("gpt2", "linear"), ("llama", "linear"), ("llama", "mlp")])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.5])
def test_torch_auto_generation_matches_the_per_prompt_reference(family, kind, threshold):
    cm = auto_model(family, kind)
    input_ids, mask = left_pad_questions(cm, QUESTIONS)
    out = cm.generate(input_ids, mask, num_thoughts="auto", max_thoughts=4, switch_threshold=threshold,
                      max_new_tokens=6, output_thoughts=True)
    counts = check_against_reference(cm, out, QUESTIONS, 4, threshold, 6)
    if threshold == 0.0:
        assert counts == [0] * len(QUESTIONS)
    if threshold > 1:
        assert counts == [4] * len(QUESTIONS)
        fixed = cm.generate(input_ids, mask, num_thoughts=4, max_new_tokens=6, output_thoughts=True)
        assert torch.equal(fixed.sequences, out.sequences)
        assert torch.allclose(fixed.thoughts, out.thoughts, rtol=1e-5, atol=1e-6)


def test_auto_thresholds_give_varied_counts_in_one_batch():
    """The check above only means something if rows of one batch switch at different steps."""
    for family in ("gpt2", "llama"):
        cm = auto_model(family)
        input_ids, mask = left_pad_questions(cm, QUESTIONS)
        for threshold in (0.3, 0.5, 0.7):
            out = cm.generate(input_ids, mask, num_thoughts="auto", max_thoughts=4, switch_threshold=threshold,
                              max_new_tokens=2, return_dict_in_generate=True)
            assert len(set(out.num_thoughts.tolist())) > 1, (family, threshold, out.num_thoughts.tolist())


def left_pad_questions(cm, questions):
    from coconut_fast.prompts import left_pad
    return left_pad(questions, cm.tokenizer.pad_token_id)


def test_auto_arguments_are_checked():
    cm = make_coconut("gpt2")
    ids, mask = left_pad_questions(cm, QUESTIONS)
    with pytest.raises(ValueError, match="needs a switch head"):
        cm.generate(ids, mask, num_thoughts="auto", max_thoughts=2)
    cm.add_switch_head()
    with pytest.raises(ValueError, match="needs max_thoughts"):
        cm.generate(ids, mask, num_thoughts="auto")
    with pytest.raises(ValueError, match="switch_threshold must be a number"):
        cm.generate(ids, mask, num_thoughts="auto", max_thoughts=2, switch_threshold="high")
    with pytest.raises(ValueError, match="max_thoughts applies"):
        cm.generate(ids, mask, num_thoughts=2, max_thoughts=2)
    with_block = torch.tensor([[3, cm.latent_ids.start, cm.latent_ids.end]])
    with pytest.raises(ValueError, match="already carries"):
        cm.generate(with_block, num_thoughts="auto", max_thoughts=2)


# ---------------------------------------------------------------- the paged engine
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("family, kind", [("gpt2", "linear"), ("llama", "linear"), ("llama", "mlp")])
def test_paged_auto_generation_matches_the_torch_backend_and_the_reference(family, kind, cuda_graphs):
    import warnings
    from coconut_fast.generation import engine_for

    cm = auto_model(family, kind)
    input_ids, mask = left_pad_questions(cm, QUESTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CUDA graphs on CPU: the static-buffer steps run eagerly, said once
        engine_for(cm, num_blocks=64, block_size=4, kernels="torch", cuda_graphs=cuda_graphs)
        for threshold in (0.0, 0.3, 0.5, 0.7, 1.5):
            kwargs = dict(num_thoughts="auto", max_thoughts=4, switch_threshold=threshold, max_new_tokens=5,
                          output_thoughts=True)
            paged = cm.generate(input_ids, mask, backend="paged", **kwargs)
            torch_out = cm.generate(input_ids, mask, backend="torch", **kwargs)
            assert torch.equal(paged.num_thoughts, torch_out.num_thoughts), threshold
            assert torch.equal(paged.sequences, torch_out.sequences), threshold
            check_against_reference(cm, paged, QUESTIONS, 4, threshold, 5)
    engine = cm.paged_engine[0]
    assert engine.allocator.num_free_blocks == engine.num_blocks


def test_engine_requests_leave_the_thought_loop_on_their_own():
    """LLM.generate with auto counts: per-request counts on the outputs; a request that switches early decodes
    while another still thinks (the steps mix latent and decode work)."""
    from coconut_fast.engine import LLM, Phase, SamplingParams

    cm = auto_model("gpt2")
    llm = LLM(cm, num_blocks=64, block_size=4, kernels="torch")
    outs = llm.generate(QUESTIONS, SamplingParams(max_new_tokens=5, eos_token_ids=(EOS,)), num_thoughts="auto",
                        max_thoughts=4, switch_threshold=0.3, use_tqdm=False)
    counts = [o.num_thoughts for o in outs]
    assert len(set(counts)) > 1
    for o, q, k in zip(outs, QUESTIONS, counts):
        assert o.prompt_token_ids == list(q) + block(cm, k)
        prompt, tokens, _ = reference_auto(cm, q, 4, 0.3, 5)
        assert o.token_ids == tokens
    assert llm.stats.steps_with(Phase.LATENT, Phase.DECODE) > 0
    with pytest.raises(ValueError, match="max_thoughts applies"):
        llm.generate(QUESTIONS, num_thoughts=2, max_thoughts=3, use_tqdm=False)
    plain = make_coconut("gpt2")
    with pytest.raises(ValueError, match="switch head"):
        LLM(plain, num_blocks=16, kernels="torch").generate(QUESTIONS, num_thoughts="auto", max_thoughts=2,
                                                            use_tqdm=False)


# ---------------------------------------------------------------- training
def test_trainer_trains_the_head_logs_its_loss_and_reports_the_learned_switch(tmp_path):
    import csv
    import json

    from coconut_fast.training import train
    from training_setup import run_config, tiny_records

    records = tiny_records(16)
    config = run_config(tmp_path, switch_head="mlp", switch_loss_weight=2.0, max_latent_stage=2, num_epochs=2,
                        progress_bars=False)
    result = train(config, train_records=records[:12], val_records=records[12:])
    with open(tmp_path / "run" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["switch_loss"]) > 0 for r in rows if r["stage"] != "0")
    last = result["epochs"][-1]
    assert 0 <= last["switch_mean_thoughts"] <= 2 and 0 <= last["switch_accuracy"] <= 1
    assert last["mean_thoughts"] == 1.0  # the fixed count at evaluation: stage 1 of epoch 2, one thought
    report = json.loads((tmp_path / "run" / "eval" / "epoch_2.json").read_text())
    assert len(report["switch_samples"]) == 4
    saved = sorted((tmp_path / "run").glob("checkpoint_*"))[-1]
    assert (saved / "switch_head.safetensors").is_file()
    with pytest.raises(ValueError, match="switch_head must be"):
        run_config(tmp_path, switch_head="conv")
    with pytest.raises(ValueError, match="switch_loss_weight must be >= 0"):
        run_config(tmp_path, switch_head=True, switch_loss_weight=-1.0)


# ---------------------------------------------------------------- analysis
def test_analysis_compares_fixed_padding_with_the_learned_switch():
    from coconut_fast.analysis.report import summary_lines
    from coconut_fast.analysis.switch import fixed_vs_learned
    from training_setup import local_tokenizer, tiny_gpt2, tiny_records

    tokenizer = local_tokenizer()
    cm = CoconutModel.from_pretrained(tiny_gpt2(tokenizer), tokenizer=tokenizer).eval()
    with pytest.raises(ValueError, match="switch head"):
        fixed_vs_learned(cm, tiny_records(2), 2)
    cm.add_switch_head()
    records = tiny_records(5)
    never = fixed_vs_learned(cm, records, 2, batch_size=2, max_new_tokens=4, threshold=1.5)
    assert never["learned"]["thought_counts"] == [2] * 5 and never["fixed"]["mean_thoughts"] == 2
    assert never["learned"]["accuracy"] == never["fixed"]["accuracy"]
    at_once = fixed_vs_learned(cm, records, 2, batch_size=2, max_new_tokens=4, threshold=0.0)
    assert at_once["learned"]["mean_thoughts"] == 0
    report = {"num_records": 0, "num_thoughts": 0, "records": [], "value_curves": None, "learned_switch": at_once}
    assert any("learned switch" in line and "mean thoughts 0.00" in line for line in summary_lines(report))
