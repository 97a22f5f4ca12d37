"""``harp-vllm plan``: choose every layer's attention under a KV (and speed) budget.

Per layer the candidates are: keep the attention; remove ``k`` of its KV groups by FLAP's
score with bias compensation (``drop1``, ``drop2``, ...); remove ``k`` groups and predict their
heads' outputs by a fitted linear map added to the rest (``drop1lin``, ...:
``methods/group_fit.py``); replace it by the fitted linear map of ``methods/linear.py``
(``linear192``, ``linearfull``: one per rank); remove it (``remove``). Each has exact costs
from ``pruning/costs.py`` and a quality estimate: the calibration KL(dense || model with only
that layer changed) (``calibration/damage.py``). A multiple-choice knapsack picks one candidate
per layer minimising the summed estimates under ``KV bytes <= (1 - saving) * dense`` (and,
with a speed budget, ``MACs <= dense / speedup``), solved exactly as a MILP by SciPy's HiGHS.
Per-layer damage is not additive, so the ``top_k`` best layouts (no-good cuts) are assembled
and re-scored on the calibration windows as whole models; the best measured one wins.

Everything is fitted on the dense model (FLAP's statistics and group scores, the maps'
moments), so a layout is assembled by swapping modules and the statistics are computed once
per model and settings and cached (``$HARP_VLLM_CACHE/plan-stats``).

Modules, in the order they build on each other: ``choices.py`` (the candidates and the
``--layout`` text), ``statistics.py`` (the fitted, cached statistics), ``layouts.py`` (a layout
as modules), ``scoring.py`` (damage), ``solve.py`` (the knapsack and the re-scoring),
``frontier_report.py`` (the frontier table and plots). The job is ``jobs/plan_job.py``.
"""
