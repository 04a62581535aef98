"""Recipes: plain data (YAML) checked against typed dataclasses (`recipe`). Torch-free."""
