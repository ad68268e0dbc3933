"""Rendering: tensors in, PIL images out (NumPy, Pillow and matplotlib live here, not in the core)."""
