"""Latent analysis: what the continuous thoughts of a Coconut model hold (logit lens, ProsQA
frontiers and value curves, switching to language after k thoughts, thought norms and cosines)."""
from .analyze import analyze, graph_result, value_curves
from .lens import consecutive_cosines, lens_probs, thought_norms, top_tokens
from .prosqa_graph import GRAPH_KEYS, ProsQAGraph, concept_token_id, concept_token_ids, frontier_masses, has_graph
from .report import write_report
from .switch import Step, read_steps, stop_token_ids, switch_steps

__all__ = [
    "GRAPH_KEYS",
    "ProsQAGraph",
    "Step",
    "analyze",
    "concept_token_id",
    "concept_token_ids",
    "consecutive_cosines",
    "frontier_masses",
    "graph_result",
    "has_graph",
    "lens_probs",
    "read_steps",
    "stop_token_ids",
    "switch_steps",
    "thought_norms",
    "top_tokens",
    "value_curves",
    "write_report",
]
