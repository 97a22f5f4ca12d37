"""``python -m harp_vllm.cli``: the ``harp-vllm`` command."""

from . import main

main()
