import json
import os
from collections import deque
from pathlib import Path

import pytest

from coconut_fast.data.prosqa import concept_vocabulary, generate_prosqa, prosqa_statistics, write_json

OFFICIAL_KEYS = ["question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target"]


def official_dir() -> Path | None:
    env = os.environ.get("COCONUT_PROSQA_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/prosqa"
    return d if (d / "prosqa_valid.json").is_file() and (d / "prosqa_test.json").is_file() else None


def reach(record: dict, source: int) -> dict[int, int]:
    """BFS distances over the record's edges, written apart from the generator's own code."""
    children = {}
    for a, b in record["edges"]:
        children.setdefault(a, []).append(b)
    dist, todo = {source: 0}, deque([source])
    while todo:
        u = todo.popleft()
        for v in children.get(u, []):
            if v not in dist:
                dist[v] = dist[u] + 1
                todo.append(v)
    return dist


def check_record(r: dict) -> None:
    sym = r["idx_to_symbol"]
    index = {s: i for i, s in enumerate(sym)}
    assert len(index) == len(sym), "symbols must be distinct"
    edges = {tuple(e) for e in r["edges"]}
    assert len(edges) == len(r["edges"])
    has_parent = {b for _, b in edges}
    # the question lists exactly one fact per edge, entities as "X is a A.", concepts as "Every A is a B."
    facts, ask = r["question"].rsplit(" Is ", 1)
    want = sorted((f"Every {sym[a]} is a {sym[b]}." if a in has_parent else f"{sym[a]} is a {sym[b]}.")
                  for a, b in edges)
    assert sorted(f + "." for f in facts[:-1].split(". ")) == want
    name, _, opt1, _, opt2 = ask.rstrip("?").split(" ")
    assert name == sym[r["root"]] and r["root"] not in has_parent
    assert {opt1, opt2} == {sym[r["target"]], sym[r["neg_target"]]}
    assert r["answer"] == f"{sym[r['root']]} is a {sym[r['target']]}."
    # steps: a path along edges from root to target, as short as possible
    node = r["root"]
    for i, step in enumerate(r["steps"]):
        words = step.rstrip(".").split(" ")
        head = words[0] if i == 0 else words[1]
        assert step == (f"{head} is a {words[-1]}." if i == 0 else f"Every {head} is a {words[-1]}.")
        assert index[head] == node
        assert (node, index[words[-1]]) in edges
        node = index[words[-1]]
    assert node == r["target"]
    dist = reach(r, r["root"])
    assert dist[r["target"]] == len(r["steps"])
    assert r["neg_target"] not in dist
    # the distractor is reached from some other entity, so it is not trivially dangling
    assert any(r["neg_target"] in reach(r, e) for e in range(len(sym)) if e not in has_parent)


def test_deterministic_per_seed():
    a, b = generate_prosqa(40, seed=7), generate_prosqa(40, seed=7)
    assert a == b
    c = generate_prosqa(40, seed=8)
    assert a != c and sum(x == y for x, y in zip(a, c)) == 0
    # a longer run extends a shorter one with the same seed
    assert generate_prosqa(60, seed=7)[:40] == a


def test_keys_and_plain_json_types():
    for r in generate_prosqa(20, seed=1):
        assert list(r) == OFFICIAL_KEYS
        assert isinstance(r["question"], str) and isinstance(r["answer"], str)
        assert all(isinstance(s, str) for s in r["steps"])
        assert all(isinstance(s, str) for s in r["idx_to_symbol"])
        assert all(isinstance(e, list) and len(e) == 2 and all(type(x) is int for x in e) for e in r["edges"])
        assert all(type(r[k]) is int for k in ("root", "target", "neg_target"))
        assert json.loads(json.dumps(r)) == r


def test_keys_match_official():
    d = official_dir()
    if d is None:
        pytest.skip("official ProsQA files not found (set COCONUT_PROSQA_DIR)")
    official = json.loads((d / "prosqa_valid.json").read_text())[0]
    assert list(generate_prosqa(1)[0]) == list(official)
    check_record(official)  # the checker itself agrees with the official data


@pytest.mark.parametrize("size", [0, 1, 500])
def test_any_size_all_valid(size):
    records = generate_prosqa(size, seed=size)
    assert len(records) == size
    for r in records:
        check_record(r)
        assert 3 <= len(r["steps"]) <= 6


def test_step_bounds_and_knobs():
    records = generate_prosqa(60, seed=3, min_steps=5, max_steps=5)
    assert {len(r["steps"]) for r in records} == {5}
    for r in records:
        check_record(r)
    words = ["zorpus", "quimpus", "blerpus"] + concept_vocabulary(60)[3:]
    records = generate_prosqa(30, seed=4, concepts=words, names=["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus"])
    for r in records:
        check_record(r)
        assert all(s in words or s in "Ann Bo Cy Di Ed Flo Gus".split() for s in r["idx_to_symbol"])


def test_terse_wording_writes_the_same_graphs_without_is_a():
    prosqa = generate_prosqa(40, seed=5, min_steps=1, max_steps=3, min_nodes=6, max_nodes=9)
    terse = generate_prosqa(40, seed=5, min_steps=1, max_steps=3, min_nodes=6, max_nodes=9, wording="terse")
    for p, t in zip(prosqa, terse):
        assert {k: v for k, v in p.items() if k not in ("question", "answer", "steps")} == \
            {k: v for k, v in t.items() if k not in ("question", "answer", "steps")}
        sym = t["idx_to_symbol"]
        # each fact is the two symbols side by side; the question sentence is the official one
        assert t["answer"] == f"{sym[t['root']]} {sym[t['target']]}."
        assert [x.replace(" is a ", " ") for x in p["steps"]] == t["steps"]
        assert p["question"].replace(" is a ", " ") == t["question"]
        assert " is a " not in t["question"] and t["question"].rsplit(". ", 1)[-1] == p["question"].rsplit(". ", 1)[-1]
        assert t["question"].rsplit(". ", 1)[-1].startswith(f"Is {sym[t['root']]} a ")
    with pytest.raises(ValueError, match="wording must be one of .'prosqa', 'terse'., got 'plain'"):
        generate_prosqa(1, wording="plain")


def test_invalid_arguments():
    with pytest.raises(ValueError):
        generate_prosqa(-1)
    with pytest.raises(ValueError):
        generate_prosqa(1, min_steps=4, max_steps=3)
    with pytest.raises(ValueError):
        generate_prosqa(1, names=["Bob"], concepts=["Bob", "lempus"])
    with pytest.raises(RuntimeError):
        generate_prosqa(1, min_steps=40, max_steps=40, max_tries=20)


def test_concept_vocabulary():
    words = concept_vocabulary(38)
    assert words == concept_vocabulary(38) and len(set(words)) == 38
    assert all(w.endswith("pus") and w.islower() and w.isalpha() for w in words)


def test_write_json_round_trip(tmp_path):
    records = generate_prosqa(5, seed=2)
    path = tmp_path / "sub" / "prosqa_train.json"
    write_json(records, path)
    assert json.loads(path.read_text()) == records


def test_statistics_on_generated():
    records = generate_prosqa(300, seed=5)
    s = prosqa_statistics(records)
    assert s["records"] == 300
    assert s["steps_min"] >= 3 and s["steps_max"] <= 6
    assert sum(v for k, v in s.items() if k.startswith("steps_") and k.endswith("_frac")) == pytest.approx(1)
    assert s["answer_is_target_frac"] == 1.0
    assert 0.35 < s["target_first_frac"] < 0.65
    assert s["shortest_paths_mean"] >= 1 and s["neg_depth_mean"] >= 1
    assert prosqa_statistics([]) == {"records": 0}


# generated statistic -> largest allowed distance from the official value (1000 generated records)
TOLERANCE = {
    "steps_mean": 0.15,
    "steps_3_frac": 0.06,
    "steps_4_frac": 0.06,
    "steps_5_frac": 0.05,
    "steps_6_frac": 0.03,
    "nodes_mean": 1.0,
    "edges_mean": 2.0,
    "entities_mean": 0.3,
    "shortest_paths_mean": 0.15,
    "reachable_from_root_mean": 1.0,
    "neg_depth_mean": 0.2,
    "question_words_mean": 10.0,
    "target_first_frac": 0.06,
    "answer_is_target_frac": 0.0,
}


def test_statistics_match_official():
    d = official_dir()
    if d is None:
        pytest.skip("official ProsQA files not found (set COCONUT_PROSQA_DIR)")
    official = [r for f in ("prosqa_valid.json", "prosqa_test.json") for r in json.loads((d / f).read_text())]
    want, got = prosqa_statistics(official), prosqa_statistics(generate_prosqa(1000, seed=0))
    assert (got["steps_min"], got["steps_max"]) == (want["steps_min"], want["steps_max"])
    off = {k: (round(got[k], 3), round(want[k], 3)) for k, tol in TOLERANCE.items() if abs(got[k] - want[k]) > tol}
    assert not off, f"generated vs official outside tolerance: {off}"
