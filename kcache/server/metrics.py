"""Prometheus metrics: engine gauges and token counters read from AsyncEngine.stats at scrape time, request outcomes
and latency histograms recorded by the server as requests end."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kcache.engine.async_engine import AsyncEngine
from kcache.engine.llm_engine import RequestOutput

# CPU-friendly ranges: a tiny model answers in milliseconds, SmolLM2 on two cores in seconds
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
MASS_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)


class EngineCollector:
    """Reads the engine thread's numbers only when scraped (no per-token work on the event loop)."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats
        gauges = [
            ("kcache_requests_waiting", "requests queued or prefilling", s.waiting),
            ("kcache_requests_running", "requests decoding (the running batch)", s.running),
            ("kcache_cache_blocks_used", "cache blocks held by requests", s.blocks_used),
            ("kcache_cache_blocks_total", "cache blocks in the pools", s.blocks_total),
            ("kcache_cache_usage", "share of cache blocks in use", s.blocks_used / max(1, s.blocks_total)),
            ("kcache_device_cache_used_bytes", "device cache bytes held by requests (K; V too for full/dense layers)",
             s.device_cache_bytes_used),
            ("kcache_host_cache_used_bytes", "host cache bytes held by requests (KCache's V)", s.host_cache_bytes_used),
            ("kcache_prefix_cache_blocks", "blocks in the prefix cache (held by requests or kept for reuse)",
             s.blocks_cached),
            ("kcache_prefix_cache_hit_rate", "share of admitted prompt tokens found in the prefix cache",
             s.prefix_hit_tokens / max(1, s.prefix_queried_tokens)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("kcache_prompt_tokens", "prompt tokens of admitted requests", s.prompt_tokens),
            ("kcache_prefix_cache_queries", "prompt tokens admissions looked up in the prefix cache (a preempted "
             "request's re-admission too)", s.prefix_queried_tokens),
            ("kcache_prefix_cache_hits", "of those, tokens found cached (not prefilled again)", s.prefix_hit_tokens),
            ("kcache_generation_tokens", "tokens generated", s.generation_tokens),
            ("kcache_engine_steps", "engine steps run", s.steps),
            ("kcache_engine_step_errors", "engine steps that raised (their requests failed)", s.step_errors),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()  # one per app: several servers may share a process (tests)
        self.registry.register(EngineCollector(engine))
        r = self.registry
        self.requests = Counter("kcache_requests", "requests by outcome: stop, length (finished), abort (client left), "
                                "rejected (4xx), error (5xx)", ["status"], registry=r)
        self.ttft = Histogram("kcache_time_to_first_token_seconds", "arrival to first token", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("kcache_time_per_output_token_seconds", "mean gap between a request's tokens after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.mass = Histogram("kcache_attention_mass_kept", "per request: mean softmax mass of the top-N tokens KCache "
                              "kept (1.0 for the full cache)", buckets=MASS_BUCKETS, registry=r)

    def finished(self, out: RequestOutput) -> None:
        m = out.metrics
        self.requests.labels(out.finish_reason).inc()
        if m.get("ttft_s") is not None:
            self.ttft.observe(m["ttft_s"])
        if m.get("tpot_s") is not None:
            self.tpot.observe(m["tpot_s"])
        if m.get("completion_tokens", 0) > 1:  # mass is measured on decode steps only
            self.mass.observe(m["mass_kept_mean"])

    def outcome(self, status: str) -> None:
        self.requests.labels(status).inc()
