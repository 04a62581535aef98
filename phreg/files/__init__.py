"""Writing and reading files safely: atomic writes, disk errors in one line and hashes (`atomic`), safetensors files
written and read in bounded memory (`tensorfile`), and paths users type (`paths`). Torch-free but for `tensorfile`."""
