"""The run folder: its layout and state (`folder`), one writer at a time (`lock`), and the list of images a run
trained on (`training_list`). Torch-free: every command can ask about a run in milliseconds."""
