"""ComfyUI nodes of ComfyUI-SelfDistill: thin V1 adapters over ``dsd_core`` (no algorithms here)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
