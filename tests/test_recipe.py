"""Recipe loading: base inheritance, overrides, strict validation with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bert_recipes.errors import RecipeError
from bert_recipes.recipe import PretrainRecipe, dump_recipe, expand_files, load_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_pretraining_recipe_validates():
    for path in sorted((REPO / "recipes" / "pretrain").glob("*.yaml")):
        recipe = load_recipe(path)
        assert isinstance(recipe, PretrainRecipe)
        assert recipe.data.max_predictions_per_seq <= recipe.data.max_seq_length - 3


def test_published_bert_hyperparameters():
    base = load_recipe(REPO / "recipes/pretrain/bert-base-phase1.yaml")
    assert (base.model.config.hidden_size, base.model.config.num_hidden_layers, base.model.config.num_attention_heads) == (768, 12, 12)
    assert (base.train.learning_rate, base.train.warmup_steps, base.train.weight_decay) == (1e-4, 10000, 0.01)
    assert (base.data.max_seq_length, base.data.max_predictions_per_seq) == (128, 20)
    phase2 = load_recipe(REPO / "recipes/pretrain/bert-base-phase2.yaml")
    assert (phase2.data.max_seq_length, phase2.data.max_predictions_per_seq) == (512, 80)
    assert phase2.model.name_or_path == "runs/bert-base-phase1/final"
    assert phase2.train.learning_rate == 1e-4  # inherited through base:
    large = load_recipe(REPO / "recipes/pretrain/bert-large-phase1.yaml")
    assert (large.model.config.hidden_size, large.model.config.num_hidden_layers, large.model.config.num_attention_heads) == (1024, 24, 16)


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "seed: 1\ndata:\n  train_files: [a.txt]\n  max_seq_length: 64\ntrain:\n  max_steps: 5\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ndata:\n  max_seq_length: 32\n")
    recipe = load_recipe(child, ["train.max_steps=20", "data.train_files=[x.txt,y.txt]", "output_dir=/tmp/run", "precision=bf16"])
    assert recipe.seed == 1
    assert recipe.data.max_seq_length == 32
    assert recipe.data.train_files == ["x.txt", "y.txt"]
    assert recipe.train.max_steps == 20
    assert recipe.output_dir == "/tmp/run"
    assert recipe.precision == "bf16"
    # the resolved recipe round-trips through YAML
    again = write(tmp_path, "resolved.yaml", dump_recipe(recipe))
    assert load_recipe(again) == recipe


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("data: {train_files: [a]}\ntrain: {max_step: 3}\n", [], "unknown key 'train.max_step'; did you mean 'train.max_steps'?"),
        ("data: {train_files: [a], max_seq_lenght: 64}\ntrain: {max_steps: 3}\n", [], "did you mean 'data.max_seq_length'?"),
        ("data: {train_files: [a]}\ntrain: {max_steps: many}\n", [], "key 'train.max_steps': Input should be a valid integer"),
        ("data: {train_files: [a], max_seq_length: 32, max_predictions_per_seq: 40}\ntrain: {max_steps: 3}\n", [],
         "data.max_predictions_per_seq (40) must be at most data.max_seq_length - 3 (29)"),
        ("data: {train_files: [a]}\nmodel: {config: {hidden_size: 100, num_attention_heads: 3}}\ntrain: {max_steps: 3}\n", [],
         "must be divisible by model.config.num_attention_heads"),
        ("data: {train_files: [a]}\n", [], "train.max_steps is required"),
        ("train: {max_steps: 3}\n", [], "data.train_files is empty"),
        ("data: {train_files: [a]}\ntrain: {max_steps: 3}\n", ["precision=fp8"], "key 'precision'"),
        ("data: {train_files: [a]}\ntrain: {max_steps: 3}\n", ["train.max_steps"], "expected key.path=value"),
        ("data: [unclosed\n", [], "invalid YAML at line"),
        ("- a list\n", [], "expected a YAML mapping"),
        # found by a helper: each passed validation, then crashed or trained to NaN
        ("data: {train_files: [a]}\ntrain: {max_steps: 3}\n", ["seed=-1"], "key 'seed': Input should be greater than"),
        ("data: {train_files: [a]}\ntrain: {max_steps: 3}\n", ["seed=4294967296"], "key 'seed': Input should be less"),
        ("data: {train_files: [a]}\ntrain: {max_steps: 3}\n", ["train.learning_rate=.inf"], "should be a finite number"),
        ("data: {train_files: [a]}\ntrain:\n  max_steps: 3\n  max_steps: 5\n", [],
         "invalid YAML at line 4, column 3: duplicate key 'max_steps' (first at line 3)"),
    ],
)
def test_bad_recipes_give_one_line_errors(tmp_path, text, overrides, message):
    path = write(tmp_path, "r.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert message in str(info.value)
    assert str(path) in str(info.value) or "override" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_recipe_and_base_cycle(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="inheritance cycle"):
        load_recipe(tmp_path / "a.yaml")
    child = write(tmp_path, "child.yaml", "base: missing.yaml\n")
    with pytest.raises(RecipeError) as error:  # the error names the recipe that points at the missing base
        load_recipe(child)
    assert str(error.value) == f"{child}: base 'missing.yaml': {tmp_path / 'missing.yaml'}: recipe file not found"


def test_expand_files(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    assert expand_files([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")], "k") == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    with pytest.raises(RecipeError, match=r"data.train_files: pattern '.*\*.md' matched no files"):
        expand_files([str(tmp_path / "*.md")], "data.train_files")
    with pytest.raises(RecipeError, match="data.eval_files: file '.*missing.txt' not found"):
        expand_files([str(tmp_path / "missing.txt")], "data.eval_files")
    with pytest.raises(RecipeError, match="is a directory"):
        expand_files([str(tmp_path)], "data.train_files")


def test_safe_loading(tmp_path):
    """Promise 7: YAML is read with safe_load (no Python objects), and remote code is off by default."""
    evil = write(tmp_path, "evil.yaml", "seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(evil)
    recipe = load_recipe(REPO / "recipes/pretrain/tiny.yaml")
    assert recipe.model.trust_remote_code is False


def test_exponent_numbers_are_numbers_in_overrides_and_files(tmp_path):
    tiny = REPO / "recipes/pretrain/tiny.yaml"
    recipe = load_recipe(tiny, ["train.max_steps=1e3", "train.learning_rate=2e-5", "train.warmup_ratio=1.0e-1"])
    assert (recipe.train.max_steps, recipe.train.learning_rate, recipe.train.warmup_ratio) == (1000, 2e-5, 0.1)
    assert load_recipe(tiny, ["output_dir=runs/1e3"]).output_dir == "runs/1e3"  # not a number: a string
    with pytest.raises(RecipeError, match=r"^override 'train.max_steps=1.5e0': key 'train.max_steps': "):
        load_recipe(tiny, ["train.max_steps=1.5e0"])
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {tiny}\ntrain:\n  max_steps: 2e2\n  learning_rate: 5e-4\n")
    recipe = load_recipe(child)
    assert (recipe.train.max_steps, recipe.train.learning_rate) == (200, 5e-4)


def test_an_empty_override_of_a_required_key_names_the_override():
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "recipes/pretrain/tiny.yaml", ["train.max_steps="])
    assert str(info.value) == "override 'train.max_steps=': train.max_steps is required for pretraining (a positive integer)"


@pytest.mark.parametrize("override, key", [("train.learning_rate=true", "train.learning_rate"),
                                           ("data.max_train_samples=false", "data.max_train_samples")])
def test_a_number_key_refuses_a_boolean(override, key, capsys):
    """pydantic reads true/false as 1/0 for numbers (a helper's model.hidden_dropout_prob=false
    became dropout 0.0): refused in one line naming the key; boolean and literal keys still
    take booleans (data.packing=true)."""
    from bert_recipes.cli import main

    from .conftest import REPO

    recipe = REPO / "recipes" / ("glue/sample.yaml" if "max_train" in key else "pretrain/tiny.yaml")
    assert main(["show", str(recipe), override]) == 2
    err = capsys.readouterr().err.strip()
    assert f"key '{key}': expected a number (got " in err and "\n" not in err, err
    assert main(["show", str(REPO / "recipes" / "pretrain" / "tiny.yaml"), "data.packing=true", "data.whole_word_mask=true"]) == 0


def test_a_yaml_merge_key_may_be_overridden_but_a_key_not_given_twice(tmp_path):
    from bert_recipes.recipe_files import parse_yaml

    assert parse_yaml("a: &x {b: 1, c: 2}\nd:\n  <<: *x\n  b: 3\n") == {"a": {"b": 1, "c": 2}, "d": {"b": 3, "c": 2}}
    nested = "defs:\n  base: &base {a: 1, b: 2}\n  mid: &mid\n    <<: *base\n    b: 3\ntop:\n  <<: *mid\n"
    assert parse_yaml(nested)["defs"]["mid"] == {"a": 1, "b": 3}  # a merge inside a merged mapping (found by a helper)
    for twice in ("d:\n  b: 1\n  c: 2\n  b: 3\n", "x: {a: 1, a: 2}\n", "l: [{a: 1, a: 2}]\n"):
        with pytest.raises(Exception, match="duplicate key '[ab]'"):
            parse_yaml(twice)


def test_glue_seeds_are_what_the_rngs_take():
    from bert_recipes.glue.recipe import FinetuneRecipe

    with pytest.raises(ValueError, match=r"seeds must be between 0 and 2\*\*32 - 1, got \[1, -1\]"):
        FinetuneRecipe(task="rte", seeds=[1, -1], model={"name_or_path": "m"})
    assert FinetuneRecipe(task="rte", seeds=[0, 2**32 - 1], model={"name_or_path": "m"}).seeds == [0, 2**32 - 1]
