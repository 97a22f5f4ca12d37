"""Evaluation: WikiText-2 perplexity (``perplexity``, ``data``) and downstream tasks through
vLLM (``tasks``)."""
