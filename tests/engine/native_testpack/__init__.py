"""Test-only ComfyUI nodes for the native-DSD engine tests (loaded into the engine server, never shipped).

ComfyUI's stock CLIP and VAE loaders only read full-size FLUX text encoders and VAE (fixed widths), which cannot
be built offline in seconds. The tiny model set's transformer *is* loaded by the stock ``UNETLoader`` (head size
128); its tiny CLIP-L/T5/VAE come in through these nodes, computed exactly as ``dsd_core`` computes them, so the
native graph and ``dsd_core`` see the same text embeddings and VAE:

* ``DSDTestTinyTextEncode`` -> CONDITIONING ``[[T5 embeddings (512 tokens), {"pooled_output": CLIP pooled}]]``;
* ``DSDTestTinyVAE`` -> an object with ComfyUI's VAE interface (``encode``: posterior mode of pixels in [0, 1],
  ``decode``: latent -> pixels in [0, 1]), usable by stock ``VAEDecode`` and by DSD Native Conditioning;
* ``DSDTestTinyUNETLoader`` -> the stock ``UNETLoader`` with one fix for ComfyUI 0.3.75 (CI's engine), whose FLUX
  detection hard-codes 24 heads (so only hidden 3072 loads); 0.33 computes ``hidden // 128`` as this wrapper does;
* ``DSDTestT5TokenCount`` -> how many T5 tokens ComfyUI's real FLUX tokenizer makes with DSD Text Encode's setting;
* ``DSDTestFluxTokens`` -> ComfyUI's real FLUX tokenizer (CLIP-L + T5-XXL, with ``models/embeddings``) on a prompt,
  saved as ``ids`` (-1 where an embedding vector stands) and the ``embeds`` vectors per encoder;
* ``DSDTestT5Encode`` -> ComfyUI's own FLUX T5 path (``T5XXLTokenizer`` with ``models/embeddings`` + ``T5XXLModel``)
  on a small T5 file, its size given through ComfyUI's ``t5xxl_model_config`` option: the T5 sequence, saved.
"""

import os

_PIPES = {}


def _pipe(clip_l, t5xxl, vae, tokenizers):
    import folder_paths

    from dsd_core.loading import load_pipeline
    from dsd_core.sources import FilesSource

    key = (clip_l, t5xxl, vae, tokenizers)
    if key not in _PIPES:
        tok = next(os.path.join(root, tokenizers) for root in folder_paths.get_folder_paths("dsd")
                   if os.path.isdir(os.path.join(root, tokenizers)))
        transformer = folder_paths.get_full_path("unet", "dsd_transformer_h128.safetensors")
        _PIPES[key] = load_pipeline(source=FilesSource(
            transformer=transformer, clip_l=folder_paths.get_full_path("clip", clip_l),
            t5xxl=folder_paths.get_full_path("clip", t5xxl), vae=folder_paths.get_full_path("vae", vae),
            tokenizers=tok), device="cpu")
    return _PIPES[key]


def _files(name):
    import folder_paths

    return folder_paths.get_filename_list(name)


class DSDTestTinyTextEncode:
    CATEGORY = "dsd_engine_tests"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": ("STRING", {"multiline": True, "default": ""}),
                             "clip_l": (_files("clip"),), "t5xxl": (_files("clip"),), "vae": (_files("vae"),),
                             "tokenizers": ("STRING", {"default": "tokenizers_h128set"})}}

    def encode(self, prompt, clip_l, t5xxl, vae, tokenizers):
        from dsd_core.pipeline import clean_prompt

        pipe = _pipe(clip_l, t5xxl, vae, tokenizers)
        embeds, pooled, _ = pipe.encode_text(clean_prompt(prompt), "cpu", 512)
        return ([[embeds.float(), {"pooled_output": pooled.float()}]],)


class TinyVAE:
    """ComfyUI's VAE interface over the diffusers VAE of dsd_core (posterior mode, raw latents)."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, pixels):
        import torch

        with torch.no_grad():
            x = pixels[..., :3].movedim(-1, 1).to(self.vae.dtype) * 2.0 - 1.0
            return self.vae.encode(x).latent_dist.mode().float()

    def decode(self, latent):
        import torch

        with torch.no_grad():
            x = self.vae.decode(latent.to(self.vae.dtype), return_dict=False)[0]
            return (x.float() * 0.5 + 0.5).clamp(0, 1).movedim(1, -1)


class DSDTestTinyVAE:
    CATEGORY = "dsd_engine_tests"
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_l": (_files("clip"),), "t5xxl": (_files("clip"),), "vae": (_files("vae"),),
                             "tokenizers": ("STRING", {"default": "tokenizers_h128set"})}}

    def load(self, clip_l, t5xxl, vae, tokenizers):
        return (TinyVAE(_pipe(clip_l, t5xxl, vae, tokenizers).vae),)


class DSDTestT5TokenCount:
    CATEGORY = "dsd_engine_tests"
    FUNCTION = "count"
    RETURN_TYPES = ("STRING",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": ("STRING", {"default": "a photo of a cat"}),
                             "t5_padding": (["512", "comfyui"],)}}

    def count(self, prompt, t5_padding):
        import importlib
        import sys

        from comfy.text_encoders.flux import FluxTokenizer

        native = next(m for name, m in sys.modules.items() if name.endswith("nodes.native")
                      and hasattr(m, "set_t5_min_length"))

        class FakeClip:  # the tokenizer half of comfy.sd.CLIP
            def __init__(self):
                self.tokenizer = FluxTokenizer()
                self.tokenizer_options = {}

            def set_tokenizer_option(self, k, v):
                self.tokenizer_options[k] = v

            def tokenize(self, text):
                kw = {"tokenizer_options": self.tokenizer_options} if self.tokenizer_options else {}
                return self.tokenizer.tokenize_with_weights(text, **kw)

        clip = FakeClip()
        if t5_padding != "comfyui":
            native.set_t5_min_length(clip, int(t5_padding))
        tokens = clip.tokenize(prompt)
        n = sum(len(batch) for batch in tokens["t5xxl"])
        return {"ui": {"text": [str(n)]}, "result": (str(n),)}


class DSDTestFluxTokens:
    CATEGORY = "dsd_engine_tests"
    FUNCTION = "tokens"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": ("STRING", {"default": "a photo of a cat"}),
                             "name": ("STRING", {"default": "tokens"})}}

    def tokens(self, prompt, name):
        import folder_paths
        import torch
        from comfy.text_encoders.flux import FluxTokenizer
        from safetensors.torch import save_file

        tokens = FluxTokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings")).tokenize_with_weights(
            prompt)
        out = {}
        for enc, batches in tokens.items():
            seq = [t[0] for batch in batches for t in batch]
            out[f"{enc}.ids"] = torch.tensor([-1 if isinstance(t, torch.Tensor) else int(t) for t in seq])
            vectors = [t.float().reshape(-1) for t in seq if isinstance(t, torch.Tensor)]
            if vectors:
                out[f"{enc}.embeds"] = torch.stack(vectors).contiguous()
        save_file(out, os.path.join(folder_paths.get_output_directory(), name + ".safetensors"))
        return {"ui": {"tensor": [name]}}


class DSDTestT5Encode:
    CATEGORY = "dsd_engine_tests"
    FUNCTION = "encode"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": ("STRING", {"default": "a photo of a cat"}), "t5": (_files("clip"),),
                             "config": ("STRING", {"default": "{}"}),
                             "min_length": ("INT", {"default": 256, "min": 1, "max": 4096}),
                             "name": ("STRING", {"default": "t5"})}}

    def encode(self, prompt, t5, config, min_length, name):
        import json

        import comfy.utils
        import folder_paths
        import torch
        from comfy.text_encoders.flux import T5XXLTokenizer
        from comfy.text_encoders.sd3_clip import T5XXLModel
        from safetensors.torch import save_file

        model = T5XXLModel(device="cpu", dtype=torch.float32,
                           model_options={"t5xxl_model_config": json.loads(config)})
        missing, unexpected = model.load_sd(comfy.utils.load_torch_file(folder_paths.get_full_path("clip", t5)))
        tok = T5XXLTokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings"))
        tokens = tok.tokenize_with_weights(prompt, tokenizer_options={"t5xxl_min_length": min_length})
        with torch.no_grad():
            cond, _ = model.encode_token_weights(tokens)
        save_file({"cond": cond.float().contiguous().cpu()},
                  os.path.join(folder_paths.get_output_directory(), name + ".safetensors"),
                  metadata={"missing": json.dumps(sorted(missing)), "unexpected": json.dumps(sorted(unexpected))})
        return {"ui": {"tensor": [name]}}


class DSDTestTinyUNETLoader:
    CATEGORY = "dsd_engine_tests"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (_files("unet"),),
                             "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],)}}

    def load(self, unet_name, weight_dtype):
        import comfy.model_detection as md
        import nodes

        original = md.detect_unet_config

        def detect(state_dict, key_prefix, *args, **kwargs):
            config = original(state_dict, key_prefix, *args, **kwargs)
            if config and config.get("image_model") == "flux" and "hidden_size" in config:
                config["num_heads"] = config["hidden_size"] // sum(config["axes_dim"])
            return config

        md.detect_unet_config = detect
        try:
            return nodes.UNETLoader().load_unet(unet_name, weight_dtype)
        finally:
            md.detect_unet_config = original


class DSDTestSaveTensor:
    """Writes an IMAGE as float32 safetensors into the output folder (the tests compare floats, not PNG bytes)."""

    CATEGORY = "dsd_engine_tests"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "tensor"})}}

    def save(self, images, name):
        import folder_paths
        from safetensors.torch import save_file

        save_file({"images": images.float().contiguous().cpu()},
                  os.path.join(folder_paths.get_output_directory(), name + ".safetensors"))
        return {"ui": {"tensor": [name]}}


NODE_CLASS_MAPPINGS = {"DSDTestTinyTextEncode": DSDTestTinyTextEncode, "DSDTestTinyVAE": DSDTestTinyVAE,
                       "DSDTestT5TokenCount": DSDTestT5TokenCount, "DSDTestSaveTensor": DSDTestSaveTensor,
                       "DSDTestTinyUNETLoader": DSDTestTinyUNETLoader, "DSDTestFluxTokens": DSDTestFluxTokens,
                       "DSDTestT5Encode": DSDTestT5Encode}
