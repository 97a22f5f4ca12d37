"""Calibration data and what is measured on it: the text and its seeded windows
(``windows.py``), the model's LM head applied to hidden states (``logits.py``) and the damage
of changed layers, KL to the dense model (``damage.py``). Shared by the methods, the planner
and the jobs."""
