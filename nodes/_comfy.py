"""The few ComfyUI services the nodes use, imported lazily so the node modules import without ComfyUI.

Outside ComfyUI (unit tests, scripts) each helper degrades to a neutral default.
"""

from __future__ import annotations

import os

DSD_FOLDER = "dsd"  # models/dsd/<name>/ holds transformer/ + pytorch_lora_weights.safetensors
BASE_FOLDER = "diffusers"  # models/diffusers/<name>/ holds a diffusers FLUX.1-dev folder


def register_model_folders() -> None:
    """Add the pack's ``dsd`` model folder to ComfyUI (``models/dsd``); creates no folder."""
    try:
        import folder_paths
    except ImportError:
        return
    if DSD_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(DSD_FOLDER, os.path.join(folder_paths.models_dir, DSD_FOLDER))


def folder_roots(name: str) -> list[str]:
    """The folders ComfyUI knows for ``name`` (models dir and extra_model_paths.yaml), or [] outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    try:
        return list(folder_paths.get_folder_paths(name))
    except KeyError:
        return [os.path.join(folder_paths.models_dir, name)]


def filenames(name: str) -> list[str]:
    """Files ComfyUI lists for a model folder (``unet``, ``clip``, ``vae``, ``loras``), or [] outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    try:
        return list(folder_paths.get_filename_list(name))
    except KeyError:
        return []


def filenames_with_extension(name: str, extension: str) -> list[str]:
    """Files with ``extension`` under the folders of ``name`` (relative paths, like ComfyUI's lists)."""
    found = set()
    for root in folder_roots(name):
        for folder, _, files in os.walk(root, followlinks=True):
            for f in files:
                if f.lower().endswith(extension):
                    found.add(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
    return sorted(found)


def full_path(name: str, filename: str) -> str | None:
    """The full path of a model file, or None (``get_full_path_or_raise`` is missing in older ComfyUI)."""
    try:
        import folder_paths

        path = folder_paths.get_full_path(name, filename)
    except ImportError:
        path = None
    if path is None:  # outside ComfyUI, or a file ComfyUI does not list (e.g. .gguf)
        for root in folder_roots(name):
            if os.path.isfile(os.path.join(root, filename)):
                return os.path.join(root, filename)
    return path


def output_dir() -> str:
    """ComfyUI's output folder, or a temporary folder outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        import tempfile

        return os.path.join(tempfile.gettempdir(), "dsd_output")
    return folder_paths.get_output_directory()


def torch_device() -> str:
    try:
        import comfy.model_management as mm
    except ImportError:
        from dsd_core.loading import default_device

        return default_device()
    return str(mm.get_torch_device())


def make_room(device: str) -> None:
    """Unload ComfyUI's own models from the GPU before DSD uses it: ComfyUI's memory manager does not know DSD's
    diffusers pipeline, so it would not make room by itself. Nothing to do on the CPU."""
    if not str(device).startswith("cuda"):
        return
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.unload_all_models()
    mm.soft_empty_cache()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    try:
        import comfy.utils
    except ImportError:
        return None
    return comfy.utils.ProgressBar(total)


def flux_latent_rgb():
    """ComfyUI's FLUX latent-to-RGB preview factors, when this ComfyUI has them."""
    try:
        import comfy.latent_formats as lf
    except ImportError:
        return None, None
    fmt = getattr(lf, "Flux", None)
    if fmt is None:
        return None, None
    f = fmt()
    return getattr(f, "latent_rgb_factors", None), getattr(f, "latent_rgb_factors_bias", None)


def comfy_tqdm_class():
    """A tqdm subclass for huggingface_hub downloads that also drives a ComfyUI progress bar."""
    import tqdm

    class ComfyTqdm(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._comfy = progress_bar(int(self.total)) if self.total else None

        def update(self, n=1):
            out = super().update(n)
            if self._comfy is not None:
                self._comfy.update_absolute(min(self.n, self.total), self.total)
            return out

    return ComfyTqdm


# ---------------------------------------------------------------------------------------------- training nodes
def input_path(path: str) -> str:
    """An absolute path as is; a relative one under ComfyUI's input folder (the working directory outside ComfyUI)."""
    path = os.path.expanduser(path.strip())
    if os.path.isabs(path):
        return path
    try:
        import folder_paths
    except ImportError:
        return os.path.abspath(path)
    return os.path.join(folder_paths.get_input_directory(), path)


def raise_interrupted() -> None:
    """Stop the graph as ComfyUI's Cancel does (after the training node has saved its checkpoint)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        from dsd_core.training import TrainingCancelled

        raise TrainingCancelled("training cancelled; a checkpoint was saved") from None
    raise mm.InterruptProcessingException()
