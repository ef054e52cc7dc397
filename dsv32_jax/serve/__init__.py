"""Serving: decode slots with continuous batching, chunked prefill, a prefix cache, and
per-request sampling (`ServingEngine`)."""
from dsv32_jax.serve.scheduler import QueueFull, Request, ServingEngine

__all__ = ["QueueFull", "Request", "ServingEngine"]
