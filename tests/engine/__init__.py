"""Engine tier: tests against a real ComfyUI server (see conftest.py)."""
