"""A continuous batcher: the loop an LLM server runs, with a simulated model.

Every step of the model advances every sequence in the batch by one token and costs the
same whether the batch holds 1 sequence or 32 (on a GPU, a decode step is bound by
reading the weights, not by the batch). New sequences join the batch between steps and
finished ones leave it, so nobody waits for the slowest sequence of a batch to finish.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

#: the most sequences one model step takes
MAX_BATCH = 32
#: what one model step costs, whatever the batch size
STEP_SECONDS = 0.02


@dataclass
class Sequence:
    prompt: str
    max_tokens: int
    done: asyncio.Future[Completion]
    tokens: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    mean_batch: float


class ContinuousBatcher:
    """One shared decode loop; :meth:`generate` is what each input awaits."""

    def __init__(self, max_batch: int = MAX_BATCH, step_seconds: float = STEP_SECONDS) -> None:
        self.max_batch = max_batch
        self.step_seconds = step_seconds
        self.waiting: deque[Sequence] = deque()
        self.steps = 0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def generate(self, prompt: str, max_tokens: int) -> Completion:
        sequence = Sequence(prompt, max_tokens, asyncio.get_running_loop().create_future())
        self.waiting.append(sequence)
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._decode_loop())
        return await sequence.done

    async def _decode_loop(self) -> None:
        running: list[Sequence] = []
        while True:
            # Between steps: admit waiting sequences into the free places of the batch.
            while self.waiting and len(running) < self.max_batch:
                running.append(self.waiting.popleft())
            if not running:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._model_step(running)
            for sequence in running:
                sequence.tokens.append(f"t{len(sequence.tokens)}")
                sequence.batch_sizes.append(len(running))
            finished = [s for s in running if len(s.tokens) >= s.max_tokens]
            running = [s for s in running if len(s.tokens) < s.max_tokens]
            for sequence in finished:
                if not sequence.done.done():
                    sequence.done.set_result(
                        Completion(
                            text=f"{sequence.prompt} -> {' '.join(sequence.tokens)}",
                            tokens=len(sequence.tokens),
                            mean_batch=sum(sequence.batch_sizes) / len(sequence.batch_sizes),
                        )
                    )

    async def _model_step(self, batch: list[Sequence]) -> None:
        """A forward pass over the whole batch: the same cost for 1 or 32 sequences."""
        self.steps += 1
        await asyncio.sleep(self.step_seconds)


async def static_batch(
    prompts: list[str], max_tokens: list[int], step_seconds: float = STEP_SECONDS
) -> list[Completion]:
    """Dynamic (static) batching: the whole batch steps together until its longest
    sequence is done; nobody joins or leaves in between (what ``@batched`` calls)."""
    tokens: list[list[str]] = [[] for _ in prompts]
    for _ in range(max(max_tokens)):
        await asyncio.sleep(step_seconds)  # one forward pass over the whole batch
        for want, made in zip(max_tokens, tokens, strict=True):
            if len(made) < want:
                made.append(f"t{len(made)}")
    return [
        Completion(text=f"{p} -> {' '.join(t)}", tokens=len(t), mean_batch=len(prompts))
        for p, t in zip(prompts, tokens, strict=True)
    ]


_batchers: dict[asyncio.AbstractEventLoop, ContinuousBatcher] = {}


def batcher() -> ContinuousBatcher:
    """The batcher of this event loop: one per container, shared by all its inputs."""
    loop = asyncio.get_running_loop()
    if loop not in _batchers:
        _batchers[loop] = ContinuousBatcher()
    return _batchers[loop]
