"""export and publish: timm-loadable safetensors, model cards, one-commit uploads to the Hugging Face Hub."""
