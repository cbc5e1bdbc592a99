"""The paged inference engine: paged KV cache, continuous batching, continuous thoughts."""
from .block_manager import BlockAllocator, PagedKVCache
from .llm import LLM, engine_for
from .scheduler import Scheduler, SchedulerStats, StepRecord
from .sequence import Phase, RequestOutput, SamplingParams, Sequence

__all__ = [
    "LLM", "engine_for", "SamplingParams", "RequestOutput", "Phase", "Sequence",
    "BlockAllocator", "PagedKVCache", "Scheduler", "SchedulerStats", "StepRecord",
]
