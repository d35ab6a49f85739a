"""Parameter reports (``python -m experiments.params``): the per-module table of any model (``table``) and stage 2's
counts at any scale on the meta device (``stage2``)."""
