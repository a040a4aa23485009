"""The shipped data-generation workflow on a real ComfyUI: grids, panels and curated pairs come out of the graph."""

from __future__ import annotations

import copy
import io
import sys
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from .client import assert_success

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflow_checks import api_workflows  # noqa: E402


def test_datagen_workflow_runs_stage_by_stage(comfy_engine, comfy):
    prompt = copy.deepcopy(api_workflows()["dsd_datagen.json"])
    prompt["3"]["inputs"].update(steps=2, panel_size=64)  # tiny and quick; the graph is the shipped one
    prompt["5"]["inputs"].update(panel_size=64)
    prompt["8"]["inputs"]["filename_prefix"] += "_" + uuid.uuid4().hex[:8]
    entry = assert_success(comfy.run(prompt, timeout=600))
    saved = comfy.output_images(entry, "8")
    assert len(saved) == 4  # 2 grids x 2 ordered pairs, all kept by curator none
    for image in saved:
        png = comfy.get_image(image["filename"], image["subfolder"], image["type"])
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert pixels.shape == (64, 128, 3) and pixels.std() > 1
    for node in ("4", "6"):  # grids and panels are previewed
        assert comfy.output_images(entry, node)
