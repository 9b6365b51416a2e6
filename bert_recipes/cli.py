"""Command line: ``bert-recipes COMMAND RECIPE.yaml [key.path=value ...]``.

Commands: pretrain, finetune, glue, inspect, show, recipes, tokenizer, plot.
A user mistake exits with code 2 and one line ``error: <file/key>: <what was expected>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from . import __version__
from .cli_help import keys_help, recipe_args
from .cli_errors import report_error
from .errors import UserError
from .training.signals import RunStopped, stop_with_launcher, stopped_exit_code

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _setup_environment() -> None:
    """Process-wide defaults, set before torch is imported (the user's values win).

    ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning. On a machine
    whose cores are shared (CI, a laptop busy with other work) spinning threads wait on a
    descheduled peer and a step can take 10x longer (measured: tiny recipe, 40 steps, 86 s
    spinning vs 11 s passive on 2 loaded cores). A rank started by a launcher stops with it
    (:func:`~bert_recipes.training.signals.stop_with_launcher`).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stop_with_launcher()


def _setup_logging() -> None:
    """Python logging only: importing transformers here would delay every recipe error by a
    second (see :func:`quiet_libraries`, called once the recipe is valid)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # info from the first rank of a launch only (each rank repeated the run's set-up lines: found by a helper)
    logging.getLogger("bert_recipes").setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    for noisy in ("transformers", "datasets", "accelerate", "torch", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """transformers/datasets: errors only, and no progress bars ("Writing model shards",
    tokenisation, loading) unless stderr is a terminal. Called by each command after its
    recipe has been validated, so a recipe error never waits for these imports."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not sys.stderr.isatty():
            hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if not sys.stderr.isatty():
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


def build_parser() -> argparse.ArgumentParser:
    from .recipe import PretrainRecipe

    parser = argparse.ArgumentParser(
        prog="bert-recipes",
        description="Pretrain BERT (MLM + NSP) and fine-tune it on GLUE from one YAML recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  bert-recipes pretrain recipes/pretrain/tiny.yaml train.max_steps=20\n"
        "  bert-recipes show recipes/pretrain/mini.yaml\n  bert-recipes recipes",
    )
    parser.add_argument("--version", action="version", version=f"bert-recipes {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("pretrain", help="pretrain BERT from a recipe", epilog=keys_help(PretrainRecipe), formatter_class=raw)
    recipe_args(p)
    hub_args(p, "final/")

    p = sub.add_parser("inspect", help="write collated training batches as JSON lines", formatter_class=raw)
    recipe_args(p)
    p.add_argument("--batches", type=int, default=2, help="number of batches (default 2)")
    p.add_argument("--out", required=True, help="output file (.jsonl, or text with --text)")
    p.add_argument("--rank", type=int, default=0, help="show what process RANK of --world-size trains on (default 0)")
    p.add_argument("--world-size", type=int, default=1, help="number of processes (default 1)")
    p.add_argument("--text", action="store_true",
                   help="one readable line per example: label | A | B, masked words as [MASK](original)")

    p = sub.add_parser("show", help="print the fully resolved recipe")
    recipe_args(p)
    p.add_argument("--kind", choices=["pretrain", "finetune"], default=None, help="schema (default: guessed)")

    sub.add_parser("recipes", help="list the shipped recipes")

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tsub.add_parser("train", help="train a WordPiece tokenizer and save it")
    t.add_argument("files", nargs="+", help="text files or globs")
    t.add_argument("--out", required=True, help="output folder: a new or empty one, or see --overwrite (never a model folder)")
    t.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder, replacing its tokenizer files")
    t.add_argument("--vocab-size", type=int, default=30522)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--cased", action="store_true", help="keep case and accents")
    t.add_argument("--text-column", default="text", help="the text field of JSON Lines / parquet files (default text)")
    t.add_argument("--model-max-length", type=int, default=512,
                   help="the length truncation=True cuts at: the model's max_position_embeddings (default 512)")

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands implemented in other modules register themselves here."""
    from . import plot
    from .glue import cli as glue_cli

    glue_cli.add_parser(sub)
    plot.add_parser(sub)


def _guess_schema(path: str, kind: str | None):
    from .recipe import PretrainRecipe, is_finetuning_recipe, load_raw

    if kind == "pretrain":
        return PretrainRecipe
    if kind == "finetune" or is_finetuning_recipe(load_raw(path)):
        from .glue.recipe import FinetuneRecipe

        return FinetuneRecipe
    return PretrainRecipe


def cmd_pretrain(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before torch and transformers are imported
    quiet_libraries()
    from .pretrain import pretrain

    final = run_then_push(args, lambda: pretrain(recipe))
    if _is_main_process():
        print(f"checkpoint: {final}")
        push_export(args, final)
    return 0


def hub_args(parser, folder: str) -> None:
    """``--push-to-hub REPO`` and ``--hub-private`` for a command whose export is ``folder``."""
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help=f"after the run, upload {folder} to this Hub model repo")
    parser.add_argument("--hub-private", action="store_true", help="create the Hub repo as private (with --push-to-hub)")


def run_then_push(args, run):
    """``run()`` with ``--push-to-hub`` checked before it (not after hours of training) and a
    line saying nothing was pushed when a signal stopped it. Returns what ``run`` returns."""
    if args.push_to_hub is not None:  # --push-to-hub "" is refused, not ignored
        from .hub import check_push_target

        check_push_target(args.push_to_hub)
    try:
        return run()
    except RunStopped:
        if args.push_to_hub and _is_main_process():
            print("not pushed to the Hub: the run stopped before its last step (resume it with --push-to-hub)")
        raise


def push_export(args, folder) -> None:
    """Upload ``folder`` with ``--push-to-hub`` (main process only: the caller's check)."""
    if args.push_to_hub is not None:
        from .hub import push_to_hub

        print(f"pushed to the Hub: {push_to_hub(folder, args.push_to_hub, private=args.hub_private)}")


def _is_main_process() -> bool:
    """True on the main process of an ``accelerate launch`` (and in a plain run)."""
    from .training.accelerator import launch_state

    return launch_state().is_main_process


def cmd_inspect(args) -> int:
    from .inspect_batches import write_batches
    from .recipe import load_recipe

    from .training.accelerator import launched_processes

    if launched_processes() > 1:  # every rank wrote rank 0's batches into one file (a helper)
        raise UserError("inspect runs in one process, not under accelerate launch / torchrun: run it alone with "
                        f"--rank R --world-size {launched_processes()} to see what rank R trains on")
    if args.batches < 1:
        raise UserError(f"--batches: expected a positive integer, got {args.batches}")
    if args.world_size < 1 or not 0 <= args.rank < args.world_size:
        raise UserError(f"--rank/--world-size: expected 0 <= rank < world size, got rank {args.rank} of {args.world_size}")
    check_inspect_out(Path(args.out))
    recipe = load_recipe(args.recipe, args.overrides)
    quiet_libraries()
    count = write_batches(recipe, args.batches, args.out, rank=args.rank, world_size=args.world_size, text=args.text)
    print(f"wrote {count} examples from {args.batches} batches to {args.out}")
    return 0


def cmd_show(args) -> int:
    from .recipe import dump_recipe, load_recipe

    print(dump_recipe(load_recipe(args.recipe, args.overrides, schema=_guess_schema(args.recipe, args.kind))), end="")
    return 0


def cmd_recipes(_args) -> int:
    root = REPO_RECIPES if REPO_RECIPES.is_dir() else Path("recipes")
    if not root.is_dir():
        raise UserError("recipes: no recipes/ folder next to the package or in the current directory")
    for path in sorted(root.rglob("*.yaml")):
        print(f"{str(path.relative_to(root.parent)):<44} {_about(path)}")
    return 0


def _about(path: Path, limit: int = 150) -> str:
    """The first sentence of a recipe's leading comment block (at most ``limit`` characters)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(" ".join(lines).split())
    # not after an abbreviation: "et al.", "e.g.", "i.e.", "Sec.", "Fig.", "vs."
    sentence = re.split(r"(?<!\bal\.)(?<!e\.g\.)(?<!i\.e\.)(?<!\bSec\.)(?<!\bFig\.)(?<!\bvs\.)(?<=\.)\s+", text,
                        maxsplit=1)[0]
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return sentence


def cmd_tokenizer(args) -> int:
    from .recipe import expand_files
    from .tokenizer import SPECIAL_TOKENS, save_tokenizer, train_wordpiece

    if args.tokenizer_command != "train":
        raise UserError("tokenizer: expected an action, e.g. 'bert-recipes tokenizer train FILES --out DIR'")
    files = expand_files(args.files, "files")
    if args.model_max_length < 1:
        raise UserError(f"--model-max-length: expected a positive integer, got {args.model_max_length}")
    if args.vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size: expected more than the {len(SPECIAL_TOKENS)} special tokens, got {args.vocab_size}")
    check_tokenizer_out(Path(args.out), args.overwrite)
    try:
        tokenizer = train_wordpiece(files, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                                    lowercase=not args.cased, show_progress=sys.stderr.isatty(),
                                    model_max_length=args.model_max_length, key="files", text_column=args.text_column)
    except UserError as exc:  # the data reader names recipe keys: this command's options instead
        raise type(exc)(str(exc).replace("data.text_column", "--text-column").replace("data.train_files:", "files:")) \
            from None
    out = save_tokenizer(tokenizer, args.out, model_max_length=args.model_max_length)
    print(f"tokenizer with {len(tokenizer)} tokens saved to {out}")
    return 0


def check_inspect_out(out: Path) -> None:
    """``inspect --out``: a new file, an empty one, or an earlier ``inspect`` output (its first
    line a JSON example with ``batch``, or ``IsNext |`` / ``RandomNext |``): it replaced any
    file, model weights included (found by a helper).

    Raises:
        UserError: ``--out`` is a folder or another file.
    """
    if out.is_dir():
        raise UserError(f"--out: '{out}' is a folder; expected a file name, e.g. {out / 'batches.jsonl'}")
    if out.is_file() and out.stat().st_size:
        with open(out, "rb") as handle:
            first = handle.readline(4096)
        if not first.startswith((b'{"batch": ', b"IsNext | ", b"RandomNext | ")):
            raise UserError(f"--out: '{out}' exists and is not an earlier inspect output; choose another file name")


def check_tokenizer_out(out: Path, overwrite: bool) -> None:
    """``tokenizer train --out``: a new folder, or (``--overwrite``) one holding a tokenizer
    only; never a model folder, whose tokenizer must match its embeddings.

    Raises:
        UserError: ``--out`` is a file, holds a model, or holds files without ``--overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: '{out}' exists and is not a folder")
    if (out / "config.json").exists():
        raise UserError(f"--out: '{out}' holds a model (config.json), whose embeddings are sized to its own "
                        "tokenizer: choose another folder")
    if (out / "recipe.yaml").exists() or (out.parent / "recipe.yaml").exists():  # a run, or its tokenizer/
        raise UserError(f"--out: '{out}' belongs to a run, whose checkpoints were trained with its own tokenizer "
                        "(a resume would go on with other token ids): choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out: '{out}' is not empty; add --overwrite to replace its tokenizer files, or choose "
                        "another folder")


COMMANDS = {
    "pretrain": cmd_pretrain,
    "inspect": cmd_inspect,
    "show": cmd_show,
    "recipes": cmd_recipes,
    "tokenizer": cmd_tokenizer,
}


def main(argv: list[str] | None = None) -> int:
    _setup_environment()
    _setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow the options: `show RECIPE --kind finetune task=rte`
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.command:
        parser.print_help()
        return 2
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    try:
        return handler(args) or 0
    except RunStopped:
        return stopped_exit_code()  # the loop has printed where its checkpoint is
    except (UserError, KeyboardInterrupt, OSError, MemoryError, RuntimeError) as exc:
        code = report_error(exc, args.command)
        if code is None:  # not the user's nor the machine's: a bug, its traceback
            raise
        return code


def run() -> None:
    code = main()
    if code == 0:  # after an error, a rank exits without a goodbye to peers that may be gone
        from .training.accelerator import end_process_group

        end_process_group()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()

