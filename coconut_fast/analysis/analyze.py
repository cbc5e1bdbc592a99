"""What a dataset's continuous thoughts hold, batch by batch through `CoconutModel.generate`.

Per record: the logit lens of every thought (top-k tokens), thought norms and the cosine of
consecutive thoughts; for ProsQA records the probability of every node's first token at every
thought and the frontier split of the paper's latent-search analysis; and the first language
step after switching to language at every depth k = 0..n. One `generate` call per batch gives
the n thoughts and the step after all n of them; each shallower depth k < n takes one more call.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.records import tokenize_record
from ..prompts import left_pad
from .lens import consecutive_cosines, lens_probs, thought_norms, top_tokens
from .prosqa_graph import ProsQAGraph, concept_token_ids, frontier_masses, has_graph, read_step
from .switch import read_steps, stop_token_ids, switch_steps


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def record_graphs(records: list[dict], graph: bool | None) -> list[ProsQAGraph] | None:
    """The graphs of all records (graph=True, or None when every record has one), else None."""
    if graph is None:
        with_graph = [has_graph(r) for r in records]
        if not any(with_graph):
            return None
        if not all(with_graph):
            first = with_graph.index(False)
            raise ValueError(
                f"record {first} lacks the ProsQA graph fields that other records have; "
                "analyze them in separate files or pass graph=False"
            )
    elif not graph:
        return None
    return [ProsQAGraph.from_record(r, i) for i, r in enumerate(records)]


def graph_result(graph: ProsQAGraph, token_ids: list[int], probs: torch.Tensor) -> dict:
    """Node probabilities [thought][node] and the frontier split of each thought; probs [n, V]."""
    node_probs = probs[:, token_ids]
    lead = graph.leading_to_target()
    frontiers = []
    for i in range(probs.shape[0]):
        lead_nodes, other_nodes = graph.frontier(i + 1)  # thought i explores the nodes i+1 hops out
        frontiers.append({"thought": i, "hops": i + 1, "lead": lead_nodes, "other": other_nodes,
                          **frontier_masses(probs[i], token_ids, lead_nodes, other_nodes)})
    return {
        "root": graph.root,
        "target": graph.target,
        "symbols": graph.symbols,
        "token_ids": token_ids,
        "distance": graph.distances(),
        "height": graph.heights(),
        "leads_to_target": [v in lead for v in range(graph.num_nodes)],
        "node_probs": node_probs.tolist(),
        "frontiers": frontiers,
    }


@torch.no_grad()
def analyze(
    model,
    records: list[dict],
    num_thoughts: int = 6,
    top_k: int = 5,
    batch_size: int = 16,
    max_step_tokens: int = 48,
    switch: bool = True,
    graph: bool | None = None,
    progress: bool = True,
) -> dict:
    """Analyze `records` (official JSON format) with a `CoconutModel`; returns the report dict.

    graph=None runs the ProsQA graph analysis when every record has `idx_to_symbol`, `edges`,
    `root` and `target`; True requires them; False skips it. switch=False skips the language steps.
    """
    _check_int("num_thoughts", num_thoughts, 0)
    _check_int("top_k", top_k, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("max_step_tokens", max_step_tokens, 1)
    if not records:
        raise ValueError("records is empty: nothing to analyze")
    graphs = record_graphs(records, graph)
    tokenizer = model.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    lm_head = model.model.get_output_embeddings()
    results, concept_ids = [], {}
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="analyze", unit="batch", disable=not progress):
        batch = records[start : start + batch_size]
        prompts = [tokenize_record(r, tokenizer, start + j).question for j, r in enumerate(batch)]
        ids, mask = left_pad(prompts, pad, model.device)
        out = model.generate(
            ids, mask, num_thoughts=num_thoughts, max_new_tokens=max_step_tokens if switch else 0,
            eos_token_id=stop_ids, pad_token_id=pad, return_dict_in_generate=True, output_thoughts=True,
        )
        thoughts = out.thoughts
        probs = lens_probs(lm_head, thoughts).cpu()  # [B, n, V]
        top_p, top_i = top_tokens(probs, top_k)
        norms = thought_norms(thoughts).cpu()
        cosines = consecutive_cosines(thoughts).cpu()
        steps = {}
        if switch:
            steps[num_thoughts] = read_steps(tokenizer, out.sequences, out.prompt_length, num_thoughts, stop_ids)
            for k in range(num_thoughts):
                steps[k] = switch_steps(model, ids, mask, k, max_step_tokens, stop_ids, pad)
        for j, record in enumerate(batch):
            index = start + j
            result = {
                "index": index,
                "answer": record["answer"],
                "thoughts": [
                    {
                        "index": i,
                        "norm": float(norms[j, i]),
                        "cosine_to_previous": float(cosines[j, i - 1]) if i else None,
                        "top_tokens": [
                            {"id": int(t), "token": tokenizer.decode([int(t)]), "prob": float(p)}
                            for t, p in zip(top_i[j, i], top_p[j, i])
                        ],
                    }
                    for i in range(num_thoughts)
                ],
                "switch": [],
                "graph": None,
            }
            g = graphs[index] if graphs is not None else None
            for k in sorted(steps):
                step = steps[k][j]
                entry = {"num_thoughts": k, "text": step.text, "token_ids": step.token_ids, "stopped": step.stopped}
                if g is not None:
                    entry.update(read_step(g, step.text))
                result["switch"].append(entry)
            if g is not None:
                missing = [s for s in g.symbols if s not in concept_ids]
                concept_ids.update(zip(missing, concept_token_ids(tokenizer, missing)))
                result["graph"] = graph_result(g, [concept_ids[s] for s in g.symbols], probs[j])
            results.append(result)
    return {
        "num_records": len(records),
        "num_thoughts": num_thoughts,
        "top_k": top_k,
        "max_step_tokens": max_step_tokens,
        "records": results,
        "value_curves": value_curves(results, num_thoughts) if graphs is not None else None,
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def value_curves(results: list[dict], num_thoughts: int) -> dict:
    """Dataset value curves: at each thought i, over the nodes i+1 hops from the root.

    `*_value_mean`: the mean probability of a frontier node (pooled over all records' nodes of
    the group), `*_mass_mean`: the mean over records with a non-empty frontier of the group's
    total mass; None where there is nothing to average."""
    curves = {k: [] for k in ("thought", "hops", "lead_value_mean", "other_value_mean", "lead_nodes",
                              "other_nodes", "lead_mass_mean", "other_mass_mean", "records")}
    for i in range(num_thoughts):
        lead_values, other_values, lead_mass, other_mass = [], [], [], []
        for r in results:
            g = r["graph"]
            f = g["frontiers"][i]
            lead_values += [g["node_probs"][i][v] for v in f["lead"]]
            other_values += [g["node_probs"][i][v] for v in f["other"]]
            if f["lead"] or f["other"]:
                lead_mass.append(f["lead_mass"])
                other_mass.append(f["other_mass"])
        curves["thought"].append(i)
        curves["hops"].append(i + 1)
        curves["lead_value_mean"].append(_mean(lead_values))
        curves["other_value_mean"].append(_mean(other_values))
        curves["lead_nodes"].append(len(lead_values))
        curves["other_nodes"].append(len(other_values))
        curves["lead_mass_mean"].append(_mean(lead_mass))
        curves["other_mass_mean"].append(_mean(other_mass))
        curves["records"].append(len(lead_mass))
    return curves
