"""The paged inference engine: paged KV cache, continuous batching, continuous thoughts."""
from .block_manager import BlockAllocator
from .kv_cache import PagedKVCache
from .llm import LLM
from .scheduler import Scheduler, SchedulerStats, StepRecord
from .sequence import Phase, RequestOutput, SamplingParams, Sequence
from .step import ScheduledStep, StepOutput

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "Phase", "Sequence", "BlockAllocator", "PagedKVCache",
    "Scheduler", "SchedulerStats", "StepRecord", "ScheduledStep", "StepOutput",
]
