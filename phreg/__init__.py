"""phreg: give a pretrained Vision Transformer register tokens after the fact (PH-Reg self-distillation)."""

__version__ = "0.1.0"
