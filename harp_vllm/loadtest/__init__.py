"""A/B load tests of a dense vs a HARP-pruned OpenAI-compatible endpoint.

Run as ``python -m harp_vllm.loadtest`` or ``harp-vllm loadtest`` (:mod:`.command`). Modules,
in the order a test uses them: :mod:`.scenario_files` (the profile and comparison files of
the top-level ``loadtest/`` folder), :mod:`.scenarios` (the settings and the steps they make),
:mod:`.endpoints` (both endpoints checked first), :mod:`.prompts` (exact-length real-text
prompts), :mod:`.ab_sequence` (the whole A/B sequence), :mod:`.vllm_bench` (one run: vLLM's load
generator, per-request validation), :mod:`.server_metrics` (the vLLM server's ``/metrics``
scraped), then the outputs: :mod:`.summary` (medians, ratios, checks, capacity),
:mod:`.report_markdown`, :mod:`.report_plots` and :mod:`.outputs` (all files written).
"""
