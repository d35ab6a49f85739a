"""Parameter reports (``python -m experiments.params``): the per-module table of any model (``table``), stage 2's
counts from the real module built on the meta device (``stage2``, with SDXL base's config files in ``sdxl_base``)
and every paper-scale configuration (``paper``)."""
