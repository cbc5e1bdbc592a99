"""Datasets, curriculum and batching for Coconut training."""
from .collator import CoconutCollator
from .curriculum import (
    MODES,
    CurriculumConfig,
    LatentIds,
    build_eval_example,
    build_eval_set,
    build_training_example,
    build_training_set,
    stage_for_epoch,
)
from .records import (
    TokenizedRecord,
    answer_matches,
    check_tokenization,
    extract_answer,
    extract_cot,
    load_records,
    tokenize_record,
)
from .prosqa import generate_prosqa
from .tokenizer import build_local_tokenizer, default_tokenizer, gpt2_tokenizer

__all__ = [
    "MODES",
    "CoconutCollator",
    "CurriculumConfig",
    "LatentIds",
    "TokenizedRecord",
    "answer_matches",
    "build_eval_example",
    "build_eval_set",
    "build_local_tokenizer",
    "build_training_example",
    "build_training_set",
    "check_tokenization",
    "default_tokenizer",
    "extract_answer",
    "extract_cot",
    "generate_prosqa",
    "gpt2_tokenizer",
    "load_records",
    "stage_for_epoch",
    "tokenize_record",
]
