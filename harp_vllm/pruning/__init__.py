"""Offline pruning: the methods (HARP's alpha search, Gate-Norm, head/MLP surgery, linear
maps), the reference models they are checked against, and the checkpoint writer. Imports
nothing from evaluation's task runner, serving or the plugin."""
