"""A seeded generator of ProsQA-style records (graph reasoning questions), and dataset statistics.

Each record is built on a DAG grown node by node from two key entities. Every node remembers which
key entities reach it (a 2-bit label); a new node draws its parents from the descendants of one key
entity only, of the other only, or from everything. The question asks about the key entity whose
exclusive descendants go deepest: the answer is one of its deepest exclusive sinks, the distractor a
sink reached only from the other key entity, so both concepts look alike and only a search through
the graph tells them apart. Records use the official keys:
question, answer, steps, idx_to_symbol, edges, root, target, neg_target.
"""
from __future__ import annotations

import json
import math
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Sequence

NAMES = (
    "Alex", "Anna", "Bob", "Carol", "Davis", "Emma", "Eva", "Fae", "Jack", "Leo", "Max", "Mia",
    "Oliver", "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren",
)
_ONSETS = (
    "", "b", "bl", "br", "ch", "d", "dr", "f", "g", "gl", "gr", "gw", "h", "j", "k", "l", "m", "n",
    "p", "qu", "r", "s", "sc", "scr", "sh", "sl", "st", "t", "tr", "v", "w", "y", "z", "zh",
)
_VOWELS = ("a", "e", "i", "o", "u", "oo")
_CODAS = ("mpus", "rpus", "lpus")
FACT_ENTITY = "{} is a {}."
FACT_CONCEPT = "Every {} is a {}."
# (entity fact, concept fact) per wording: "prosqa" as the official data; "terse" puts each concept right
# after the word it belongs to ("Rex brompus.", "Every brompus trampus."), a binding a small model from
# scratch learns in a few hundred steps; "is a" between them delays it by a seed-dependent 600 to 1,000+
WORDINGS = {"prosqa": (FACT_ENTITY, FACT_CONCEPT), "terse": ("{} {}.", "Every {} {}.")}


def concept_vocabulary(size: int = 38, seed: int = 1234) -> list[str]:
    """`size` made-up '-pus' words (onset + vowel + m/r/l + 'pus'), a fixed pick for a given seed."""
    words = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    if not 0 < size <= len(words):
        raise ValueError(f"size must be in [1, {len(words)}], got {size}")
    random.Random(seed).shuffle(words)
    return sorted(words[:size])


def _num_parents(rng: random.Random, lam: float, p_entity: float) -> int:
    """0 (a new entity) with probability p_entity, else Poisson(lam) conditioned on >= 1."""
    if rng.random() < p_entity:
        return 0
    limit = math.exp(-lam)
    while True:
        # Knuth's method; lam is small so the loop is short
        k, p = 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        if k:
            return k


def _weighted_sample(rng: random.Random, items: list[int], weights: list[float], k: int) -> list[int]:
    """k distinct items, each drawn with probability proportional to its weight among those left."""
    items, weights, out = list(items), list(weights), []
    for _ in range(k):
        j = rng.choices(range(len(items)), weights)[0]
        out.append(items.pop(j))
        weights.pop(j)
    return out


def _grow_dag(rng: random.Random, n: int, lam: float, p_entity: float, p_side: float, depth_weight: float):
    """Parents of each node (in draw order) and its label: bit 0/1 = reached from node 0/1."""
    parents: list[list[int]] = [[], []]
    labels, depth = [1, 2], [0, 0]
    for i in range(2, n):
        u = rng.random()
        # with probability p_side each, keep node i out of reach of node 1, or of node 0
        allowed = (0, 1) if u < p_side else (0, 2) if u < 2 * p_side else (0, 1, 2, 3)
        cand = [j for j in range(i) if labels[j] in allowed]
        weights = [depth[j] * depth_weight + 1.0 for j in cand]
        k = min(_num_parents(rng, lam, p_entity), len(cand))
        chosen = _weighted_sample(rng, cand, weights, k)
        parents.append(chosen)
        labels.append(0)
        for p in chosen:
            labels[i] |= labels[p]
        depth.append(1 + max(depth[p] for p in chosen) if chosen else 0)
    return parents, labels


def bfs_distances(children: list[list[int]], source: int) -> dict[int, int]:
    """Hops from `source` to every node it reaches (breadth-first over `children`)."""
    dist, queue = {source: 0}, [source]
    for u in queue:
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def _try_record(rng, n, shape, min_steps, max_steps, names, concepts, wording="prosqa") -> dict | None:
    """One record on a fresh graph of n nodes, or None when the graph does not fit the constraints."""
    parents, labels = _grow_dag(rng, n, *shape)
    has_child = [False] * n
    for ps in parents:
        for p in ps:
            has_child[p] = True
    # a node with neither parents nor children would be a fact-less name: drop it and renumber
    keep = [i for i in range(n) if parents[i] or has_child[i]]
    if keep[:2] != [0, 1]:
        return None
    new = {old: j for j, old in enumerate(keep)}
    parents = [[new[p] for p in parents[old]] for old in keep]
    labels = [labels[old] for old in keep]
    n = len(keep)
    children: list[list[int]] = [[] for _ in range(n)]
    for i, ps in enumerate(parents):
        for p in ps:
            children[p].append(i)
    dist = [bfs_distances(children, 0), bfs_distances(children, 1)]
    sinks = [[i for i in range(n) if labels[i] == 1 << k and not children[i]] for k in (0, 1)]
    if not sinks[0] or not sinks[1]:
        return None
    deepest = [max(dist[k][i] for i in sinks[k]) for k in (0, 1)]
    root = rng.randrange(2) if deepest[0] == deepest[1] else int(deepest[1] > deepest[0])
    other, steps_n = 1 - root, deepest[root]
    if not min_steps <= steps_n <= max_steps:
        return None
    target = rng.choice([i for i in sinks[root] if dist[root][i] == steps_n])
    # the other key entity was not chosen, so none of its sinks is deeper than the target
    neg_target = rng.choice(sinks[other])

    entities = [i for i in range(n) if not parents[i]]
    if len(entities) > len(names) or n - len(entities) > len(concepts):
        return None
    ent_names, con_names = rng.sample(names, len(entities)), rng.sample(concepts, n - len(entities))
    symbols, e, c = [], iter(ent_names), iter(con_names)
    for i in range(n):
        symbols.append(next(e) if not parents[i] else next(c))

    fact_entity, fact_concept = WORDINGS[wording]

    def fact(a: int, b: int) -> str:
        return (fact_concept if parents[a] else fact_entity).format(symbols[a], symbols[b])

    edges = [[p, i] for i in range(n) for p in parents[i]]
    facts = [fact(a, b) for a, b in edges]
    rng.shuffle(facts)
    # walk back from the target through random parents one step closer: a random shortest path
    path = [target]
    while path[-1] != root:
        d = dist[root][path[-1]]
        path.append(rng.choice([p for p in parents[path[-1]] if dist[root].get(p) == d - 1]))
    path.reverse()
    options = [symbols[target], symbols[neg_target]]
    rng.shuffle(options)
    question = " ".join(facts) + f" Is {symbols[root]} a {options[0]} or {options[1]}?"
    return {
        "question": question,
        "answer": fact_entity.format(symbols[root], symbols[target]),
        "steps": [fact(a, b) for a, b in zip(path, path[1:])],
        "idx_to_symbol": symbols,
        "edges": edges,
        "root": root,
        "target": target,
        "neg_target": neg_target,
    }


def generate_prosqa(
    num_records: int,
    seed: int = 0,
    min_steps: int = 3,
    max_steps: int = 6,
    min_nodes: int = 18,
    max_nodes: int = 28,
    mean_parents: float = 1.5,
    p_entity: float = 0.05,
    p_side: float = 0.35,
    depth_weight: float = 1.5,
    num_concepts: int = 38,
    names: Sequence[str] = NAMES,
    concepts: Sequence[str] | None = None,
    max_tries: int = 10_000,
    wording: str = "prosqa",
) -> list[dict]:
    """`num_records` ProsQA-style records, identical for identical arguments.

    Graphs are grown with min_nodes..max_nodes nodes (before dropping unconnected ones), each node
    drawing Poisson(mean_parents) parents; p_side is the chance a node may only descend from one key
    entity (for each of the two); depth_weight favours deep parents, which lengthens the chains.
    Records whose reasoning path is not min_steps..max_steps long are drawn again. `wording` is a key
    of WORDINGS: how facts, steps and the answer are written (the question sentence is the same).
    """
    if wording not in WORDINGS:
        raise ValueError(f"wording must be one of {tuple(WORDINGS)}, got {wording!r}")
    if num_records < 0:
        raise ValueError(f"num_records must be >= 0, got {num_records}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if not 3 <= min_nodes <= max_nodes:
        raise ValueError(f"need 3 <= min_nodes <= max_nodes, got {min_nodes}, {max_nodes}")
    if not 0 <= p_side <= 0.5:
        raise ValueError(f"p_side must be in [0, 0.5], got {p_side}")
    concepts = list(concepts) if concepts is not None else concept_vocabulary(num_concepts)
    names = list(names)
    if len(set(concepts) | set(names)) != len(concepts) + len(names):
        raise ValueError("names and concepts must be distinct words")
    shape = (mean_parents, p_entity, p_side, depth_weight)
    rng = random.Random(seed)
    records: list[dict] = []
    while len(records) < num_records:
        for _ in range(max_tries):
            n = round(rng.triangular(min_nodes, max_nodes))
            rec = _try_record(rng, n, shape, min_steps, max_steps, names, concepts, wording)
            if rec is not None:
                records.append(rec)
                break
        else:
            raise RuntimeError(
                f"no valid graph in {max_tries} tries; widen min_steps..max_steps, raise max_nodes, "
                "or give more names/concepts"
            )
    return records


def write_json(records: list[dict], path: str | Path) -> None:
    """Write records as a JSON list, like the official prosqa_*.json files."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)


def _shortest_paths(record: dict) -> tuple[int, int, int]:
    """(number of shortest root->target paths, nodes reachable from root, distance of neg_target from
    its nearest entity) for one record."""
    n = len(record["idx_to_symbol"])
    children: list[list[int]] = [[] for _ in range(n)]
    has_parent = [False] * n
    for a, b in record["edges"]:
        children[a].append(b)
        has_parent[b] = True
    dist = bfs_distances(children, record["root"])
    count = {record["root"]: 1}
    for v in sorted(dist, key=dist.get)[1:]:
        count[v] = sum(count[p] for p, c in record["edges"] if c == v and dist.get(p) == dist[v] - 1)
    neg = [d[record["neg_target"]] for e in range(n) if not has_parent[e]
           for d in [bfs_distances(children, e)] if record["neg_target"] in d]
    return count.get(record["target"], 0), len(dist), min(neg) if neg else -1


def prosqa_statistics(records: list[dict]) -> dict:
    """Summary numbers that characterize a ProsQA-style data set (same function for any source)."""
    if not records:
        return {"records": 0}
    steps = [len(r["steps"]) for r in records]
    nodes = [len(r["idx_to_symbol"]) for r in records]
    edges = [len(r["edges"]) for r in records]
    entities = [sum(1 for s in r["idx_to_symbol"] if s[:1].isupper()) for r in records]
    paths = [_shortest_paths(r) for r in records]
    words = Counter(s for r in records for s in r["idx_to_symbol"])
    target_first, answer_target = 0, 0
    for r in records:
        sym = r["idx_to_symbol"]
        tail = r["question"].rsplit("?", 1)[0].rsplit(" Is ", 1)[-1].split()
        target_first += tail[2] == sym[r["target"]]
        answer_target += r["answer"] == f"{sym[r['root']]} is a {sym[r['target']]}."
    stats = {
        "records": len(records),
        "steps_mean": statistics.mean(steps),
        "steps_min": min(steps),
        "steps_max": max(steps),
    }
    for k in range(min(steps), max(steps) + 1):
        stats[f"steps_{k}_frac"] = steps.count(k) / len(steps)
    stats.update({
        "nodes_mean": statistics.mean(nodes),
        "nodes_min": min(nodes),
        "nodes_max": max(nodes),
        "edges_mean": statistics.mean(edges),
        "entities_mean": statistics.mean(entities),
        "shortest_paths_mean": statistics.mean(p[0] for p in paths),
        "reachable_from_root_mean": statistics.mean(p[1] for p in paths),
        "neg_depth_mean": statistics.mean(p[2] for p in paths),
        "question_words_mean": statistics.mean(len(r["question"].split()) for r in records),
        "target_first_frac": target_first / len(records),
        "answer_is_target_frac": answer_target / len(records),
        "distinct_names": sum(1 for w in words if w[:1].isupper()),
        "distinct_concepts": sum(1 for w in words if not w[:1].isupper()),
    })
    return stats
