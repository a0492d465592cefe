"""Prometheus metrics: what the bot is sent, answers, refuses and fails; how long replies
take; what the model's scheduler is doing; how often the database and the platforms make
it wait.

One ``Metrics`` per process, handed to whatever counts: the dialogue manager (intake and
answering), the store, the platform adapters (through the manager they feed). Its
collectors live on a registry of its own rather than ``prometheus_client``'s global one, so
a test may make as many as it likes; one that nothing serves costs a few counters. The
scheduler's numbers are not pushed here: they are read from the generator at each scrape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bot import __version__
from bot.generators import Generator
from bot.generators.pool import ModelPool
from bot.generators.stats import RATE_WINDOW_S, STEP_BUCKETS_S, SchedulerStats

REFUSALS = ("rate_limit", "quota", "blocked", "busy")
"""Why a message is refused: the sender is over the rate limit or the daily quota, is
blocked, or the model is full (beyond ``CHINWAG_MAX_QUEUED``)."""
FAILURES = ("generation", "timeout", "storage", "error")
"""Why a message is not answered: the model failed, took longer than
``CHINWAG_GENERATION_TIMEOUT``, the database could not store it, or anything else."""
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TEXT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@runtime_checkable
class Scheduled(Protocol):
    """A generator that runs a batch scheduler of its own (the in-process model)."""

    @property
    def device(self) -> str | None: ...

    def scheduler_stats(self) -> SchedulerStats | None: ...


class Metrics:
    def __init__(self, *, platforms: Sequence[str] = ()) -> None:
        """``platforms``: those configured, whose series start at zero (so that a rate
        over them exists before the first message)."""
        self.registry = CollectorRegistry()
        registry = self.registry
        by_platform = ["platform"]
        self._received = Counter(
            "chinwag_messages_received", "Messages for the bot (addressed to it, or in a "
            "chat it listens to), commands included", by_platform, registry=registry)
        self._answered = Counter("chinwag_messages_answered", "Messages answered",
                                 by_platform, registry=registry)
        self._refused = Counter(
            "chinwag_messages_refused", "Messages not answered on purpose: the sender is "
            "over the rate limit or the daily quota, blocked, or the model is full",
            ["platform", "reason"], registry=registry)
        self._failed = Counter(
            "chinwag_messages_failed", "Messages that could not be answered: the model "
            "failed or took too long, the database could not store it, or another error",
            ["platform", "reason"], registry=registry)
        self._latency = Histogram(
            "chinwag_reply_latency_seconds", "From a message's arrival to its whole answer "
            "shown and stored", by_platform, buckets=LATENCY_BUCKETS_S, registry=registry)
        self._first_text = Histogram(
            "chinwag_first_text_seconds", "From a message's arrival to the first text of "
            "its answer shown", by_platform, buckets=FIRST_TEXT_BUCKETS_S, registry=registry)
        self._prompt_tokens = Counter("chinwag_prompt_tokens", "Prompt tokens of answers",
                                      by_platform, registry=registry)
        self._reply_tokens = Counter("chinwag_reply_tokens", "Tokens of answers",
                                     by_platform, registry=registry)
        self._db_retries = Counter(
            "chinwag_database_retries", "Store calls tried again after a passing database "
            "failure (locked, restarting, every connection busy)", ["operation"],
            registry=registry)
        self._db_failures = Counter(
            "chinwag_database_failures", "Store calls that failed for good (after their "
            "retries)", ["operation"], registry=registry)
        self._rate_limited = Counter(
            "chinwag_platform_429_responses", "Requests a platform refused with 429 (flood "
            "control)", by_platform, registry=registry)
        self._flood_waits = Counter(
            "chinwag_flood_waits", "Waits a platform's flood control asked for and got",
            by_platform, registry=registry)
        self._flood_seconds = Counter(
            "chinwag_flood_wait_seconds", "Seconds spent in those waits", by_platform,
            registry=registry)
        self._loop_lag = Gauge(
            "chinwag_event_loop_lag_seconds", "How long the event loop took to run a "
            "callback, at the last scrape", registry=registry)
        self._build = Info("chinwag_build", "Chinwag's version, model and device",
                           registry=registry)
        self._build.info({"version": __version__})
        self._scheduler = _SchedulerCollector()
        registry.register(self._scheduler)
        for platform in platforms:
            self._start(platform)

    def _start(self, platform: str) -> None:
        for metric in (self._received, self._answered, self._latency, self._first_text,
                       self._prompt_tokens, self._reply_tokens, self._rate_limited,
                       self._flood_waits, self._flood_seconds):
            metric.labels(platform)
        for reason in REFUSALS:
            self._refused.labels(platform, reason)
        for reason in FAILURES:
            self._failed.labels(platform, reason)

    # Messages.

    def received(self, platform: str) -> None:
        self._received.labels(platform).inc()

    def refused(self, platform: str, reason: str) -> None:
        """``reason``: one of ``REFUSALS``."""
        self._refused.labels(platform, reason).inc()

    def failed(self, platform: str, reason: str) -> None:
        """``reason``: one of ``FAILURES``."""
        self._failed.labels(platform, reason).inc()

    def first_text(self, platform: str, seconds: float) -> None:
        self._first_text.labels(platform).observe(seconds)

    def answered(self, platform: str, *, seconds: float, prompt_tokens: int,
                 reply_tokens: int) -> None:
        self._answered.labels(platform).inc()
        self._latency.labels(platform).observe(seconds)
        self._prompt_tokens.labels(platform).inc(prompt_tokens)
        self._reply_tokens.labels(platform).inc(reply_tokens)

    # The database and the platforms.

    def database_retry(self, operation: str) -> None:
        self._db_retries.labels(operation).inc()

    def database_failure(self, operation: str) -> None:
        self._db_failures.labels(operation).inc()

    def rate_limited(self, platform: str) -> None:
        """The platform answered 429."""
        self._rate_limited.labels(platform).inc()

    def flood_wait(self, platform: str, seconds: float) -> None:
        """Waiting before trying again, as the platform's flood control asked."""
        self._flood_waits.labels(platform).inc()
        self._flood_seconds.labels(platform).inc(seconds)

    # The process.

    def loop_lag(self, seconds: float) -> None:
        self._loop_lag.set(seconds)

    def describe(self, *, model: str, generator: str, device: str) -> None:
        """The build info: what runs (known before the model loads; ``watch`` then fills
        in the device it was given)."""
        self._build.info({"version": __version__, "model": model, "generator": generator,
                          "device": device})

    def watch(self, generator: Generator | ModelPool, *, model: str) -> None:
        """From now on, read the scheduler's numbers from this (loaded) generator at each
        scrape, when it has a scheduler, and show the device it runs on. A pool of models
        adds up the schedulers of those loaded (``ModelPool.scheduler_stats``)."""
        scheduled = generator if isinstance(generator, Scheduled) else None
        self._scheduler.source = scheduled
        device = scheduled.device if scheduled is not None else None
        self.describe(model=model, generator=generator.name, device=device or "none")


class _SchedulerCollector(Collector):
    """The scheduler's gauges and counters, as it reports them when scraped."""

    def __init__(self) -> None:
        self.source: Scheduled | None = None

    def collect(self) -> Iterable[Metric]:
        source = self.source
        stats = source.scheduler_stats() if source is not None else None
        if stats is None:
            return []
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*map(repr, STEP_BUCKETS_S), "+Inf"), stats.step_buckets,
                                strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return [
            GaugeMetricFamily("chinwag_scheduler_queue_depth", "Requests waiting for a "
                              "place in the batch (or being prefilled)", value=stats.waiting),
            GaugeMetricFamily("chinwag_scheduler_active_sequences", "Sequences generating "
                              "in the batch", value=stats.running),
            HistogramMetricFamily("chinwag_scheduler_step_seconds", "Time of one scheduling "
                                  "step (a prefill chunk and a decoding step of the batch)",
                                  buckets=buckets, sum_value=stats.step_seconds),
            CounterMetricFamily("chinwag_scheduler_tokens", "Tokens generated",
                                value=stats.tokens),
            CounterMetricFamily("chinwag_scheduler_prompt_tokens_reused", "Prompt tokens "
                                "whose keys and values were kept from a finished "
                                "conversation instead of computed",
                                value=stats.prompt_tokens_reused),
            GaugeMetricFamily("chinwag_scheduler_tokens_per_second", "Tokens generated per "
                              f"second, over the last {RATE_WINDOW_S:g} s",
                              value=stats.tokens_per_second),
        ]
