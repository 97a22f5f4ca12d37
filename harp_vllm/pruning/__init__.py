"""Offline pruning, in four parts that build on the shared modules here:

- shared: ``reference/`` (the HARP, map, group-map, window and KV-sharing forwards on HF
  models, and loading a pruned checkpoint: the ground truth), ``heads.py`` (head/MLP surgery
  on HF layers), ``costs.py`` (the cost model), ``selection.py`` (which layers: layer lists,
  top/bottom P);
- ``calibration/``: calibration text and windows, the LM head on hidden states, the damage
  (KL to the dense model) of changed layers;
- ``methods/``: HARP's alpha search, Gate-Norm, AMP/FLAP/Wanda-sp, linear maps, group maps;
- ``planner/``: candidates per layer, fitted statistics, layouts, damage scoring, the
  knapsack solve, the frontier report;
- ``jobs/``: ``harp-vllm prune`` and ``harp-vllm plan``, and the checkpoint writer.

Imports nothing from serving or the plugin; from evaluation only perplexity and text data."""
