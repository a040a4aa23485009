"""What every DSD pipeline must do, however it was built (like diffusers' pipeline tester mixins).

A test class inherits :class:`PipelineContract` and provides a ``pipe`` fixture (class-scoped); it then runs every
contract test on that pipeline: seeds are deterministic, a batch equals single runs with consecutive seeds, callbacks
see every step and can replace latents or cancel, the right half of the canvas is returned, and the condition
matters. ``tests/test_contract.py`` lists the variants (memory modes, speed modes, single files, GGUF, ...).

The runs are shared within a class (``outputs``), so a variant costs about seven small generations.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run
from dsd_core.errors import GenerationCancelled


class PipelineContract:
    #: max |difference| allowed between an image of a batch and the single run with its seed (batched kernels round
    #: differently)
    batch_atol = 1e-4
    #: settings of the contract's runs, over conftest.RUN (64x128, 3 steps, true guidance 2.0 from step 2)
    settings: dict = {}

    def _run(self, pipe, image, **kw):
        return run(pipe, image, **{**self.settings, **kw})

    @pytest.fixture(scope="class")
    def outputs(self, pipe, reference_image) -> dict:
        """The runs the contract compares: seed 0 twice, seed 1, a batch of seeds 0 and 1, and seed 0 with the
        reference mirrored."""
        return {"seed 0": self._run(pipe, reference_image, seed=0),
                "seed 0 again": self._run(pipe, reference_image, seed=0),
                "seed 1": self._run(pipe, reference_image, seed=1),
                "batch 0, 1": self._run(pipe, reference_image, seed=0, num_images_per_prompt=2),
                "mirrored": self._run(pipe, reference_image.transpose(0), seed=0)}

    def test_same_seed_same_pixels_other_seed_differs(self, outputs):
        a, b, c = (outputs[k].images for k in ("seed 0", "seed 0 again", "seed 1"))
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
        assert (a - c).abs().max() > 1e-3
        assert outputs["seed 0"].seeds == [0]

    def test_batch_equals_single_runs_with_consecutive_seeds(self, outputs):
        batch = outputs["batch 0, 1"]
        assert batch.seeds == [0, 1] and batch.images.shape[0] == 2
        for k, single in enumerate(("seed 0", "seed 1")):
            torch.testing.assert_close(batch.images[k], outputs[single].images[0], rtol=0, atol=self.batch_atol)

    def test_right_half_is_the_result_left_half_the_reconstruction(self, outputs):
        out = outputs["seed 0"]
        h, w = out.panels.shape[-2:]
        settings = {**{"height": 64, "width": 128}, **self.settings}
        assert (h, w) == (settings["height"], settings["width"])
        assert torch.equal(out.images, out.panels[..., w // 2:])
        assert torch.equal(out.references, out.panels[..., :w // 2])

    def test_condition_matters(self, outputs):
        assert (outputs["seed 0"].images - outputs["mirrored"].images).abs().max() > 1e-3

    def test_callbacks_see_every_step_replace_latents_and_cancel(self, pipe, reference_image):
        steps = self.settings.get("num_inference_steps", 3)
        seen = []
        zeroed = self._run(pipe, reference_image, seed=0, output_type="latent",
                           progress_callback=lambda i, n, lat: seen.append((i, n)),
                           callback_on_step_end=lambda p, i, t, tensors: {"latents": torch.zeros_like(
                               tensors["latents"])} if i == steps - 1 else tensors).images
        assert seen == [(i + 1, steps) for i in range(steps)]
        assert zeroed.abs().sum() == 0

        def interrupt(p, i, t, tensors):
            p._interrupt = True
            return tensors

        with pytest.raises(GenerationCancelled, match="at step 1 of"):
            self._run(pipe, reference_image, seed=0, callback_on_step_end=interrupt)
