"""``precision: auto`` resolution on faked devices (bert_recipes.training.precision)."""

from __future__ import annotations

import json

import pytest

from bert_recipes.training.precision import cpu_flags, precision_by_step, record_precision, resolve_precision


@pytest.mark.parametrize("device, cuda_bf16, flags, expected", [
    ("cuda", True, None, "bf16"),           # Ampere or newer
    ("cuda", False, None, "no"),            # V100/T4: fp32, never fp16 automatically
    ("cpu", None, {"avx2", "avx512_bf16"}, "bf16"),
    ("cpu", None, {"avx2", "amx_tile", "amx_bf16"}, "bf16"),
    ("cpu", None, {"avx2", "avx512f"}, "no"),
    ("mps", None, None, "no"),
])
def test_auto_picks_bf16_only_where_it_is_fast(device, cuda_bf16, flags, expected):
    assert resolve_precision("auto", device, cuda_bf16=cuda_bf16, flags=flags) == expected


@pytest.mark.parametrize("explicit", ["no", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(explicit):
    assert resolve_precision(explicit, "cpu", flags=set()) == explicit
    assert resolve_precision(explicit, "cuda", cuda_bf16=False) == explicit


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()


def test_glue_and_mini_recipes_default_to_auto_and_tiny_pins_fp32():
    from pathlib import Path

    from bert_recipes.glue.recipe import load_finetune_recipe
    from bert_recipes.recipe import load_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    assert {load_finetune_recipe(recipes / "glue" / f"{task}.yaml").precision for task in ("sst2", "rte", "stsb")} == {"auto"}
    assert load_recipe(recipes / "pretrain" / "mini.yaml").precision == "auto"
    assert load_recipe(recipes / "pretrain" / "tiny.yaml").precision == "no"


def test_one_process_runs_one_run_after_another_at_another_precision(tmp_path):
    """A glue sweep's next task (or a test) at another precision than the run before it in the
    same process: Accelerate would refuse the new mixed_precision; make_accelerator starts it."""
    from bert_recipes.recipe import load_recipe
    from bert_recipes.training.accelerator import make_accelerator

    from .conftest import TINY_RECIPE, fp32_accelerator, tiny_overrides

    assert fp32_accelerator().mixed_precision == "no"
    for precision in ("bf16", "no", "bf16"):
        recipe = load_recipe(TINY_RECIPE, tiny_overrides(tmp_path / precision, precision=precision))
        assert make_accelerator(recipe).mixed_precision == precision


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_a_new_precision_under_fsdp_is_refused_and_deepspeed_keeps_its_state(monkeypatch, kind):
    """FSDP's plugin is only set up with a fresh process state: a second run at another
    precision is refused in one line (it crashed inside Accelerate after a reset). DeepSpeed
    records "no" for every precision and keeps its own: its state is left alone."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from bert_recipes.errors import UserError
    from bert_recipes.training.accelerator import _allow_precision

    shared = {"_mixed_precision": "no", "distributed_type": DistributedType(kind)}
    monkeypatch.setattr(AcceleratorState, "_shared_state", shared)
    if kind == "FSDP":
        with pytest.raises(UserError, match=r"^precision: bf16 after a run at no in this process; under FSDP"):
            _allow_precision("bf16")
    else:
        _allow_precision("bf16")
    _allow_precision("no")  # the same precision: nothing to do
    assert shared == {"_mixed_precision": "no", "distributed_type": DistributedType(kind)}


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(tmp_path, capsys, checkpoint):
    """Accelerate trains a CPU run in fp32 when asked for fp16 (and logs fp16): refused in one
    line by the preflight, for pretraining and fine-tuning, with nothing written."""
    from bert_recipes.cli import main

    from .conftest import TINY_RECIPE, tiny_overrides
    from .test_finetune import GLUE_RECIPES, overrides

    commands = [["pretrain", str(TINY_RECIPE), *tiny_overrides(tmp_path / "pre", precision="fp16")],
                ["finetune", str(GLUE_RECIPES / "sample.yaml"), *overrides(checkpoint, tmp_path / "ft", precision="fp16")]]
    for command in commands:
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: precision: fp16 needs a GPU") and "\n" not in err, err
    assert not (tmp_path / "pre").exists() and not (tmp_path / "ft").exists()


def test_precision_by_step_names_each_precision_with_its_steps():
    """The trainer state's notes (record_precision) -> the model card's words."""
    extra = {}
    record_precision(extra, 0, "no")
    record_precision(extra, 40, "no")  # a resume in the same precision adds nothing
    assert extra["precision_steps"] == [[1, "no"]]
    assert precision_by_step(extra, "no", 100) == "no"
    record_precision(extra, 100, "bf16")
    assert extra["precision_steps"] == [[1, "no"], [101, "bf16"]]
    assert precision_by_step(extra, "bf16", 250) == "no for steps 1-100, bf16 for steps 101-250"
    assert precision_by_step(extra, "bf16", 100) == "no"  # the best checkpoint came before the change
    assert precision_by_step({}, "bf16", 7) == "bf16"  # no notes (a run that never trained here)
    older = {"precision_steps": [[31, "bf16"]]}  # resumed from a checkpoint written before notes were kept
    assert precision_by_step(older, "bf16", 60) == "not recorded for steps 1-30, bf16 for steps 31-60"


def test_a_resume_in_another_precision_is_on_the_model_card(tmp_path):
    """Precision may change on resume; the export's card then says which steps ran in which
    (it named only the last one), and the checkpoint's state keeps the notes."""
    from bert_recipes.cli import main

    from .conftest import TINY_RECIPE, tiny_overrides

    run = tmp_path / "run"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"train.max_steps": 3}), "precision=no"]) == 0
    assert "precision no, seed" in (run / "final" / "README.md").read_text()
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"train.max_steps": 5}), "precision=bf16",
                 "resume_from=latest"]) == 0
    card = (run / "final" / "README.md").read_text()
    assert "precision no for steps 1-3, bf16 for steps 4-5 (recipe: bf16), seed" in card
    state = max((run / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert json.loads(state.read_text())["extra"]["precision_steps"] == [[1, "no"], [4, "bf16"]]
