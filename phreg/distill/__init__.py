"""student -> loss -> step: the target cache, the loss, checkpoints and the Accelerate loop."""
