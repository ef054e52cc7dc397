"""The engine's own thread, and the server's Prometheus metrics.

`EngineLoop` runs `ServingEngine.step()` on one thread while there is work and sleeps on an
event otherwise. Jobs are submitted from the asyncio thread; tokens come back onto each job's
asyncio queue as (choice, "token", id, text, logprob, top) items, followed by one (choice,
"done") item once the engine has finished the request. Items are collected during a step and
handed over after it, all jobs' at once (one `loop.call_soon_threadsafe` per step, not one per
token: every event-loop wake-up costs the engine thread the interpreter lock for a while).
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time

from dsv32_jax.serve.scheduler import Request

log = logging.getLogger("dsv32_jax.serve")


class Job:
    """One engine request and its route back to the event loop. `choice` tags its items."""

    def __init__(self, req: Request, queue: asyncio.Queue, choice: int, aloop, eos_ids: set, metrics):
        self.req, self.queue, self.choice, self.aloop = req, queue, choice, aloop
        self.eos, self.metrics = eos_ids, metrics
        self.t_submit = time.perf_counter()
        self.t_last = None
        self.finished = False
        self.out: list = []             # items not yet handed to the event loop (engine thread only)
        req.on_token = self._on_token

    def _on_token(self, r: Request, token: int, piece: str) -> None:        # engine thread
        now = time.perf_counter()
        if self.t_last is None:
            self.metrics.observe("ttft", now - self.t_submit)
        else:
            self.metrics.observe("itl", now - self.t_last)
        self.t_last = now
        if token in self.eos:
            piece = ""                  # the end-of-sentence token is not part of the reply text
        lp = r.token_logprobs[-1] if r.logprobs and r.token_logprobs else None
        top = r.top_logprobs[-1] if r.logprobs and r.top_logprobs else None
        self.out.append((self.choice, "token", token, piece, lp, top))

    def post_done(self) -> None:                                            # engine thread
        self.metrics.observe("e2e", time.perf_counter() - self.t_submit)
        self.out.append((self.choice, "done"))


def _put_all(batch: list) -> None:
    """On the event loop: every (queue, items) of one engine step onto its queue."""
    for queue, items in batch:
        for item in items:
            queue.put_nowait(item)


def hand_over(jobs) -> None:
    """Engine thread: the jobs' collected items to their event loops, one call per loop."""
    by_loop: dict = {}
    for j in jobs:
        if j.out:
            items, j.out = j.out, []
            by_loop.setdefault(j.aloop, []).append((j.queue, items))
    for aloop, batch in by_loop.items():
        aloop.call_soon_threadsafe(_put_all, batch)


class EngineLoop:
    """Drives a ServingEngine from a daemon thread. `failed` holds the exception that stopped it."""

    def __init__(self, engine):
        self.engine = engine
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """engine.submit (may raise QueueFull / ValueError), then wake the thread."""
        if self.failed is not None:
            raise RuntimeError(f"the engine stopped: {self.failed!r}")
        with self._lock:                 # listed first: its tokens are handed over from the next step on
            self._jobs.append(job)
        try:
            self.engine.submit(job.req)
        except BaseException:
            with self._lock:
                self._jobs.remove(job)
            raise
        self._wake.set()

    def cancel(self, job: Job) -> None:
        if not job.req.done.is_set():
            self.engine.cancel(job.req)
            self._wake.set()

    def _reap(self) -> None:
        with self._lock:
            jobs = list(self._jobs)
            self._jobs = [j for j in jobs if not j.req.done.is_set()]
        for j in jobs:
            if j.req.done.is_set():
                j.post_done()
        hand_over(jobs)

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                if eng.idle:
                    self._reap()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                eng.step()
                self._reap()
        except BaseException as e:          # noqa: BLE001 - reported to every waiting client
            log.exception("the engine loop stopped")
            self.failed = e
            with self._lock:
                jobs, self._jobs = self._jobs, []
            for j in jobs:
                j.req.finish_reason = j.req.finish_reason or "error"
                j.post_done()
            hand_over(jobs)


class Metrics:
    """Counters and histograms rendered in the Prometheus text format."""

    BUCKETS = {
        "ttft": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        "itl": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        "e2e": (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    }
    HELP = {"ttft": "time to first token (seconds)", "itl": "time between tokens of a request (seconds)",
            "e2e": "request latency from submission to finish (seconds)"}

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = {}
        self.hist = {k: ([0] * (len(b) + 1), [0.0]) for k, b in self.BUCKETS.items()}

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            key = (route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe(self, name: str, value: float) -> None:
        counts, total = self.hist[name]
        with self._lock:
            counts[bisect.bisect_left(self.BUCKETS[name], value)] += 1
            total[0] += value

    def render(self, engine, failed: bool) -> str:
        st = engine.stats
        lines = ["# HELP dsv32_requests_total HTTP requests by route and status", "# TYPE dsv32_requests_total counter"]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'dsv32_requests_total{{route="{route}",status="{status}"}} {n}')
            hist = {k: (list(c), t[0]) for k, (c, t) in self.hist.items()}
        gauges = {"queue_depth": (engine.queue_depth(), "requests waiting for a slot"),
                  "slots_in_use": (engine.slots_in_use(), "decode slots holding a request"),
                  "slots_total": (engine.max_slots, "decode slots"),
                  "engine_up": (0 if failed else 1, "1 while the engine loop runs")}
        for name, (v, h) in gauges.items():
            lines += [f"# HELP dsv32_{name} {h}", f"# TYPE dsv32_{name} gauge", f"dsv32_{name} {v}"]
        counters = {"prompt_tokens_total": ("prompt_tokens", "prompt tokens admitted"),
                    "generation_tokens_total": ("generated_tokens", "tokens generated"),
                    "prefix_cache_hit_tokens_total": ("cached_tokens", "prompt tokens read from the prefix cache"),
                    "prefill_tokens_total": ("prefill_tokens", "prompt tokens computed by prefill")}
        for name, (key, h) in counters.items():
            lines += [f"# HELP dsv32_{name} {h}", f"# TYPE dsv32_{name} counter", f"dsv32_{name} {st.get(key, 0)}"]
        for name, (counts, total) in hist.items():
            metric = f"dsv32_{name}_seconds"
            lines += [f"# HELP {metric} {self.HELP[name]}", f"# TYPE {metric} histogram"]
            acc = 0
            for b, c in zip(list(self.BUCKETS[name]) + ["+Inf"], counts):
                acc += c
                lines.append(f'{metric}_bucket{{le="{b}"}} {acc}')
            lines += [f"{metric}_sum {total:.6f}", f"{metric}_count {acc}"]
        return "\n".join(lines) + "\n"
