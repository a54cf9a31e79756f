"""``GET /metrics``: counters, gauges and histograms in the Prometheus text format (version 0.0.4).

Small enough to write out rather than add a dependency: a handful of series, updated from the event loop.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, esc)) + "}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class _Series:
    def __init__(self, name: str, help_: str, kind: str):
        self.name, self.help, self.kind = name, help_, kind
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Series):
    def __init__(self, name: str, help_: str, label: str | None = None):
        super().__init__(name, help_, "counter")
        self.label = label
        self.values: dict[tuple, float] = {} if label else {(): 0.0}

    def inc(self, label_value: str | int | None = None, by: float = 1.0) -> None:
        key = ((self.label, str(label_value)),) if self.label else ()
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + by

    def get(self, label_value: str | int | None = None) -> float:
        key = ((self.label, str(label_value)),) if self.label else ()
        return self.values.get(key, 0.0)

    def lines(self) -> list[str]:
        with self.lock:
            return [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Series):
    """A value read when /metrics is scraped (``kind="counter"`` for a total kept elsewhere, e.g. the engine's)."""

    def __init__(self, name: str, help_: str, read: Callable[[], float], kind: str = "gauge"):
        super().__init__(name, help_, kind)
        self.read = read

    def lines(self) -> list[str]:
        return [f"{self.name} {_num(self.read())}"]


class Histogram(_Series):
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        super().__init__(name, help_, "histogram")
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def lines(self) -> list[str]:
        with self.lock:
            out, running = [], 0
            for le, n in zip((*map(_num, self.buckets), "+Inf"), self.counts):
                running += n
                out.append(f'{self.name}_bucket{{le="{le}"}} {running}')
            return out + [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {running}"]


class Metrics:
    """The server's series. ``queue_depth`` and ``in_flight`` are read when /metrics is scraped."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        prompt_tokens: Callable[[], float] = lambda: 0.0,
        reused_tokens: Callable[[], float] = lambda: 0.0,
        expected_wait: Callable[[], float] = lambda: 0.0,
    ):
        self.requests = Counter("lora_med_requests_total", "POST /chat/ requests by HTTP status.", "status")
        self.latency = Histogram(
            "lora_med_request_seconds", "POST /chat/ time from arrival to reply, in seconds.", LATENCY_BUCKETS
        )
        self.queue_depth = Gauge("lora_med_queue_depth", "Requests waiting for the model.", queue_depth)
        self.in_flight = Gauge("lora_med_in_flight", "POST /chat/ requests being handled.", in_flight)
        self.batch_size = Histogram(
            "lora_med_batch_size", "Rows decoded together while a reply was generated (mean per reply).", BATCH_BUCKETS
        )
        self.generate_seconds = Histogram(
            "lora_med_generate_seconds",
            "Engine time per reply (from joining the batch to the last token), in seconds.",
            LATENCY_BUCKETS,
        )
        self.engine_requests = Counter("lora_med_engine_requests_total", "Prompts sent to the model.")
        self.guard_hits = Counter(
            "lora_med_guard_hits_total",
            "Emergency replies of the triage, by category (unclear: generic advice).",
            "rule",
        )
        self.triage = Counter("lora_med_triage_total", "Messages by triage tier (emergency, caution, none).", "tier")
        self.overridden = Counter(
            "lora_med_model_replies_overridden_total",
            "Model replies that spoke of emergencies, 118 or ambulances on a message the triage did not mark "
            "(replaced by the flow's own reply).",
        )
        self.actions = Counter("lora_med_actions_total", "Replies by action.", "action")
        self.empty_replies = Counter(
            "lora_med_empty_replies_total", "Model replies that were empty (the fallback reply was sent)."
        )
        self.sources = Counter(
            "lora_med_replies_total",
            "Replies by who wrote them: model, facts, guard (the triage), fallback or flow (the model overridden).",
            "source",
        )
        self.replaced = Counter(
            "lora_med_replaced_total",
            "Model replies the checker rejected and the facts' reply replaced, by the first reason found.",
            "reason",
        )
        self.fact_answers = Counter(
            "lora_med_fact_answers_total",
            "Replies built from the facts without asking the model (info, unavailable, summary).",
            "why",
        )
        self.prompt_tokens = Gauge(
            "lora_med_prompt_tokens_total",
            "Prompt tokens sent to the model (with the engine's prefix cache on).",
            prompt_tokens,
            kind="counter",
        )
        self.reused_tokens = Gauge(
            "lora_med_prompt_tokens_reused_total",
            "Prompt tokens taken from the prefix cache instead of computed (earlier turns of the conversation).",
            reused_tokens,
            kind="counter",
        )
        self.openai_requests = Counter(
            "lora_med_openai_requests_total", "POST /v1/chat/completions requests by HTTP status.", "status"
        )
        self.refused = Counter(
            "lora_med_refused_total",
            "Requests refused at the door, by reason: unauthorized (401), too_large (413), invalid_body (422), "
            "overloaded (503: expected wait past request_timeout_s).",
            "reason",
        )
        self.expected_wait = Gauge(
            "lora_med_expected_wait_seconds", "What a request arriving now would wait for the model.", expected_wait
        )
        self.stream_checks = Counter(
            "lora_med_stream_checks_total",
            "Streamed replies by what the checks did: kept (the model's text), replaced (nothing of it had been "
            "sent: the check's reply was), cut (sentences already sent, the rest withheld).",
            "outcome",
        )
        self.client_gone = Counter(
            "lora_med_client_gone_total", "Requests whose client left before the reply; their engine row was freed."
        )
        self._all = (
            self.requests,
            self.openai_requests,
            self.refused,
            self.expected_wait,
            self.stream_checks,
            self.client_gone,
            self.latency,
            self.queue_depth,
            self.in_flight,
            self.batch_size,
            self.generate_seconds,
            self.engine_requests,
            self.guard_hits,
            self.triage,
            self.overridden,
            self.actions,
            self.empty_replies,
            self.sources,
            self.replaced,
            self.fact_answers,
            self.prompt_tokens,
            self.reused_tokens,
        )

    def render(self) -> str:
        lines: list[str] = []
        for series in self._all:
            lines += series.header() + series.lines()
        return "\n".join(lines) + "\n"
