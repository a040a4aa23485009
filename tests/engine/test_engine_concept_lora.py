"""A Custom Diffusion concept in stock ComfyUI: its deltas as a LoRA through ``LoraLoaderModelOnly`` and its new word
as a textual-inversion embedding of ComfyUI's FLUX tokenizer (``embedding:new1``).

The LoRA runs in the shipped native DSD graph on the head-128 tiny set (``test_engine_native``'s setup): UNETLoader
-> DSD LoRA -> **concept LoRA** -> DSD Apply (native) -> sampler. Checked per target set (preset ``kv``, ``kv+q+out``
with ``context_embedder``, and ``kv+q+out`` as full deltas, which export as ComfyUI ``.diff`` patches):

* the server log reports no ``lora key not loaded`` for the exported file (it does for the concept delta file
  itself, whose ``concept.*`` tensors no LoRA loader knows -- the reason for the export);
* the image differs from the same graph without the concept, and equals ``dsd_core`` with the concept applied by
  its own hooks (``x @ (W0 + up @ down).T``) within ``TOLERANCE`` (the native tests' float32 bound).

Text-rows deltas (``single_text_kv``) cannot be a LoRA: the export leaves them out and says so
(``tests/test_custom_diffusion_export.py``). The word: ComfyUI's FLUX tokenizer reads the exported embedding file and
puts its vector where ``embedding:new1`` stands, between the same T5 ids ``dsd_core``'s tokenizer gives the rest of
the prompt; and ComfyUI's own T5 code (``T5XXLModel``, made small through its ``t5xxl_model_config`` option, since a
T5-XXL cannot be built offline) encodes that prompt to the sequence ``dsd_core`` computes for ``<new1>``
(max |diff| <= 1e-5; seen: ~1e-6).
"""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
import torch

from .client import assert_success
from .test_engine_native import (_CORE, PANEL, TOLERANCE, by_type, core_image, engine_prompt, native_workflows,
                                 run_tensor)
from .test_engine_workflows import engine  # noqa: F401  (fixture)

PROMPT = "this character playing soccer"
SEED = 4
CASES = {  # name -> ParameterSet arguments
    "kv": dict(preset="kv", rank=2),
    "kv_q_out_ce": dict(preset="kv+q+out", rank=2, context_embedder=True),
    "kv_q_out_full": dict(preset="kv+q+out", form="full"),
}


def _pipe(engine):
    if "pipe" not in _CORE:  # the same pipeline test_engine_native builds (its first core_image call fills it)
        core_image(engine, PROMPT, SEED, 1.0, 1.0, steps=1, panel=64)
    return _CORE["pipe"]


def _concept(engine, case: str):
    from dsd_core.custom_diffusion.parameters import ParameterSet
    from dsd_core.custom_diffusion.tiny import tiny_concept

    pipe = _pipe(engine)
    concept = tiny_concept(pipe.transformer, pipe.text_encoder_2.config.d_model, seed=7,
                           params=ParameterSet(**CASES[case]), kind="dsd")
    with torch.no_grad():  # tiny_concept's full deltas are large; a moderate change keeps the image sane
        for layer in concept.deltas.layers:
            if not layer.low_rank:
                layer.weight.mul_(0.3)
    return concept


def _with_concept_lora(engine, api: dict, lora_name: str, **overrides):
    """The native graph with a LoraLoaderModelOnly for ``lora_name`` right after the DSD LoRA."""
    prompt, name = engine_prompt(engine, api, **overrides)
    dsd_lora, = [k for k in by_type(prompt, "LoraLoaderModelOnly")]
    prompt["950"] = {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": [dsd_lora, 0], "lora_name": lora_name, "strength_model": 1.0}}
    for k, node in prompt.items():
        if k != "950" and node["inputs"].get("model") == [dsd_lora, 0]:
            node["inputs"]["model"] = ["950", 0]
    return prompt, name


def _run_logged(engine, comfy, prompt_and_name):
    """(image, the server log written while it ran)."""
    start = len(engine.log_text())
    image = run_tensor(engine, comfy, prompt_and_name)
    return image, engine.log_text()[start:]


def _core_with(engine, concept, steps, panel):
    handle = concept.apply(_pipe(engine))
    try:
        return core_image(engine, PROMPT, SEED, 1.0, 1.0, steps=steps, panel=panel)
    finally:
        handle.remove()


_PLAIN: dict = {}
STEPS_CD, PANEL_CD = 2, PANEL  # the nodes accept panels from 256


@pytest.mark.parametrize("case", list(CASES))
def test_concept_lora_loads_in_comfyui_and_matches_dsd_core(engine, comfy, case):
    from dsd_core.custom_diffusion.export import export_comfyui

    concept = _concept(engine, case)
    lora_name = f"cd_{case}_{uuid.uuid4().hex[:6]}.safetensors"
    report = export_comfyui(concept, str(engine.models_dir / "loras" / lora_name))
    assert not report.left_out and len(report.layers) == len(concept.deltas.layers)
    api = native_workflows()["dsd_native.json"]
    got, log = _run_logged(engine, comfy, _with_concept_lora(engine, api, lora_name, seed=SEED, steps=STEPS_CD,
                                                              panel=PANEL_CD))
    assert "lora key not loaded" not in log, log
    want = _core_with(engine, concept, STEPS_CD, PANEL_CD)
    if "plain" not in _PLAIN:
        _PLAIN["plain"] = core_image(engine, PROMPT, SEED, 1.0, 1.0, steps=STEPS_CD, panel=PANEL_CD)
    plain = _PLAIN["plain"]
    effect, diff = np.abs(want - plain).max(), np.abs(got - want).max()
    print(f"{case}: ComfyUI LoRA vs dsd_core with the concept: max |diff| {diff:.3g}; the concept's effect "
          f"{effect:.3g}")
    assert got.std() > 0.02, "blank image"
    assert effect > 1e-2, "the concept does not change the image: the comparison would prove nothing"
    assert diff <= TOLERANCE, f"{case}: max |diff| {diff:.3g} > {TOLERANCE}"


def test_concept_delta_file_as_lora_warns_about_its_concept_keys(engine, comfy):
    """The delta file itself in models/loras: ComfyUI applies the transformer deltas but logs every ``concept.*``
    key as not loaded (what the export avoids, and proof that the log check above can fail)."""
    import shutil

    from dsd_core.custom_diffusion.export import export_comfyui

    concept = _concept(engine, "kv")
    raw = f"cd_raw_{uuid.uuid4().hex[:6]}.safetensors"
    concept.save(str(engine.models_dir / "dsd_concepts" / raw))
    shutil.copy(engine.models_dir / "dsd_concepts" / raw, engine.models_dir / "loras" / raw)
    exported = f"cd_exp_{uuid.uuid4().hex[:6]}.safetensors"
    export_comfyui(concept, str(engine.models_dir / "loras" / exported))
    api = native_workflows()["dsd_native.json"]
    got_raw, log = _run_logged(engine, comfy, _with_concept_lora(engine, api, raw, seed=SEED, steps=STEPS_CD,
                                                                  panel=PANEL_CD))
    missing = sorted(set(re.findall(r"lora key not loaded: (\S+)", log)))
    assert missing and all(k.startswith("concept.") for k in missing), missing
    assert "concept.modifier_tokens.t5" in missing
    got_exp, log = _run_logged(engine, comfy, _with_concept_lora(engine, api, exported, seed=SEED, steps=STEPS_CD,
                                                                  panel=PANEL_CD))
    assert "lora key not loaded" not in log
    assert np.abs(got_raw - got_exp).max() <= TOLERANCE  # same transformer deltas either way


def test_modifier_token_as_comfyui_embedding(engine, comfy):
    """The exported ``new1.safetensors`` in models/embeddings: ComfyUI's FLUX tokenizer puts its T5 vector where
    ``embedding:new1`` stands, and the T5 ids around it are the ones dsd_core's tokenizer gives "<new1>"'s prompt."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import T5TokenizerFast

    from dsd_core.custom_diffusion.delta_file import ConceptFile
    from dsd_core.custom_diffusion.export import export_comfyui
    from dsd_core.custom_diffusion.tokens import ModifierTokens

    concept = _concept(engine, "kv")
    t5 = torch.randn(1, 4096, generator=torch.Generator().manual_seed(3))  # FLUX's T5-XXL width
    concept = ConceptFile(concept.deltas, ModifierTokens(["<new1>"], ["toy"], {"t5": t5}), concept.probe,
                          concept.info)
    report = export_comfyui(concept, str(engine.models_dir / "loras" / "cd_tok.safetensors"),
                            embeddings_dir=str(engine.models_dir / "embeddings"))
    assert Path(report.embeddings["<new1>"]).name == "new1.safetensors"
    name = "tokens_" + uuid.uuid4().hex[:8]
    entry = assert_success(comfy.run({"1": {"class_type": "DSDTestFluxTokens", "inputs": {
        "prompt": "photo of a embedding:new1 toy", "name": name}}}, timeout=120))
    assert entry is not None
    got = load_file(str(engine.output_dir / f"{name}.safetensors"))
    assert torch.equal(got["t5xxl.embeds"], t5)  # the exact vector, once

    # dsd_core's way: "<new1>" added to the (real) T5 tokenizer; ComfyUI's ids must be the same with the vector
    # at the token's place (ComfyUI then pads with its own length)
    tok = T5TokenizerFast.from_pretrained(str(engine.spec.comfy_dir / "comfy" / "text_encoders" / "t5_tokenizer"))
    tok.add_tokens(["<new1>"])
    ours = tok("photo of a <new1> toy").input_ids
    new_id = tok.convert_tokens_to_ids("<new1>")
    ids = got["t5xxl.ids"].tolist()
    pad = tok.pad_token_id
    while ids and ids[-1] == pad:
        ids.pop()
    assert ids == [-1 if i == new_id else i for i in ours], (ids, ours)
    # no CLIP-L vector in the file: ComfyUI's CLIP-L tokenizer takes the file's only tensor, whose width (4096) its
    # encoder then refuses ("shape mismatch ... ignored"): the word is dropped there, the pooled vector differs a little
    assert torch.equal(got["l.embeds"], t5)


def test_modifier_token_through_comfyuis_t5_matches_dsd_core(engine, comfy):
    """The whole word path on ComfyUI's own T5 code: a small T5 (d_model 32, ComfyUI's fixed 32 position buckets)
    built with ComfyUI's ``t5xxl_model_config`` option, the exported embedding read by its tokenizer as
    ``embedding:new1`` -> the T5 sequence equals dsd_core's (``<new1>`` routed to the same vector, padded to the same
    length as diffusers' FLUX encode_prompt does: max_length padding, no attention mask)."""
    import json
    import types

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from dsd_core.custom_diffusion.delta_file import ConceptFile
    from dsd_core.custom_diffusion.export import export_comfyui
    from dsd_core.custom_diffusion.tokens import ModifierTokens

    size = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    torch.manual_seed(11)
    t5 = T5EncoderModel(T5Config(**size, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, vocab_size=32128)).eval()
    t5_file = f"t5_small_{uuid.uuid4().hex[:6]}.safetensors"
    weights = {k: v.clone().contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(weights, str(engine.models_dir / "text_encoders" / t5_file))  # as T5-XXL files: shared.weight only
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    base = _concept(engine, "kv")
    concept = ConceptFile(base.deltas, ModifierTokens(["<new2>"], ["toy"], {"t5": vector}), base.probe, base.info)
    export_comfyui(concept, str(engine.models_dir / "loras" / "cd_t5.safetensors"),
                   embeddings_dir=str(engine.models_dir / "embeddings"))

    length, name = 64, "t5_" + uuid.uuid4().hex[:8]
    assert_success(comfy.run({"1": {"class_type": "DSDTestT5Encode", "inputs": {
        "prompt": "photo of a embedding:new2 toy", "t5": t5_file, "config": json.dumps(size),
        "min_length": length, "name": name}}}, timeout=120))
    path = str(engine.output_dir / f"{name}.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["missing"]) == [], meta  # ComfyUI's T5 took every weight
    got = load_file(path)["cond"]

    tok = T5TokenizerFast.from_pretrained(str(engine.spec.comfy_dir / "comfy" / "text_encoders" / "t5_tokenizer"))
    tokens = ModifierTokens(["<new2>"], ["toy"], {"t5": vector})
    tokens.attach(types.SimpleNamespace(tokenizer_2=tok, text_encoder_2=t5))
    try:
        with torch.no_grad():
            ids = tok("photo of a <new2> toy", padding="max_length", max_length=length, truncation=True,
                      return_tensors="pt").input_ids
            want = t5(ids)[0]
            tokens.detach()
            without = t5(tok("photo of a toy", padding="max_length", max_length=length, return_tensors="pt")
                         .input_ids)[0]
    finally:
        tokens.detach()
    assert got.shape == want.shape == (1, length, 32)
    diff = float((got - want).abs().max())
    effect = float((want - without).abs().max())
    print(f"ComfyUI T5 with embedding:new2 vs dsd_core with <new2>: max |diff| {diff:.3g} (the word's effect "
          f"{effect:.3g})")
    assert effect > 0.1
    assert diff <= 1e-5, diff
