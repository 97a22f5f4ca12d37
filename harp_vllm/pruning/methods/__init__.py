"""The pruning methods, each a transformation of a dense HF model: HARP's alpha search
(``alpha_search.py``), Gate-Norm's layer ranking (``gate_norm.py``), AMP/FLAP/Wanda-sp head and
MLP pruning (``structured.py``), linear maps in place of attention (``linear.py``) and the
planner's group maps (``group_fit.py``)."""
