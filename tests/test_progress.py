"""Progress bars: drawn with an ETA on a terminal for every long step (tokenizer training,
pretraining, evaluation, fine-tuning, GLUE sweeps), never on other ranks or in logs."""

from __future__ import annotations

import re
import sys

from bert_recipes import tokenizer as tokenizer_module
from bert_recipes.cli import main
from bert_recipes.training.reporting import progress

from .conftest import TINY_RECIPE, tiny_overrides
from .test_finetune import GLUE_RECIPES, overrides


def as_terminal(monkeypatch):
    """Make the captured stderr look like a terminal (tqdm writes to ``sys.stderr``).

    Called in the test body: pytest swaps in capsys's stream only for the call phase.
    """
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)


def test_bar_counts_items_and_shows_eta_on_a_terminal(capsys, monkeypatch):
    as_terminal(monkeypatch)
    assert list(progress(range(3), desc="eval")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "eval" in err and "3/3" in err
    assert "<00:00" in err  # tqdm's elapsed<remaining (ETA) field


def test_no_bar_on_other_ranks(capsys, monkeypatch):
    as_terminal(monkeypatch)
    assert list(progress(range(3), desc="eval", main=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    assert list(progress(range(3), desc="eval")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_pretraining_draws_train_and_eval_bars_and_tokenizer_progress(tmp_path, capsys, monkeypatch):
    as_terminal(monkeypatch)
    shown = {}
    train_wordpiece = tokenizer_module.train_wordpiece

    def spy(*args, **kwargs):
        shown["tokenizer"] = kwargs.get("show_progress")
        return train_wordpiece(*args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "train_wordpiece", spy)
    code = main(["pretrain", str(TINY_RECIPE), *tiny_overrides(tmp_path / "run", **{"train.max_steps": 2,
                                                                                    "train.eval_steps": 2,
                                                                                    "train.per_device_eval_batch_size": 8})])
    assert code == 0
    err = capsys.readouterr().err
    assert shown["tokenizer"] is True  # tokenizers draws its own bar
    assert re.search(r"pretrain: +100%\|[^|]*\| 2/2 ", err)
    # data.max_eval_samples=16 at per_device_eval_batch_size=8: a bar over two eval batches
    # (a fast evaluation is cleared before tqdm's first refresh; its start shows the total)
    assert re.search(r"eval: +0%\|[^|]*\| 0/2 ", err)


def test_glue_sweep_draws_task_finetune_and_eval_bars(tmp_path, capsys, checkpoint, monkeypatch):
    as_terminal(monkeypatch)
    code = main(["glue", str(GLUE_RECIPES / "base.yaml"), *overrides(checkpoint, tmp_path / "glue",
                                                                     **{"train.max_steps": 2}), "--tasks", "rte"])
    assert code == 0
    err = capsys.readouterr().err
    assert re.search(r"GLUE tasks: +100%\|[^|]*\| 1/1 ", err)
    assert re.search(r"finetune rte: +100%\|[^|]*\| 2/2 ", err)
    assert re.search(r"eval: +0%\|[^|]*\| 0/[1-9]\d* ", err)
