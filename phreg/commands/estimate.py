"""`phreg estimate RECIPE [key=value ...]`: the memory a recipe's run will need, from a model on the meta device."""

from __future__ import annotations

from .args import add_command


def add_parser(sub) -> None:
    p = add_command(sub, "estimate", "the memory a recipe's run will need, without weights",
                    "Build the recipe's model on the meta device (no weights read, nothing allocated) and print the "
                    "memory estimate `distill` prints at start: weights, unlocked copies, optimizer, activations, "
                    "teacher views.",
                    "example: phreg estimate recipes/dinov3_vit7b16.yaml --budget 80. Exit code 1 when it does not "
                    "fit in --budget GB.")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, as for distill")
    p.add_argument("--cpu", action="store_true", help="a CPU run (fp32 unless train.precision says bf16); default: a "
                                                      "GPU run (bf16 autocast)")
    p.add_argument("--budget", type=float, metavar="GB", help="say whether the estimate fits in this many GB")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config.recipe import load_recipe
    from ..models.names import timm_name

    recipe = load_recipe(args.recipe, args.overrides)
    recipe.model.name = timm_name(recipe.model.name)
    from ..distill.memory import plan

    est = plan(recipe, gpu=not args.cpu)
    print(est.line())
    if args.budget:
        fits = est.total <= args.budget * 1e9
        print(f"{'fits' if fits else 'does not fit'} in {args.budget:g} GB"
              + ("" if fits or recipe.speed.grad_checkpointing else "; try speed.grad_checkpointing=true"))
        return 0 if fits else 1
    return 0
