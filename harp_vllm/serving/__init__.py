"""Serving: ``harp-vllm serve`` (vLLM's OpenAI server with the plugin), the HARP stat logger
and its Prometheus metrics."""
