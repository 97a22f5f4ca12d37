"""A/B load tests of a dense vs a HARP-pruned OpenAI-compatible endpoint.

Run as ``python -m harp_vllm.loadtest`` or ``harp-vllm loadtest``. Modules: :mod:`.prompts`
(exact-length real-text prompts), :mod:`.server_metrics` (the vLLM server's ``/metrics``
scraped), :mod:`.runner` (vLLM's load generator driven per run, the A/B orchestration),
:mod:`.report` (JSON, Markdown, plots) and :mod:`.servers` (starting local vLLM servers for
tests and benchmarks).
"""
