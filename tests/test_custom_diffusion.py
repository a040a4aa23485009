"""Custom Diffusion on the tiny models: parameters, tokens, data, objective, files, compression, merge, training
through the engine (loss falls, resume), the CLI end to end, and bad inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dsd_core.custom_diffusion import compress as cmp
from dsd_core.custom_diffusion import data as cd_data
from dsd_core.custom_diffusion.delta_file import ConceptFile, base_probe, check_prompt_tokens
from dsd_core.custom_diffusion.merge import average, collect_features, merge
from dsd_core.custom_diffusion.parameters import ConceptDeltas, LayerDelta, ParameterSet, describe, full_size_count
from dsd_core.custom_diffusion.tokens import ModifierTokens
from dsd_core.errors import InputError, ModelFormatError

SIZE = 32  # tiny images: 4x4 latents, 2x2 tokens


@pytest.fixture(scope="module")
def flux_pipe():
    """A plain FLUX pipeline of the tiny components (in memory), frozen."""
    from diffusers import FluxPipeline

    from dsd_core.tiny import build_components

    c = build_components()
    pipe = FluxPipeline(**{k: v for k, v in c.items() if k != "dsd_transformer"})
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(folder, n=3, seed=0, size=48):
    from dsd_core.tiny import reference_image

    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        reference_image(size, size, seed=seed + i).save(os.path.join(folder, f"{i}.png"))
    return str(folder)


def generate(pipe, prompt, seed=0):
    return pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=2, output_type="np", max_sequence_length=32,
                generator=torch.Generator().manual_seed(seed)).images


def random_concept(pipe, token, seed, params=ParameterSet(rank=2)) -> ConceptFile:
    """A concept with random (non-zero) deltas and token embedding, as training would leave it."""
    from dsd_core.custom_diffusion.tiny import tiny_concept

    concept = tiny_concept(pipe.transformer, pipe.text_encoder_2.config.d_model, token, "cat", seed, params, "flux")
    tokens = ModifierTokens.from_words(pipe, [token], ["cat"])  # as training leaves it: moved away from "cat"
    with torch.no_grad():
        tokens.embeddings["t5"].add_(torch.randn(tokens.embeddings["t5"].shape,
                                                 generator=torch.Generator().manual_seed(seed)))
    concept.tokens = tokens
    return concept


# ---------------------------------------------------------------------------------------------- parameters
def test_presets_targets_and_counts(flux_pipe):
    t = flux_pipe.transformer
    kv = ParameterSet("kv", rank=4).targets(t)
    assert [x.name for x in kv] == ["transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj",
                                    "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.1.attn.add_v_proj"]
    big = ParameterSet("kv+q+out", form="full", context_embedder=True, single_text_kv=True).targets(t)
    names = {x.name for x in big}
    assert "context_embedder" in names and "transformer_blocks.1.attn.to_add_out" in names
    assert {x.rows for x in big if x.name.startswith("single_")} == {"text"} and len(big) == 1 + 2 * 4 + 2 * 2
    deltas = ConceptDeltas.create(t, ParameterSet("kv", rank=4))
    assert deltas.num_parameters() == 4 * 4 * (32 + 32)
    assert "total" in describe(deltas) and "1,024" in describe(deltas)
    # the README's full-size figures: kv at rank 16 = 3.7 M, full kv = 358.7 M
    assert full_size_count(ParameterSet("kv", rank=16)) == 38 * 16 * 6144
    assert full_size_count(ParameterSet("kv", form="full")) == 38 * 3072 * 3072
    with pytest.raises(InputError, match="preset"):
        ParameterSet("attn2")


def velocity(pipe, x, kwargs):
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, **kwargs)[0]


def test_deltas_start_at_zero_and_detach_exactly(flux_pipe):
    x, kwargs = _transformer_inputs(flux_pipe)
    base = velocity(flux_pipe, x, kwargs)
    for params in (ParameterSet(rank=2), ParameterSet(form="full", single_text_kv=True, context_embedder=True)):
        deltas = ConceptDeltas.create(flux_pipe.transformer, params, seed=0).attach(flux_pipe.transformer)
        try:
            assert torch.equal(velocity(flux_pipe, x, kwargs), base)  # zero-initialised
            with torch.no_grad():
                for layer in deltas.layers:
                    (layer.up if layer.low_rank else layer.weight).normal_(std=0.2)
            assert (velocity(flux_pipe, x, kwargs) - base).abs().max() > 1e-4
        finally:
            deltas.detach()
        assert torch.equal(velocity(flux_pipe, x, kwargs), base)


def test_text_rows_delta_leaves_image_tokens_alone(flux_pipe):
    """The single-stream text-rows delta changes the text rows of to_k's output only."""
    t = flux_pipe.transformer
    deltas = ConceptDeltas.create(t, ParameterSet(rank=2, single_text_kv=True))
    layer = next(x for x in deltas.layers if x.target.rows == "text")
    with torch.no_grad():
        layer.up.normal_()
    seen = []
    x, kwargs = _transformer_inputs(flux_pipe)
    deltas.attach(t)  # the observer below runs after the delta's hook
    handle = t.get_submodule(layer.target.name).register_forward_hook(
        lambda m, a, out: seen.append(out.detach().clone()))
    try:
        velocity(flux_pipe, x, kwargs)
        deltas.detach()
        velocity(flux_pipe, x, kwargs)
    finally:
        handle.remove()
        deltas.detach()
    after, before = seen
    txt = kwargs["encoder_hidden_states"].shape[1]
    assert torch.equal(before[:, txt:], after[:, txt:])
    assert (before[:, :txt] - after[:, :txt]).abs().max() > 1e-4


def _transformer_inputs(pipe, prompt="photo of a cat"):
    from dsd_core import canvas as cv

    embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, max_sequence_length=32)
    x = cv.pack_latents(torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)))
    return x, dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids,
                   img_ids=cv.latent_image_ids(SIZE, SIZE), timestep=torch.tensor([0.5]),
                   guidance=torch.tensor([3.5]), return_dict=False)


# ---------------------------------------------------------------------------------------------- tokens
def test_modifier_token_is_a_small_parameter_used_only_where_the_prompt_has_it(flux_pipe):
    t5 = flux_pipe.text_encoder_2
    table = t5.get_input_embeddings().weight.detach().clone()
    base_plain = generate(flux_pipe, "photo of a cat")
    tokens = ModifierTokens.from_words(flux_pipe, ["<new1>", "<new2>"], ["cat", "dog"], encoders=("t5", "clip"))
    assert tokens.embeddings["t5"].shape == (2, 32) and tokens.embeddings["clip"].shape == (2, 32)
    cat_ids = flux_pipe.tokenizer_2("cat", add_special_tokens=False).input_ids
    assert torch.allclose(tokens.embeddings["t5"][0], table[cat_ids].mean(0))  # initialised from the class word
    tokens.attach(flux_pipe)
    try:
        with torch.no_grad():
            tokens.embeddings["t5"][1].add_(2.0)  # <new2> only
        assert np.array_equal(generate(flux_pipe, "photo of a cat"), base_plain)  # prompts without tokens: as before
        a = generate(flux_pipe, "photo of a <new1> cat")
        b = generate(flux_pipe, "photo of a <new2> cat")
        assert np.abs(a - b).max() > 1e-4
        # gradients reach the token rows (both of them: the public scripts' mask loop drops the last one)
        embeds, _, _ = flux_pipe.encode_prompt("a <new1> and a <new2>", None, max_sequence_length=32)
        embeds.pow(2).sum().backward()
        grad = tokens.embeddings["t5"].grad
        assert grad is not None and (grad.abs().sum(1) > 0).all()
        assert t5.get_input_embeddings().weight.grad is None  # the table is not trained
    finally:
        tokens.detach()
    assert torch.equal(t5.get_input_embeddings().weight, table)
    with pytest.raises(InputError, match="<new1>.*no longer applied"):
        flux_pipe.encode_prompt("photo of a <new1> cat", None, max_sequence_length=32)


# ---------------------------------------------------------------------------------------------- data
def test_cd_augmentation_and_token_mask():
    import PIL.Image

    image = PIL.Image.new("RGB", (100, 80), (200, 30, 30))
    seen = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        px, mask, prefix = cd_data.augment_instance(image, 64, rng)
        assert px.shape == (3, 64, 64) and mask.shape == (8, 8)
        seen.add(prefix.split()[0] if prefix else "")
        if prefix in cd_data.CLOSE_PREFIXES:
            assert mask.min() == 1
        else:  # pasted: the mask is inside the image, inset by one latent pixel; outside is grey (0)
            inside = mask.bool().repeat_interleave(8, 0).repeat_interleave(8, 1)
            assert (px[:, ~inside.bool()].abs() < 1).any() or inside.all()
            assert mask[0].sum() == 0 and mask[:, 0].sum() == 0
    assert {"", "a", "very", "zoomed", "close"} & seen and len(seen) >= 3
    m = torch.zeros(8, 8)
    m[1:5, 2:7] = 1
    tok = cd_data.token_mask(m)
    assert tok.shape == (16,)
    assert tok.view(4, 4).tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_class_images_are_seeded_cached_and_resumable(flux_pipe, tmp_path):
    folder = tmp_path / "cls"
    done = cd_data.ensure_class_images(flux_pipe, "photo of a cat", 2, str(folder), seed=3, steps=1, size=SIZE)
    first = open(done[1][0], "rb").read()
    os.remove(done[1][0])  # an interrupted run: image 1 is missing
    calls = []
    again = cd_data.ensure_class_images(flux_pipe, "photo of a cat", 2, str(folder), seed=3, steps=1, size=SIZE,
                                        progress=lambda k, n: calls.append(k))
    assert [p for p, _ in again] == [p for p, _ in done] and open(again[1][0], "rb").read() == first
    assert calls == [1, 2]
    assert cd_data.class_cache_dir("r", "a", {"s": 1}) != cd_data.class_cache_dir("r", "a", {"s": 2})


# ---------------------------------------------------------------------------------------------- files
def test_delta_file_roundtrip_and_diffusers_lora_loading(flux_pipe, tmp_path):
    concept = random_concept(flux_pipe, "<new1>", seed=1)
    path = concept.save(str(tmp_path / "c.safetensors"))
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "dsd-custom-diffusion" and meta["rank"] == "2" and "<new1>" in meta["tokens"]
    assert len(meta["base_hash"]) == 64 and "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in keys
    loaded = ConceptFile.load(path)
    assert loaded.token_names == ["<new1>"]
    for a, b in zip(concept.deltas.layers, loaded.deltas.layers):
        assert a.target == b.target and torch.allclose(a.matrix(), b.matrix(), atol=1e-6)

    handle = loaded.apply(flux_pipe)
    hooked = generate(flux_pipe, "photo of a <new1> cat")
    handle.remove()
    flux_pipe.load_lora_weights(path, adapter_name="cd")  # the same file as a diffusers LoRA
    loaded.tokens.attach(flux_pipe)
    try:
        via_lora = generate(flux_pipe, "photo of a <new1> cat")
    finally:
        loaded.tokens.detach()
        flux_pipe.unload_lora_weights()
    assert np.abs(hooked - via_lora).max() < 1e-5


def test_bad_inputs_are_explained(flux_pipe, tmp_model_dsd_pipe, tmp_path):
    with pytest.raises(InputError, match="no images"):
        cd_data.list_images(str(tmp_path))
    with pytest.raises(InputError, match="modifier token"):
        cd_data.Concept(str(tmp_path), "photo of a cat")
    concept = random_concept(flux_pipe, "<new1>", seed=2)
    handle = concept.apply(flux_pipe)
    try:
        check_prompt_tokens(flux_pipe, "photo of a <new1> cat")
        with pytest.raises(InputError, match="<new7>.*no applied concept"):
            check_prompt_tokens(flux_pipe, "photo of a <new7> cat")
    finally:
        handle.remove()
    # the tiny DSD transformer has other base weights than the tiny FLUX one: another base
    with pytest.raises(ModelFormatError, match="different base model"):
        concept.apply(tmp_model_dsd_pipe)
    path = str(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, path)
    with pytest.raises(ModelFormatError, match="not a Custom Diffusion concept delta"):
        ConceptFile.load(path)


@pytest.fixture(scope="module")
def tmp_model_dsd_pipe(tiny_pipe):
    return tiny_pipe


# ---------------------------------------------------------------------------------------------- compression
def test_compression_keeps_the_stated_energy_and_reports(flux_pipe):
    t = flux_pipe.transformer
    targets = ParameterSet().targets(t)
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5] + [0.0] * 27)
    layers = []
    for target in targets:
        u, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
        v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
        layers.append(LayerDelta.from_tensors(target, weight=(u * s) @ v.T))
    concept = ConceptFile(ConceptDeltas(layers), None, base_probe(t, [x.name for x in targets]), {})
    small, report = cmp.compress(concept, energy=0.6)
    # cumsum / sum = 0.52, 0.78, ...: CD keeps the values before the crossing -> rank 1
    assert [r.rank_after for r in report] == [1] * 4
    expected = float((s[1:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert all(abs(r.relative_error - expected) < 1e-5 for r in report)
    two, report2 = cmp.compress(concept, rank=2)
    assert [r.rank_after for r in report2] == [2] * 4
    for a, b in zip(concept.deltas.layers, two.deltas.layers):
        want = float((s[2:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert abs(float((a.matrix() - b.matrix()).norm() / a.matrix().norm()) - want) < 1e-5
    # a low-rank delta re-ranked at its own rank is exact
    lora = random_concept(flux_pipe, "<new1>", seed=3)
    same, _ = cmp.compress(lora, rank=2)
    for a, b in zip(lora.deltas.layers, same.deltas.layers):
        assert torch.allclose(a.matrix(), b.matrix(), atol=1e-5)
    assert cmp.file_size(small) < cmp.file_size(concept)
    text = cmp.format_report(report, 100, 50, 0.01)
    assert "rank" in text and "file size" in text and "output change" in text


# ---------------------------------------------------------------------------------------------- merge
@pytest.fixture(scope="module")
def wide_pipe(flux_pipe):
    """The tiny FLUX pipeline with a wider transformer (8 heads: 128-d text features). The merge needs many more
    feature dimensions than constraint rows (full size: 3072 vs a few dozen); 32-d leaves it no room."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from dsd_core.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    t = FluxTransformer2DModel(**dict(TRANSFORMER_CONFIG, num_attention_heads=8)).eval().requires_grad_(False)
    return FluxPipeline(**{k: v for k, v in flux_pipe.components.items() if k != "transformer"}, transformer=t)


def fine_tuned_concept(pipe, token, word, seed, steps=30) -> ConceptFile:
    """A concept tuned the way training tunes it: CD's flow-matching objective on "photo of a <token> <word>" and a
    fixed random latent ("the concept's images"), deltas (rank 2) and token trained together with Adam. Like real
    fine-tuning, the deltas then also act on the caption's other words, which generic prompts share."""
    from dsd_core.custom_diffusion.objective import flow_matching_loss

    t = pipe.transformer
    g = torch.Generator().manual_seed(seed)
    deltas = ConceptDeltas.create(t, ParameterSet(rank=2), seed=seed)
    tokens = ModifierTokens.from_words(pipe, [token], [word])
    latents = torch.randn(2, 16, 4, 4, generator=g)
    opt = torch.optim.Adam(list(deltas.parameters()) + list(tokens.parameters()), lr=3e-2)
    tokens.attach(pipe)
    deltas.attach(t)
    try:
        for _ in range(steps):
            embeds, pooled, ids = pipe.encode_prompt(f"photo of a {token} {word}", None, max_sequence_length=32)
            loss = flow_matching_loss(t, latents, None, embeds.expand(2, -1, -1), pooled.expand(2, -1), ids,
                                      torch.rand(2, generator=g), torch.randn(latents.shape, generator=g)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        deltas.detach()
        tokens.detach()
    tokens.requires_grad_(False)
    deltas.requires_grad_(False)
    return ConceptFile(deltas, tokens, base_probe(t, deltas.names), {"base_kind": "flux"})


MERGE_REG = ["a photo of a city street", "a bowl of fruit on a table", "a dog on the beach", "a red car",
             "portrait of a man with a hat", "a forest in autumn", "a cup of coffee", "a mountain lake at sunrise",
             "an oil painting of a ship", "a bird on a branch", "a train at a station", "a teddy bear on a bed"]
HELD_OUT = ["a photo of a horse", "a glass of juice on a desk", "a snowy village", "a lighthouse by the sea"]


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_reproduces_each_concept_and_moves_generic_prompts_less_than_averaging(wide_pipe, seed):
    """CD's claim for its merge, on two concepts tuned separately (both as ``<new1>``, so one is renamed).

    Stated tolerances: each concept's layer outputs on its own words reproduced within 1e-4 (relative); generic
    prompts' layer outputs moved (sum over layers of ||dW x||^2) at most 0.25x as much as by naive averaging of the
    two deltas on the regularisation prompts, and at most 0.6x on generic prompts the merge never saw. Measured over
    seeds 0-11: 0.02-0.08x and 0.12-0.40x (constraint error ~1e-6), while averaging loses >20% of each concept.
    """
    from dsd_core.custom_diffusion.merge import LayerFeatures, solve_layer

    a = fine_tuned_concept(wide_pipe, "<new1>", "cat", 100 + seed)
    b = fine_tuned_concept(wide_pipe, "<new1>", "dog", 200 + seed)  # same token name: renamed to <new2>
    result = merge(wide_pipe, [a, b], MERGE_REG, ridge=1e-3, sigmas=(0.5,), size=SIZE, max_sequence_length=32)
    assert result.renames == [{}, {"<new1>": "<new2>"}]
    assert result.concept.token_names == ["<new1>", "<new2>"]
    assert max(result.constraint_error.values()) < 1e-4
    # the same features again (the regularisation prompts and unseen generic ones), to compare combinations
    layers = {x.target.name: x.target.rows for x in a.deltas.layers}
    targets = [[(p.format(token=t, word=w), f"{t} {w}") for p in ("{token} {word}", "photo of a {token} {word}")]
               for t, w in (("<new1>", "cat"), ("<new2>", "dog"))]
    result.concept.tokens.attach(wide_pipe)
    try:
        feats = collect_features(wide_pipe, layers, MERGE_REG, targets, sigmas=(0.5,), size=SIZE,
                                 max_sequence_length=32)
        held = collect_features(wide_pipe, layers, HELD_OUT, targets, sigmas=(0.5,), size=SIZE,
                                max_sequence_length=32)
    finally:
        result.concept.tokens.detach()

    def moved(mats, features):
        return sum(float(torch.trace(m.double() @ features[n].gram @ m.double().T)) for n, m in mats.items())

    merged = {n: d.matrix() for n, d in result.concept.deltas.by_name().items()}
    naive = {n: d.matrix() for n, d in average([a, b]).deltas.by_name().items()}
    other = {}
    for name in layers:
        f = feats[name]
        dense = [a.deltas.by_name()[name].matrix(), b.deltas.by_name()[name].matrix()]
        # another delta that also reproduces both concepts (the minimum-norm one, blind to generic prompts)
        up, down = solve_layer(LayerFeatures(torch.zeros_like(f.gram), 0, f.concept_rows), dense, ridge=1.0)
        other[name] = up @ down
        # naive averaging does not keep the concepts: a good part of each delta's effect on its own words is lost
        for i in (0, 1):
            c = f.concept_rows[i].float()
            want = c @ dense[i].T
            assert float((c @ naive[name].T - want).norm() / want.norm()) > 0.2
    assert moved(merged, feats) < 0.25 * moved(naive, feats), (moved(merged, feats), moved(naive, feats))
    assert moved(merged, held) < 0.6 * moved(naive, held), (moved(merged, held), moved(naive, held))
    assert moved(merged, feats) < moved(other, feats)


# ---------------------------------------------------------------------------------------------- training (engine)
def _train_config(tiny_model, out, **kw):
    from dsd_core.training.config import TrainConfig

    values = dict(base=tiny_model["base"], output=str(out), cpu=True, max_steps=6, min_image_size=16,
                  panel_size=64, checkpoint_every=3, validate_every=0, lr=1e-1, weight_decay=1e-2,
                  gradient_checkpointing=False, local_files_only=True, seed=0)
    values.update(kw)
    return TrainConfig(**values)


def _options(instance_dir, class_cache, **kw):
    from dsd_core.custom_diffusion.method import CustomDiffusionOptions

    values = dict(mode="flux", instance_dir=instance_dir, instance_prompt="photo of a <new1> cat",
                  num_class_images=2, class_steps=1, class_cache=str(class_cache), rank=2, max_sequence_length=32,
                  aug=True, hflip=True)
    values.update(kw)
    return CustomDiffusionOptions(**values)


def _fixed_loss(method) -> float:
    """The method's loss on its whole dataset with fixed randomness (augmentation, noise, noise levels)."""
    from dsd_core.training.data import load_pairs

    items = [method.encode_item(r) for r in load_pairs(method.config.data)]
    with torch.no_grad():
        return float(method.loss(method.module, method.collate(items), torch.Generator().manual_seed(123)))


def test_training_loss_falls_resume_is_exact_and_the_token_matters(tiny_model, tmp_path):
    from dsd_core.custom_diffusion.cli import load_model
    from dsd_core.custom_diffusion.method import CustomDiffusionMethod, train_concepts
    from dsd_core.training.engine import Trainer, TrainingCancelled

    import json

    cache = tmp_path / "class_cache"
    images(tmp_path / "cat", n=2)
    images(tmp_path / "dog", n=2, seed=10)
    concepts = tmp_path / "concepts.json"  # joint training of two concepts (CD's concepts_list)
    concepts.write_text(json.dumps([{"instance_dir": "cat", "instance_prompt": "photo of a <new1> cat"},
                                    {"instance_dir": "dog", "instance_prompt": "photo of a <new2> dog"}]))
    inst = ""
    # uninterrupted run, with the loss on a fixed batch before and after
    config = _train_config(tiny_model, tmp_path / "a")
    method = CustomDiffusionMethod(config, _options(inst, cache, concepts_list=str(concepts)))
    method.load(torch.device("cpu"), torch.float32)
    config.data = method.write_dataset(config.output)
    before = _fixed_loss(method)
    result = Trainer(config, method, progress_bar=False).train()
    after = _fixed_loss(method)
    assert result.step == 6 and not result.interrupted
    assert after < 0.95 * before, (before, after)

    # interrupted after step 3 (a checkpoint is written), then resumed: the same delta as the uninterrupted run
    def stop_at_3(progress):
        if progress.step == 3:
            raise TrainingCancelled("test")

    config_b = _train_config(tiny_model, tmp_path / "b")
    first = train_concepts(config_b, _options(inst, cache, concepts_list=str(concepts)), callback=stop_at_3,
                           progress_bar=False)
    assert first.interrupted and first.step == 3
    assert not os.path.exists(tmp_path / "b" / "concept.safetensors")
    second = train_concepts(_train_config(tiny_model, tmp_path / "b", resume="latest"),
                            _options(inst, cache, concepts_list=str(concepts)), progress_bar=False)
    assert second.step == 6 and not second.interrupted
    a = ConceptFile.load(str(tmp_path / "a" / "concept.safetensors"))
    b = ConceptFile.load(str(tmp_path / "b" / "concept.safetensors"))
    for la, lb in zip(a.deltas.layers, b.deltas.layers):
        assert torch.allclose(la.matrix(), lb.matrix(), atol=1e-6)
    assert torch.allclose(a.tokens.embeddings["t5"], b.tokens.embeddings["t5"], atol=1e-6)

    # the trained token changes the output only where the prompt uses it
    import argparse

    pipe = load_model(argparse.Namespace(mode="flux", base=tiny_model["base"], from_flux=None, model=None,
                                         dtype="float32", device="cpu", offline=True))
    assert a.token_names == ["<new1>", "<new2>"]
    init = ModifierTokens.from_words(pipe, ["<new1>", "<new2>"], ["cat", "dog"]).embeddings["t5"]
    moved = (a.tokens.embeddings["t5"] - init).abs().amax(dim=1)
    assert (moved > 1e-3).all(), moved  # both words trained (the public scripts' mask loop freezes the last one)
    base_cat, base_car = generate(pipe, "photo of a cat"), generate(pipe, "a red car")
    a.tokens.attach(pipe)
    try:
        assert np.array_equal(generate(pipe, "a red car"), base_car)
        assert np.abs(generate(pipe, "photo of a <new1> cat") - base_cat).max() > 1e-3
    finally:
        a.tokens.detach()
    handle = a.apply(pipe)  # with its deltas the concept changes the model; removing it restores it exactly
    assert np.abs(generate(pipe, "photo of a <new1> cat") - base_cat).max() > 1e-3
    handle.remove()
    assert np.array_equal(generate(pipe, "a red car"), base_car)


def test_cli_end_to_end_dsd(tiny_model, tmp_path):
    """images -> tune (YAML config) -> delta -> merge two concepts -> compress -> generate with DSD, via the CLI."""
    import yaml
    from PIL import Image

    from dsd_core.cli import main

    cache = tmp_path / "class_cache"
    for name, token, seed in (("a", "<new1>", 0), ("b", "<new2>", 10)):
        cfg = dict(mode="dsd", base=tiny_model["base"], model=os.path.dirname(tiny_model["lora"]),
                   output=str(tmp_path / name), instance_dir=images(tmp_path / f"img_{name}", n=2, seed=seed),
                   instance_prompt=f"photo of a {token} toy", cpu=True, max_steps=1, min_image_size=16,
                   panel_size=SIZE, num_class_images=1, class_steps=1, class_cache=str(cache), rank=2,
                   max_sequence_length=32, local_files_only=True, gradient_checkpointing=False)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["custom-diffusion", "train", "--config", str(tmp_path / f"{name}.yaml"), "--lr", "0.01"]) == 0
    model = ["--mode", "dsd", "--base", tiny_model["base"], "--model", os.path.dirname(tiny_model["lora"]),
             "--dtype", "float32", "--device", "cpu", "--offline"]
    merged, small, out = (str(tmp_path / n) for n in ("merged.safetensors", "small.safetensors", "out.png"))
    assert main(["custom-diffusion", "merge", str(tmp_path / "a" / "concept.safetensors"),
                 str(tmp_path / "b" / "concept.safetensors"), "--out", merged, "--size", str(SIZE),
                 "--sigmas", "0.5", "--max-sequence-length", "32", *model]) == 0
    assert ConceptFile.load(merged).token_names == ["<new1>", "<new2>"]
    assert main(["custom-diffusion", "compress", merged, "--out", small, "--rank", "1"]) == 0
    assert os.path.getsize(small) < os.path.getsize(merged)
    assert main(["custom-diffusion", "generate", "--concept", small, "--prompt", "this <new1> toy next to a <new2> toy",
                 "--image", tiny_model["reference"], "--out", out, "--size", str(SIZE), "--steps", "2", *model]) == 0
    assert Image.open(out).size == (SIZE, SIZE)
    # an unknown token and a delta made for another base are refused with a clear message
    assert main(["custom-diffusion", "generate", "--concept", small, "--prompt", "a <new9> toy", "--image",
                 tiny_model["reference"], "--out", out, "--size", str(SIZE), "--steps", "1", *model]) == 2
    flux = ["--mode", "flux", "--base", tiny_model["base"], "--dtype", "float32", "--device", "cpu", "--offline"]
    assert main(["custom-diffusion", "generate", "--concept", small, "--prompt", "a <new1> toy", "--out", out,
                 "--size", str(SIZE), "--steps", "1", *flux]) == 2
    # no images: a clear error before any model is loaded
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["custom-diffusion", "train", "--config", str(tmp_path / "a.yaml"), "--instance-dir", str(empty),
                 "--output", str(tmp_path / "c")]) == 2


# ---------------------------------------------------------------------------------------------- ComfyUI nodes
def test_nodes_train_with_interrupt_then_resume_compress_merge_apply_and_sample(tiny_model, tmp_path, monkeypatch):
    import nodes
    from dsd_core.image import pil_to_tensor
    from dsd_core.model_store import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME
    from dsd_core.tiny import reference_image
    from nodes import _comfy
    from nodes import custom_diffusion as cdn

    roots = {_comfy.DSD_FOLDER: [str(tmp_path / "dsd")], _comfy.BASE_FOLDER: [str(tmp_path / "diffusers")],
             cdn.CONCEPT_FOLDER: [str(tmp_path / "dsd_concepts")]}
    for folder in roots.values():
        os.makedirs(folder[0])
    os.symlink(os.path.dirname(tiny_model["lora"]), os.path.join(roots[_comfy.DSD_FOLDER][0], DEFAULT_MODEL_NAME))
    os.symlink(tiny_model["base"], os.path.join(roots[_comfy.BASE_FOLDER][0], DEFAULT_BASE_NAME))
    monkeypatch.setattr(_comfy, "folder_roots", lambda name: roots.get(name, []))
    monkeypatch.setattr(_comfy, "torch_device", lambda: "cpu")

    class Interrupted(Exception):
        pass

    stop = {"now": False}
    monkeypatch.setattr(_comfy, "interrupted", lambda: stop["now"])

    def check():
        if stop["now"]:
            stop["now"] = False
            raise Interrupted()

    monkeypatch.setattr(_comfy, "check_interrupt", check)
    inst = images(tmp_path / "toy", n=2)
    train = dict(name="toy", instance_folder=inst, instance_prompt="photo of a <new1> toy", class_prompt="",
                 mode="dsd", model=DEFAULT_MODEL_NAME, base=DEFAULT_BASE_NAME, preset="kv", rank=2, steps=3,
                 learning_rate=0.05, resolution=SIZE, num_class_images=1, class_steps=1, seed=0, resume=False)
    node = cdn.DSDCustomDiffusionTrain()
    real_logger_info = cdn.logger.info

    def cancel_after_first_step(*args):
        stop["now"] = True  # the user presses Cancel during step 1
        real_logger_info(*args)

    monkeypatch.setattr(cdn.logger, "info", cancel_after_first_step)
    with pytest.raises(Interrupted):
        node.train(**train)
    run = tmp_path / "dsd_concepts" / "runs" / "toy"
    saved = os.listdir(run / "checkpoints")  # the step the engine stops at depends on when it polls the flag
    assert len(saved) == 1 and saved[0] in ("step-00000001", "step-00000002")
    monkeypatch.setattr(cdn.logger, "info", real_logger_info)
    path, plot, summary = node.train(**dict(train, resume=True))
    assert path == str(tmp_path / "dsd_concepts" / "toy.safetensors") and os.path.isfile(path)
    assert plot.shape == (1, 256, 512, 3) and "3 steps" in summary

    (listed,) = cdn.DSDConceptLoader.INPUT_TYPES()["required"]["concept"][:1]
    assert listed == ["toy.safetensors"]
    (concept,) = cdn.DSDConceptLoader().load("toy.safetensors")
    small, report = cdn.DSDCustomDiffusionCompress().compress(concept, "toy_small", 0.6, 1)
    assert os.path.isfile(small) and "file size" in report

    handle = nodes.NODE_CLASS_MAPPINGS["DSDModelLoader"]().load(
        model=DEFAULT_MODEL_NAME, base=DEFAULT_BASE_NAME, dtype="float32", memory="full", speed="exact",
        download_missing=False)[0]
    import functools

    from dsd_core.custom_diffusion import merge as merge_module

    quick = functools.partial(merge_module.merge, reg_prompts=["a red car", "a dog on the beach"], sigmas=(0.5,),
                              size=SIZE, max_sequence_length=32)
    monkeypatch.setattr(merge_module, "merge", quick)  # the node's defaults are sized for the real model
    merged, merge_summary = cdn.DSDCustomDiffusionMerge().merge(handle, concept, small, "both", 1e-3)
    assert "<new1> -> <new2>" in merge_summary
    with_concept, words = cdn.DSDApplyConcept().apply(handle, merged, 1.0)
    assert words == "<new1>, <new2>"
    image = pil_to_tensor(reference_image(seed=9))
    sampler = nodes.NODE_CLASS_MAPPINGS["DSDSampler"]()
    args = dict(seed=3, steps=2, guidance=3.5, image_guidance=1.0, text_guidance=1.0, panel_size=64, batch_size=1,
                lora_scale=1.0)
    plain = sampler.sample(handle, image, prompt="photo of a toy", **args)["result"][0]
    tuned = sampler.sample(with_concept, image, prompt="photo of a <new1> toy", **args)["result"][0]
    assert (tuned - plain).abs().max() > 1e-3
    assert torch.equal(sampler.sample(handle, image, prompt="photo of a toy", **args)["result"][0], plain)  # model unchanged
    with pytest.raises(InputError, match="<new3>"):
        sampler.sample(with_concept, image, prompt="photo of a <new3> toy", **args)
