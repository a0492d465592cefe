"""Driving a scheduler from a test: requests that record what they emitted, small random
models, and waiting for replies (``test_slot_engine.py``, ``test_prefix_cache.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bot.generators.base import GenerationParams
from bot.generators.scheduler import BatchScheduler, Request
from tests.auxil.waiting import until


class Reply:
    """What one request emitted: its tokens, then its end (or the error that ended it)."""

    def __init__(self, log: list[Reply] | None = None) -> None:
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.ended = False
        self.log = log
        self.hook: Callable[[], None] | None = None
        """Run on the scheduler's thread after each token."""
        self.ends: Callable[[], None] | None = None
        """Run on the scheduler's thread at the end."""

    def __call__(self, item: int | BaseException | None) -> None:
        if isinstance(item, int):
            self.tokens.append(item)
            if self.log is not None:
                self.log.append(self)
            if self.hook is not None:
                self.hook()
            return
        self.error, self.ended = item, True
        if self.ends is not None:
            self.ends()


def greedy(tokens: int, penalty: float = 1.3) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=penalty)


def ids(length: int, seed: int) -> list[int]:
    """A prompt of token ids for the tiny models (vocabulary of 256)."""
    return [(seed * 31 + 37 * i) % 255 + 1 for i in range(length)]


def tiny(family: type = LlamaForCausalLM, config: type = LlamaConfig, window: int = 512,
         **settings: Any) -> Any:
    """A small random model with grouped-query attention (4 heads, 2 kv heads) and no EOS."""
    torch.manual_seed(0)
    return family(config(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=window, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, **settings)).eval()


def generate(model: Any, prompt: Sequence[int], tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                             attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))
    return list(out[0, len(prompt):].tolist())


@contextmanager
def running(scheduler: BatchScheduler) -> Iterator[BatchScheduler]:
    scheduler.start()
    try:
        yield scheduler
    finally:
        scheduler.stop()


def submit(scheduler: BatchScheduler, prompt: Sequence[int], params: GenerationParams,
           log: list[Reply] | None = None) -> tuple[Request, Reply]:
    reply = Reply(log)
    request = Request(prompt, params, reply, ignore_eos=True)
    scheduler.submit(request)
    return request, reply


async def replies(scheduler: BatchScheduler, prompts: Sequence[Sequence[int]],
                  params: GenerationParams, log: list[Reply] | None = None) -> list[Reply]:
    """Submit all at once; their replies, once all have ended."""
    got = [submit(scheduler, prompt, params, log)[1] for prompt in prompts]
    await until(lambda: all(reply.ended for reply in got), "the replies", within=180)
    return got


async def answers(scheduler: BatchScheduler, prompts: Sequence[Sequence[int]],
                  params: GenerationParams) -> list[list[int]]:
    got = await replies(scheduler, prompts, params)
    assert [reply.error for reply in got] == [None] * len(got)
    return [reply.tokens for reply in got]


async def alone(scheduler: BatchScheduler, prompts: Sequence[Sequence[int]],
                params: GenerationParams) -> list[list[int]]:
    return [(await answers(scheduler, [prompt], params))[0] for prompt in prompts]
