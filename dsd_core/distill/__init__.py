"""Task-specific distillation of DSD: a pruned, smaller DSD student distilled from the full model.

BK-SDM-style block removal plus output and feature knowledge distillation, brought to FLUX/DSD (see the README section
"Distillation" and ``shared/docs/personalization-methods.md`` section 4-5):

* :mod:`.layout`     -- which teacher blocks a student keeps (presets by size, custom lists), feature mapping;
* :mod:`.student`    -- building the student from the teacher's kept blocks, saving/loading it as a DSD transformer;
* :mod:`.importance` -- block importance: how much the teacher's output changes when a block is skipped;
* :mod:`.features`   -- forward hooks that record block outputs (both streams of double blocks);
* :mod:`.losses`     -- L_flow + lambda_out * |v_S - v_T|^2 + lambda_feat * sum |h_S - h_T|^2, massive activations handled;
* :mod:`.data`       -- DSD canvases for calibration and distillation (teacher-generated, cached) and noisy inputs;
* :mod:`.evaluate`   -- parameters, file size, estimated full-size memory, measured speed ratio, agreement.
"""
