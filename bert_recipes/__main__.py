"""``python -m bert_recipes`` = the ``bert-recipes`` command."""

from .cli import run

run()
