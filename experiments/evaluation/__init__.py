"""The reconstruction evaluation suite (MindEye2's recipe plus LPIPS and DreamSim), as plain modules.

One idea per module: ``preprocessing`` (resizes and normalisations), ``inputs`` (test images, reconstructions,
stage-1 embeddings), ``low_level`` (PixCorr, SSIM), ``networks`` (feature networks from local weight files),
``two_way`` (two-way identification), ``paired_scores`` (correlation distance, CLIP cosine), ``retrieval``, ``lpips_distance``,
``dreamsim_distance``, ``bootstrap``, ``report`` (table, anchors, CSV/JSON), ``suite`` (runs it all) and
``comparison_grid`` (ground truth beside reconstruction as one PNG, the demo's picture).
The command is ``python -m experiments.evaluate``.
"""

