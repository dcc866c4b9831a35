"""The one thread that runs the model: a bounded queue of requests, run-to-completion batches.

    submit(job)   from the server's event loop: queued, or QueueFullError when --max-queue wait already
    worker        takes the oldest job and up to max_batch - 1 later ones that can share its batch,
                  left-pads their prompts into one batch and runs generation.loop.stream_tokens on it;
                  each row's tokens become text (TextDeltas: stop strings, whole UTF-8 characters) and
                  are handed to its job's `deliver` as they come; the next batch starts when every
                  row of this one is done

Jobs share a batch when their sampling settings are equal (greedy with greedy), none of them is a
seeded sampled request (a seed reproduces `glm4v generate --seed` only with its own generator, so
such a job runs alone), and the longest prompt plus the largest max_tokens fits the context (the
cache is sized once for the batch). A row that is done (a stop id, its max_tokens, a stop string,
a cancel) has its answer finished at once and leaves the batch (stream_tokens' stop_rows): in eager
mode the later steps compute only the rows still running; the batch ends with its last row.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glm4v_core.errors import GLM4VError
from glm4v_core.generation.loop import stream_tokens
from glm4v_core.generation.streaming import TextDeltas
from glm4v_core.processing.chat import pad_left
from glm4v_core.serving.prompts import Prompt

log = logging.getLogger("glm4v.serve")


class QueueFullError(GLM4VError):
    """--max-queue requests are already waiting; the server answers 429."""


class ServerClosingError(GLM4VError):
    """The server is shutting down and takes no new request; it answers 503."""


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str       # "stop" (a stop id or stop string) or "length" (max_tokens)
    tokens: int       # new tokens generated, the stop id included
    batch: int        # rows in the batch that answered it


@dataclass
class Failed:
    error: Exception  # a GLM4VError is the request's fault (400), anything else the server's (500)


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    prompt: Prompt
    deliver: Callable[[Event], None]  # called on the worker thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Batcher:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, compile: bool = False):
        self.model, self.tokenizer, self.compile = model, tokenizer, compile
        self.max_batch, self.max_queue = max_batch, max_queue
        self.batch_sizes: list[int] = []  # every batch run so far (tests and the benchmark read it)
        self._pending: deque[Job] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="glm4v-serve-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise ServerClosingError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are already waiting (--max-queue "
                                     f"{self.max_queue}); retry later")
            self._pending.append(job)
            self._lock.notify()

    def close(self, timeout: float) -> None:
        """Finish the running batch (up to `timeout` s); jobs still waiting fail with ServerClosingError."""
        with self._lock:
            self._closing = True
            waiting, self._pending = list(self._pending), deque()
            self._lock.notify()
        for job in waiting:
            job.deliver(Failed(ServerClosingError("the server shut down before this request ran")))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.batch_sizes.append(len(batch))
            rows = [Row(job, TextDeltas(self.tokenizer, job.prompt.stop), len(batch)) for job in batch]
            try:
                self._run(rows)
            except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
                if not isinstance(e, GLM4VError):
                    log.exception("generation failed")
                for row in rows:
                    if not row.done:
                        row.fail(e)

    def _next_batch(self) -> list[Job] | None:
        with self._lock:
            while True:
                while self._pending and self._pending[0].cancelled.is_set():
                    self._pending.popleft()  # its client left or timed out while it waited
                if self._pending:
                    break
                if self._closing:
                    return None
                self._lock.wait()
            batch = [self._pending.popleft()]
            for job in list(self._pending):
                if len(batch) == self.max_batch:
                    break
                if not job.cancelled.is_set() and self._fits(batch, job):
                    batch.append(job)
                    self._pending.remove(job)
            return batch

    def _fits(self, batch: list[Job], job: Job) -> bool:
        first, p = batch[0].prompt, job.prompt
        if p.sampling != first.sampling or (p.sampling.do_sample and (p.seed is not None or first.seed is not None)):
            return False
        rows = [j.prompt for j in batch] + [p]
        return max(r.slots for r in rows) + max(r.max_tokens for r in rows) <= self.model.config.context_length

    def _run(self, rows: list[Row]) -> None:
        prompts = [row.job.prompt for row in rows]
        ids, mask, positions = pad_left([p.input_ids for p in prompts], self.tokenizer.pad_id)
        if len({len(p.input_ids) for p in prompts}) == 1:
            mask = positions = None  # nothing padded: the inputs of `glm4v generate` exactly
        images = [image for p in prompts for image in p.images] or None  # reading order: row by row
        sampling, generator = prompts[0].sampling, None
        if sampling.do_sample:
            generator = torch.Generator(device=self.model.device)
            if prompts[0].seed is None:
                generator.seed()  # a fresh draw, as without --seed
            else:
                generator.manual_seed(prompts[0].seed)
        done = torch.zeros(len(rows), dtype=torch.bool)  # rows finished here leave the batch (stop_rows)
        for row_index, row in enumerate(rows):
            row.leave = lambda i=row_index: done.__setitem__(i, True)
        steps = stream_tokens(self.model, ids, images, mask, positions,
                              max_new_tokens=max(p.max_tokens for p in prompts), sampling=sampling,
                              generator=generator, vocab_limit=self.tokenizer.vocab_size, compile=self.compile,
                              stop_rows=done)
        try:
            for step in steps:
                tokens, finished = step.tokens.tolist(), step.finished.tolist()
                for row, token, stopped in zip(rows, tokens, finished, strict=True):
                    if not row.done:
                        row.take(token, stopped)
                if all(row.done for row in rows):
                    break
        finally:
            steps.close()
        for row in rows:
            if not row.done:  # cannot happen (every row reaches its max_tokens by the last step); never hang
                row.finish("length")


class Row:
    """One job's answer as its tokens arrive (the rule of generation.streaming.stream_text, per row)."""

    def __init__(self, job: Job, deltas: TextDeltas, batch: int):
        self.job, self.deltas, self.batch = job, deltas, batch
        self.tokens, self.done = 0, False
        self.leave: Callable[[], None] = lambda: None  # set by the batch: frees this row's place in the compute

    def take(self, token: int, stopped: bool) -> None:
        if self.job.cancelled.is_set():
            self.done = True
            self.leave()
            return
        self.tokens += 1
        if stopped:  # a stop id: counted, never shown
            return self.finish("stop")
        delta = self.deltas.push(token)
        if delta:
            self.job.deliver(Delta(delta))
        if self.deltas.stopped:
            self.finish("stop")
        elif self.tokens == self.job.prompt.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        tail = self.deltas.flush()
        if tail:
            self.job.deliver(Delta(tail))
        self.job.deliver(Finished(reason, self.tokens, self.batch))
        self.done = True
        self.leave()

    def fail(self, error: Exception) -> None:
        self.job.deliver(Failed(error))
        self.done = True
