"""The jobs the CLI runs: ``harp-vllm prune`` (``prune_job.py``, its options and parsers in
``options.py``, its printed tables in ``tables.py``), ``harp-vllm plan`` (``plan_job.py``) and
the atomic checkpoint writer both end with (``checkpoint.py``)."""
