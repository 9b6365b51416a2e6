"""``bert-recipes finetune RECIPE`` and ``bert-recipes glue RECIPE --tasks ...``.

Registered by :mod:`bert_recipes.cli` through :func:`add_parser`.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Add the ``finetune`` and ``glue`` commands to the CLI's subparsers."""
    from ..cli import hub_args
    from ..cli_help import keys_help, recipe_args
    from .recipe import FinetuneRecipe

    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "finetune", help="fine-tune a BERT on one GLUE task", formatter_class=raw,
        description="Fine-tune model.name_or_path on the recipe's GLUE task; the best dev checkpoint is "
        "exported to OUTPUT_DIR/best.\nexample: bert-recipes finetune recipes/glue/rte.yaml "
        "model.name_or_path=runs/tiny/final data.glue_dir=../shared/data/glue",
        epilog=keys_help(FinetuneRecipe),
    )
    recipe_args(p)
    hub_args(p, "best/ (the best seed's with several seeds)")
    p.set_defaults(handler=cmd_finetune)

    p = sub.add_parser(
        "glue", help="fine-tune several GLUE tasks; results table, chart and submission zip", formatter_class=raw,
        description="RECIPE is the base recipe (e.g. recipes/glue/base.yaml); <its folder>/<task>.yaml adds each "
        "task's own keys when present.\nexample: bert-recipes glue recipes/glue/base.yaml --tasks cola,sst2,mrpc "
        "model.name_or_path=runs/tiny/final data.glue_dir=../shared/data/glue",
        epilog=keys_help(FinetuneRecipe).replace("recipe keys", "recipe keys (task and output_dir are set per task)", 1),
    )
    p.add_argument("recipe", help="base recipe YAML file")
    # REMAINDER: options may follow the overrides too (re-parsed in cmd_glue).
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides, e.g. model.name_or_path=runs/tiny/final")
    _glue_options(p)
    p.set_defaults(handler=cmd_glue)


def _glue_options(parser, defaults=None) -> None:
    defaults = defaults or argparse.Namespace(tasks=None, predict_test=False)
    parser.add_argument("--tasks", default=defaults.tasks, help="comma-separated GLUE tasks (default: all nine)")
    parser.add_argument("--predict-test", action="store_true", default=defaults.predict_test,
                        help="predict the test sets and write the leaderboard zip (AX with the MNLI model)")


def cmd_finetune(args) -> int:
    from ..cli import push_export, quiet_libraries, run_then_push
    from .recipe import load_finetune_recipe

    recipe = load_finetune_recipe(args.recipe, args.overrides)  # before torch and transformers are imported
    quiet_libraries()
    from ..training.accelerator import launch_state

    from .seeds import finetune_seeds

    result = run_then_push(args, lambda: finetune_seeds(recipe))  # a stopped run raises RunStopped (the CLI's exit code)
    if not launch_state().is_main_process:
        return 0
    dev = ", ".join(f"{key} {value:.4f}" + (f" ± {result['dev_std'][key]:.4f}" if "dev_std" in result else "")
                    for key, value in result["dev"].items())
    print(f"{result['task']} dev: {dev}")
    from .report import subsampled, subsampled_text

    cut = result.get("subsampled", subsampled(recipe.data))  # what cut a split (older results: the recipe's)
    if cut:
        print(subsampled_text(cut, scope="", mark=""))
    print(f"best model: {result['best']}")
    if result.get("test_predictions"):
        print(f"test predictions: {result['test_predictions']}")
        warn_incomplete_submission([result["task"]], "predict_test", "`bert-recipes glue RECIPE --predict-test` "
                                   "fine-tunes every task and writes one")
    push_export(args, result["best"])
    return 0


def warn_incomplete_submission(tasks: list[str], asked: str = "--predict-test",
                               fix: str = "run all tasks (no --tasks) for one") -> None:
    """One line on stderr when test predictions (``asked``) cover only some tasks: gluebenchmark.com
    scores a submission only with every task's test predictions (and AX, from MNLI)."""
    import sys

    from .sweep import TRAINABLE

    missing = [name for name in TRAINABLE if name not in tasks]
    if missing:
        print(f"warning: {asked} with {len(tasks)} of the {len(TRAINABLE)} GLUE tasks (missing "
              f"{','.join(missing)}): the zip is not a complete leaderboard submission; {fix}", file=sys.stderr)


def cmd_glue(args) -> int:
    from pathlib import Path

    from ..training.accelerator import launch_state

    from ..cli import build_parser, quiet_libraries
    from .sweep import RESULTS_JSON, RESULTS_MD, RESULTS_PNG, parse_tasks, run_glue

    if any(arg in ("-h", "--help") for arg in args.overrides):  # after the overrides: the same help as before them
        build_parser().parse_args(["glue", "--help"])  # prints it and exits
    rest = argparse.ArgumentParser(prog="bert-recipes glue", add_help=False)
    _glue_options(rest, args)
    rest.add_argument("overrides", nargs="*")
    args = rest.parse_intermixed_args(args.overrides, namespace=argparse.Namespace(recipe=args.recipe))
    quiet_libraries()
    tasks = parse_tasks(args.tasks)
    if args.predict_test and launch_state().is_main_process:
        warn_incomplete_submission(tasks)
    summary = run_glue(args.recipe, tasks, args.overrides, predict_test=args.predict_test)
    if not launch_state().is_main_process:
        return 0
    root = Path(summary["output_dir"])
    print((root / RESULTS_MD).read_text(encoding="utf-8"), end="")
    print(f"results: {root / RESULTS_JSON}, {root / RESULTS_MD}, {root / RESULTS_PNG}")
    if summary.get("submission"):
        print(f"submission: {summary['submission']}")
    return 0
