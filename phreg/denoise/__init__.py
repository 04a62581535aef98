"""images -> views -> teacher targets: TTA views, their exact inverse, and the denoised features they average to.

Used by distillation (targets) and evaluation (distance to the denoised features) alike.
"""
