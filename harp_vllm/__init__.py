"""harp-vllm: serve attention-pruned (HARP) LLMs with vLLM."""

__version__ = "0.1.0"
