"""The graph of a ProsQA record: frontiers by hop count, which nodes lead to the target, concept tokens.

A record (official ProsQA or `coconut_fast.data.prosqa.generate_prosqa`) carries `idx_to_symbol`
(node names), `edges` ([parent, child] pairs: "every child-concept is a parent-concept" reads as
parent -> child, the direction the reasoning steps walk), `root` and `target`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.prosqa import bfs_distances

GRAPH_KEYS = ("idx_to_symbol", "edges", "root", "target")
# The answer reads "<root> is a <concept>.", so the model meets a concept right after "is a".
CONCEPT_CONTEXT = "is a"


def has_graph(record: dict) -> bool:
    return isinstance(record, dict) and all(k in record for k in GRAPH_KEYS)


@dataclass
class ProsQAGraph:
    """A record's graph: `children[u]` are the nodes one hop from u."""

    symbols: list[str]
    children: list[list[int]]
    root: int
    target: int

    @property
    def num_nodes(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_record(cls, record: dict, index: int = 0) -> "ProsQAGraph":
        """The graph of a record; a ValueError names the missing or malformed field."""
        if not isinstance(record, dict):
            raise ValueError(f"record {index}: expected an object, got {type(record).__name__}")
        missing = [k for k in GRAPH_KEYS if k not in record]
        if missing:
            raise ValueError(
                f"record {index}: the graph analysis needs the ProsQA fields {', '.join(GRAPH_KEYS)}; "
                f"missing {', '.join(missing)}"
            )
        symbols = record["idx_to_symbol"]
        if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) and s for s in symbols):
            raise ValueError(f"record {index}: 'idx_to_symbol' must be a non-empty list of non-empty strings")
        n = len(symbols)
        for key in ("root", "target"):
            v = record[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise ValueError(f"record {index}: '{key}' must be a node index in [0, {n}), got {v!r}")
        children: list[list[int]] = [[] for _ in range(n)]
        for e in record["edges"]:
            ok = isinstance(e, (list, tuple)) and len(e) == 2
            ok = ok and all(not isinstance(x, bool) and isinstance(x, int) and 0 <= x < n for x in e)
            if not ok:
                raise ValueError(f"record {index}: each edge must be [parent, child] with node indices in [0, {n}), got {e!r}")
            if e[1] not in children[e[0]]:
                children[e[0]].append(e[1])
        return cls(list(symbols), children, record["root"], record["target"])

    def reachable_in(self, hops: int) -> set[int]:
        """Nodes at the end of a walk of exactly `hops` edges from the root (the frontier after `hops` steps)."""
        if hops < 0:
            raise ValueError(f"hops must be >= 0, got {hops}")
        level = {self.root}
        for _ in range(hops):
            level = {c for u in level for c in self.children[u]}
        return level

    def leading_to_target(self) -> set[int]:
        """Nodes from which the target can be reached (the target included)."""
        parents: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for u, cs in enumerate(self.children):
            for c in cs:
                parents[c].append(u)
        seen, stack = {self.target}, [self.target]
        while stack:
            for p in parents[stack.pop()]:
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return seen

    def frontier(self, hops: int) -> tuple[list[int], list[int]]:
        """The frontier after `hops` steps, split into nodes that lead to the target and those that do not."""
        lead = self.leading_to_target()
        nodes = sorted(self.reachable_in(hops))
        return [v for v in nodes if v in lead], [v for v in nodes if v not in lead]

    def distances(self) -> list[int | None]:
        """Shortest number of hops from the root to each node (None: unreachable)."""
        dist = bfs_distances(self.children, self.root)
        return [dist.get(v) for v in range(self.num_nodes)]

    def heights(self) -> list[int]:
        """Shortest number of hops from each node down to a node without children (the paper's 'height')."""
        height = [0 if not cs else -1 for cs in self.children]
        changed = True
        while changed:  # relax until stable; graphs are small
            changed = False
            for u, cs in enumerate(self.children):
                best = min((height[c] + 1 for c in cs if height[c] >= 0), default=-1)
                if best >= 0 and (height[u] < 0 or best < height[u]):
                    height[u], changed = best, True
        return height


def concept_token_id(tokenizer, symbol: str) -> int:
    """The first token of `symbol` as the model sees it after "is a" (e.g. GPT-2's ' sterpus' -> ' ster').

    ProsQA writes every concept after a space ("is a wumpus", "Every wumpus"), so the token is
    that of the space-prefixed word in context, whatever the tokenizer's prefix-space rules."""
    context = tokenizer.encode(CONCEPT_CONTEXT, add_special_tokens=False)
    full = tokenizer.encode(f"{CONCEPT_CONTEXT} {symbol}", add_special_tokens=False)
    if full[: len(context)] != context or len(full) == len(context):
        raise ValueError(
            f"cannot isolate the first token of {symbol!r}: {CONCEPT_CONTEXT!r} tokenizes differently before it"
        )
    return full[len(context)]


def concept_token_ids(tokenizer, symbols: list[str]) -> list[int]:
    return [concept_token_id(tokenizer, s) for s in symbols]


def frontier_masses(probs: torch.Tensor, token_ids: list[int], lead: list[int], other: list[int]) -> dict:
    """Probability mass of one thought's vocabulary distribution `probs` [V] on a split frontier.

    Each group's mass sums the probabilities of the group's DISTINCT first tokens and `rest_mass`
    those of every other token, so lead_mass + other_mass + rest_mass = 1 + (mass of the tokens
    shared by both groups): exactly 1 when no leading and non-leading node share a first token
    (`shared_tokens` == 0)."""
    lead_t = {token_ids[v] for v in lead}
    other_t = {token_ids[v] for v in other}

    def mass(tokens: set[int]) -> float:
        return float(probs[sorted(tokens)].sum()) if tokens else 0.0

    rest = torch.ones_like(probs, dtype=torch.bool)
    rest[sorted(lead_t | other_t)] = False
    return {
        "lead_mass": mass(lead_t),
        "other_mass": mass(other_t),
        "rest_mass": float(probs[rest].sum()),
        "shared_tokens": len(lead_t & other_t),
    }


def read_step(graph: ProsQAGraph, text: str) -> dict:
    """The nodes a language step "[Every] A is a B." (or tersely "[Every] A B.") names, and whether A -> B is an
    edge of the graph.

    `subject`/`object` are node indices (None when the word is not a node or the step has another form)."""
    words = text.replace("#", " ").strip().rstrip(".").split()
    if words[:1] == ["Every"]:
        words = words[1:]
    index = {s: i for i, s in enumerate(graph.symbols)}
    subject = obj = None
    if len(words) == 4 and words[1:3] in (["is", "a"], ["is", "an"]):
        subject, obj = index.get(words[0]), index.get(words[3])
    elif len(words) == 2:  # the terse wording: "[Every] A B."
        subject, obj = index.get(words[0]), index.get(words[1])
    is_edge = subject is not None and obj is not None and obj in graph.children[subject]
    lead = graph.leading_to_target()
    return {
        "subject": subject,
        "object": obj,
        "is_edge": is_edge,
        "object_leads_to_target": obj is not None and obj in lead,
    }
