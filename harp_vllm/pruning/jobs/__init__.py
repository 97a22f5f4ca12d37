"""The jobs the CLI runs: ``harp-vllm prune`` (``prune_job.py``, its options and parsers in
``prune_options.py``, its printed tables in ``prune_tables.py``), ``harp-vllm plan``
(``plan_job.py``, its options in ``plan_options.py``, the loaded model and statistics every
budget is planned from in ``plan_session.py``) and the atomic checkpoint writer both end with
(``checkpoint.py``)."""
