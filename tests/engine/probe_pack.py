"""Source of a tiny V1 custom-node pack that the engine fixture writes into a temp
``custom_nodes`` folder (as ``dsd_engine_probe/__init__.py``) to prove the harness.

It is only ever imported *inside* the ComfyUI server process; nothing here runs in pytest.
Nodes: ``DSDProbeAddIntsToImage`` (a+b -> INT and a flat grey IMAGE), ``DSDProbeRaise``
(raises), ``DSDProbeSlow`` (loops with interrupt checks and ProgressBar progress).
Route: ``GET /dsd_probe/custom_node_modules`` lists the loaded custom-node modules and
their NODE_CLASS_MAPPINGS keys (used to check that our own pack loaded).
"""

PROBE_PACK_NAME = "dsd_engine_probe"

PROBE_PACK_SOURCE = r'''
import os
import sys
import time

import torch


class DSDProbeAddIntsToImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 40, "min": -1000, "max": 1000}),
                             "b": ("INT", {"default": 2, "min": -1000, "max": 1000}),
                             "size": ("INT", {"default": 4, "min": 1, "max": 64})}}

    RETURN_TYPES = ("INT", "IMAGE")
    RETURN_NAMES = ("sum", "image")
    FUNCTION = "run"
    CATEGORY = "dsd_engine_probe"

    def run(self, a, b, size):
        s = a + b
        v = max(0, min(255, s)) / 255.0
        return (s, torch.full((1, size, size, 3), v, dtype=torch.float32))


class DSDProbeRaise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"message": ("STRING", {"default": "probe failure"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "dsd_engine_probe"

    def run(self, message):
        raise RuntimeError(message)


class DSDProbeSlow:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 100, "min": 1, "max": 100000}),
                             "step_seconds": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 10.0, "step": 0.01}),
                             "tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "dsd_engine_probe"

    def run(self, steps, step_seconds, tag):
        import comfy.model_management as mm
        import comfy.utils

        pbar = comfy.utils.ProgressBar(steps)
        done = 0
        for _ in range(steps):
            mm.throw_exception_if_processing_interrupted()
            time.sleep(step_seconds)
            done += 1
            pbar.update(1)
        return {"ui": {"steps_done": [done], "tag": [tag]}, "result": (done,)}


NODE_CLASS_MAPPINGS = {
    "DSDProbeAddIntsToImage": DSDProbeAddIntsToImage,
    "DSDProbeRaise": DSDProbeRaise,
    "DSDProbeSlow": DSDProbeSlow,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DSDProbeAddIntsToImage": "DSD probe: add ints to image",
    "DSDProbeRaise": "DSD probe: raise",
    "DSDProbeSlow": "DSD probe: slow (interruptible)",
}


def _custom_node_modules():
    out = []
    for name, mod in list(sys.modules.items()):
        mappings = getattr(mod, "NODE_CLASS_MAPPINGS", None)
        f = getattr(mod, "__file__", None)
        if not isinstance(mappings, dict) or not f or name in ("nodes", "__main__"):
            continue
        out.append({"module": name, "file": os.path.realpath(f), "nodes": sorted(mappings)})
    return out


try:
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/dsd_probe/custom_node_modules")
    async def _dsd_probe_modules(request):
        return web.json_response(_custom_node_modules())
except Exception as e:  # the route is a convenience; the nodes must load regardless
    print("dsd_engine_probe: route not registered:", repr(e))
'''
