"""phreg: give a pretrained Vision Transformer register tokens after the fact (PH-Reg self-distillation).

`phreg.dense_features(model, images, head="final" | "last_block" | "naclip" | "maskclip")` reads dense features of any
model phreg supports (see `phreg/dense.py`); it is imported on first use, so `import phreg` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["dense_features"]


def __getattr__(name: str):
    if name == "dense_features":
        from .dense import dense_features

        return dense_features
    raise AttributeError(f"module 'phreg' has no attribute {name!r}")
