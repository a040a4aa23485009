"""DSD Sampler: generate images of the reference's subject with a loaded DSD model."""

from __future__ import annotations

import logging

from . import _comfy

logger = logging.getLogger(__name__)
MAX_SEED = 0xFFFFFFFFFFFFFFFF
#: pipeline argument -> this node's input name, for error messages.
NODE_INPUTS = {"height": "panel_size", "width": "2 x panel_size", "num_inference_steps": "steps",
               "guidance_scale": "guidance", "image_guidance_scale": "image_guidance",
               "text_guidance_scale": "text_guidance", "num_images_per_prompt": "batch_size"}


class DSDSampler:
    DESCRIPTION = ("Generates new images of the reference's subject: the reference fills the left panel of a 1x2 "
                   "canvas and DSD paints the right one. image_guidance > 1 turns on DSD's true guidance (stronger "
                   "identity, 3x slower from step 2); text_guidance only acts then. Defaults are the official ones.")
    CATEGORY = "DSD/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("images", "reference_reconstruction", "prompt_used", "notes")
    OUTPUT_TOOLTIPS = ("The generated right panels, one per batch item (seeds seed, seed+1, ...).",
                       "The left panels: the model's reconstruction of the reference.",
                       "The prompt that was encoded (after newline removal).",
                       "What happened to the inputs, one line each (empty when nothing): a prompt cut to what the "
                       "text encoders read (77 CLIP / 512 T5 tokens), a very small reference upscaled. Also shown "
                       "in the node's output and the server log.")

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core import options as o
        from dsd_core.inputs import PANEL_SIZE

        return {
            "required": {
                "dsd_model": ("DSD_MODEL",),
                "image": ("IMAGE", {"tooltip": "The reference; the first image of a batch is used."}),
                "prompt": ("STRING", {"multiline": True, "default": "this character playing soccer",
                                      "tooltip": "What the subject should do, e.g. 'this toy on a beach'."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
                "steps": ("INT", {"default": o.STEPS, "min": 1, "max": 200}),
                "guidance": ("FLOAT", {"default": o.GUIDANCE, "min": 0.0, "max": 20.0, "step": 0.1,
                                       "tooltip": f"FLUX distilled guidance ({o.GUIDANCE} in the reference)."}),
                "image_guidance": ("FLOAT", {"default": o.IMAGE_GUIDANCE, "min": 0.0, "max": 10.0, "step": 0.05,
                                             "tooltip": "True image guidance; > 1 strengthens identity (1.5 in the "
                                                        "official demo) at 3 passes per step."}),
                "text_guidance": ("FLOAT", {"default": o.TEXT_GUIDANCE, "min": 0.0, "max": 10.0, "step": 0.05,
                                            "tooltip": "True text guidance; only acts when image_guidance > 1."}),
                "panel_size": ("INT", {**PANEL_SIZE,
                                       "tooltip": "Side of each panel (the canvas is panel_size x 2*panel_size); "
                                                  f"DSD was trained at {o.PANEL} and distorts above ~{o.PANEL_WARN}."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16}),
                "lora_scale": ("FLOAT", {"default": o.LORA_SCALE, "min": 0.0, "max": 2.0, "step": 0.05}),
            },
            "optional": {
                "condition_sampling": (list(o.CONDITION_SAMPLING), {"default": "sample", "tooltip": "; ".join(
                    f"{k}: {v}" for k, v in o.CONDITION_SAMPLING.items())}),
                "fit": (list(o.FIT_MODES), {"default": "center_crop", "tooltip": "How a reference that is not "
                        "panel-sized is fitted: " + "; ".join(f"{k}: {v}" for k, v in o.FIT_MODES.items())}),
            },
        }

    @_comfy.user_errors
    def sample(self, dsd_model, image, prompt, seed, steps, guidance, image_guidance, text_guidance, panel_size,
               batch_size, lora_scale, condition_sampling="sample", fit="center_crop"):
        from dsd_core.image import prepare_reference, tensor_to_pil
        from dsd_core.inputs import check_panel_size, prompt_token_counts, reference_notes
        from dsd_core.preview import latent_preview
        from dsd_core.validation import check_generation

        _comfy.check_interrupt()
        check_panel_size(panel_size)
        check_generation(prompt=prompt, height=panel_size, width=2 * panel_size, num_inference_steps=steps,
                         guidance_scale=guidance, image_guidance_scale=image_guidance,
                         text_guidance_scale=text_guidance, seed=seed, num_images_per_prompt=batch_size,
                         lora_scale=lora_scale, names=NODE_INPUTS)  # before the model is (re)loaded
        if image.shape[0] > 1:
            logger.warning("DSD Sampler got %d reference images; using the first.", image.shape[0])
        source = tensor_to_pil(image[:1])[0]
        notes = reference_notes(source.size, (panel_size, panel_size), fit)
        reference = prepare_reference(source, panel_size, panel_size, mode=fit)
        _comfy.make_room(dsd_model.spec.device)
        pipe = dsd_model.get()
        height, width = panel_size, 2 * panel_size
        bar = _comfy.progress_bar(steps)
        factors, bias = _comfy.flux_latent_rgb()

        def on_step(step, total, latents):
            _comfy.check_interrupt()
            if bar is not None:
                preview = latent_preview(latents, height, width, factors, bias)
                bar.update_absolute(step, total, ("JPEG", preview, 512))

        out = pipe(reference, prompt, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, image_guidance_scale=image_guidance, text_guidance_scale=text_guidance,
                   seed=seed, num_images_per_prompt=batch_size, condition_sampling=condition_sampling,
                   lora_scale=lora_scale, output_type="pt", progress_callback=on_step)
        images = out.images.permute(0, 2, 3, 1).float().cpu()
        references = out.references.permute(0, 2, 3, 1).float().cpu()
        notes += prompt_token_counts(pipe.tokenizer, pipe.tokenizer_2, out.prompt).notes()
        for note in notes:
            logger.warning("DSD Sampler: %s", note)
        result = (images, references, out.prompt, "\n".join(notes))
        return {"ui": {"text": notes}, "result": result} if notes else {"result": result}


NODE_CLASS_MAPPINGS = {"DSDSampler": DSDSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDSampler": "DSD Sampler"}
