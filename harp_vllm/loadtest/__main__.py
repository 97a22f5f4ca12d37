"""``python -m harp_vllm.loadtest``: the A/B load test (same as ``harp-vllm loadtest``)."""

from .command import main

main()
