"""images -> views -> teacher targets: TTA views and their exact inverse (`views`), the frozen teacher that averages
them into denoised targets (`teacher`), the target cache that computes them once (`cache`), and the held-out score
against them (`heldout`). Used by distillation and evaluation alike."""
