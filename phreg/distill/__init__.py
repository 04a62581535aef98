"""student -> loss -> step: a run set up (`session`), the step (`step`, `loss`, `unlock`), the loop (`loop`), its
checkpoints, resume rules and stop signals, its memory and speed switches."""
