"""Recording block outputs with forward hooks, for the feature loss and the feature distance.

Both FLUX block kinds return ``(encoder_hidden_states, hidden_states)``: the text and the image stream of a double
block, and the two parts of the joint sequence of a single block. Both are recorded, so the feature loss covers both
streams of double blocks and the whole joint sequence of single blocks.
"""

from __future__ import annotations

import torch


class BlockRecorder:
    """Within ``with BlockRecorder(model, names) as rec:`` each forward stores ``rec.outputs[name] = (txt, img)``.

    ``names`` are module names such as ``transformer_blocks.3``. Outputs are kept as produced (with their autograd
    graph, for the student); under gradient checkpointing a recomputation overwrites them with equal values.
    """

    def __init__(self, model: torch.nn.Module, names):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self) -> "BlockRecorder":
        modules = dict(self.model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"the model has no block {missing[0]!r} to record")
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = (output[0], output[1])

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.outputs.clear()
