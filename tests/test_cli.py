"""The command line: one-line errors with exit code 2, inspect, show, recipes, tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from bert_recipes.cli import main

from .conftest import REPO, SAMPLE_TRAIN, TINY_RECIPE


def run_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_user_errors_are_one_line(capsys, tmp_path):
    assert "recipe file not found" in run_error(capsys, ["pretrain", str(tmp_path / "none.yaml")])
    err = run_error(capsys, ["pretrain", str(TINY_RECIPE), "train.max_step=3"])
    assert "unknown key 'train.max_step'; did you mean 'train.max_steps'?" in err
    err = run_error(capsys, ["pretrain", str(TINY_RECIPE), f"output_dir={tmp_path}/o", f"data.train_files=[{tmp_path}/*.txt]"])
    assert "data.train_files: pattern" in err and "matched no files" in err
    assert not (tmp_path / "o" / "final").exists()
    err = run_error(capsys, ["pretrain", str(TINY_RECIPE), "data.max_predictions_per_seq=200"])
    assert "max_predictions_per_seq (200)" in err
    # the wrong kind of file for the command
    rte, ddp = REPO / "recipes" / "glue" / "rte.yaml", REPO / "recipes" / "accelerate" / "ddp.yaml"
    assert run_error(capsys, ["pretrain", str(rte)]) == (
        f"error: {rte}: a GLUE fine-tuning recipe (it has task/data.glue_dir); run it with `bert-recipes finetune {rte}`")
    assert run_error(capsys, ["finetune", str(TINY_RECIPE)]) == (
        f"error: {TINY_RECIPE}: a pretraining recipe (it has data.train_files/model.config); run it with "
        f"`bert-recipes pretrain {TINY_RECIPE}`")
    assert run_error(capsys, ["pretrain", str(ddp)]).startswith(f"error: {ddp}: an Accelerate launch config, not a recipe")
    # judged on the file: fine-tuning overrides on the command line do not hide it
    assert run_error(capsys, ["finetune", str(TINY_RECIPE), "data.glue_dir=glue", "model.name_or_path=m"]) == (
        f"error: {TINY_RECIPE}: a pretraining recipe (it has data.train_files/model.config); run it with "
        f"`bert-recipes pretrain {TINY_RECIPE}`")


def test_no_traceback_from_the_installed_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train_files: [x]\n")
    done = subprocess.run([sys.executable, "-m", "bert_recipes", "pretrain", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith(f"error: {bad}: invalid YAML at line")


def test_inspect_writes_readable_batches(tmp_path):
    seen = {}
    vocab = tmp_path / "tok"  # one vocabulary for both (WordPiece training is not bit-reproducible)
    assert main(["tokenizer", "train", *sorted(map(str, (REPO / "data/sample/train").glob("*.txt"))), "--out", str(vocab),
                 "--vocab-size", "2000"]) == 0
    for packing in ("false", "batch"):  # padded rows; the default: each batch packed into rows
        out = tmp_path / f"batches-{packing}.jsonl"
        assert main(["inspect", str(TINY_RECIPE), "train.per_device_train_batch_size=4", f"output_dir={tmp_path}/run",
                     f"data.packing={packing}", f"tokenizer.name_or_path={vocab}", "--batches", "3",
                     "--out", str(out)]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 12 and [r["batch"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
        for row in rows:
            assert set(row) >= {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label", "tokens"}
            assert row["tokens"][0] == "[CLS]" and row["tokens"].count("[SEP]") == 2
            assert len(row["tokens"]) == len(row["input_ids"]) == len(row["labels"])
            assert len(row["input_ids"]) % 8 == 0 if packing == "false" else all(row["attention_mask"])
            assert row["next_sentence_label"] in (0, 1)
        seen[packing] = [[t for t, m in zip(r["input_ids"], r["attention_mask"]) if m] for r in rows]
    assert seen["false"] == seen["batch"]  # the same instances in the same batches
    assert not (tmp_path / "run").exists()  # inspect writes nothing into the run directory


def test_show_prints_the_resolved_recipe(capsys):
    assert main(["show", str(TINY_RECIPE), "train.max_steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["max_steps"] == 7
    assert shown["data"]["masked_lm_prob"] == 0.15  # defaults are filled in


def test_overrides_may_follow_the_options(capsys):
    glue_base = REPO / "recipes" / "glue" / "base.yaml"
    assert main(["show", str(glue_base), "train.max_steps=5", "--kind", "finetune", "task=rte", "train.max_steps=9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["task"], shown["train"]["max_steps"]) == ("rte", 9)  # in command-line order: the last one wins
    with pytest.raises(SystemExit) as exit_info:
        main(["show", str(TINY_RECIPE), "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_recipes_lists_shipped_files(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("pretrain/tiny.yaml", "pretrain/mini.yaml", "pretrain/bert-base-phase1.yaml", "pretrain/bert-large-phase2.yaml"):
        assert name in out
    for line in out.splitlines():  # whole first sentences, or a visible cut
        assert line.endswith((".", " ...")), line


def test_tokenizer_train(tmp_path, capsys):
    assert main(["tokenizer", "train", *SAMPLE_TRAIN, "--out", str(tmp_path / "tok"), "--vocab-size", "600"]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 600
    encoded = tok("the bakery opens early", "it rains")
    assert encoded["token_type_ids"][-1] == 1


def test_help_lists_recipe_keys(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "data.max_predictions_per_seq" in out and "train.gradient_accumulation_steps" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "default:" in line}
    assert rows["precision"].split()[1:] == ["auto|no|bf16|fp16", "default:", "auto"]  # the allowed values
    assert rows["train.max_steps"].split()[1:] == ["int", "|", "null", "default:", "null"]
    assert len({line.index("default:") for line in rows.values()}) == 1  # one column, nested keys too
    for command, key in (("finetune", "data.glue_dir"), ("glue", "train.learning_rate")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert key in capsys.readouterr().out


def test_inspect_rank_of_world_size_and_text_view(tmp_path):
    common = [str(TINY_RECIPE), "train.per_device_train_batch_size=4", f"output_dir={tmp_path}/run", "--batches", "2"]
    outs = []
    for rank in (0, 1):
        out = tmp_path / f"rank{rank}.jsonl"
        assert main(["inspect", *common, "--rank", str(rank), "--world-size", "2", "--out", str(out)]) == 0
        outs.append([json.loads(line)["input_ids"] for line in out.read_text().splitlines()])
    assert len(outs[0]) == len(outs[1]) == 8 and outs[0] != outs[1]  # each rank its own documents
    text = tmp_path / "batches.txt"
    assert main(["inspect", *common, "--text", "--out", str(text)]) == 0
    lines = text.read_text().splitlines()
    assert len(lines) == 8
    for line in lines:
        label, a, b = line.split(" | ")
        assert label in ("IsNext", "RandomNext") and a.startswith("A: ") and b.startswith("B: ")
        assert "[CLS]" not in line and "[SEP]" not in line and "[PAD]" not in line
    assert "[MASK](" in text.read_text()
    assert main(["inspect", *common, "--rank", "2", "--world-size", "2", "--out", str(text)]) == 2


def test_readable_example_shows_masked_words_with_their_originals():
    from bert_recipes.inspect_batches import readable_example
    from tests.data_fixtures import make_vocab_tokenizer

    tok = make_vocab_tokenizer(extra_words=["walk", "##ing", "the", "dog"])
    ids = tok.convert_tokens_to_ids(["[CLS]", "the", "[MASK]", "##ing", "[SEP]", "dog", ".", "[SEP]"])
    labels = [-100, -100, tok.convert_tokens_to_ids("walk"), -100, -100, tok.convert_tokens_to_ids("the"), -100, -100]
    ids[5] = tok.convert_tokens_to_ids("dog")  # a 10% "random" replacement: shown(original)
    line = readable_example(tok, ids, [0, 0, 0, 0, 0, 1, 1, 1], labels, 1)
    assert line == "RandomNext | A: the [MASK](walk)ing | B: dog(the) ."
    ids[3] = tok.mask_token_id  # a masked piece glues to its word, by its original token
    labels[3] = tok.convert_tokens_to_ids("##ing")
    line = readable_example(tok, ids, [0, 0, 0, 0, 0, 1, 1, 1], labels, 0)
    assert line == "IsNext | A: the [MASK](walk)[MASK](ing) | B: dog(the) ."


def test_inspect_cuts_packed_rows_into_instances(tmp_path):
    out = tmp_path / "packed.jsonl"
    assert main(["inspect", str(TINY_RECIPE), "train.per_device_train_batch_size=4", f"output_dir={tmp_path}/run",
                 "data.packing=true", "data.short_seq_prob=1.0", "--batches", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > 12  # more instances than rows
    for row in rows:
        assert row["tokens"][0] == "[CLS]" and row["tokens"][-1] == "[SEP]" and row["tokens"].count("[SEP]") == 2
        assert row["next_sentence_label"] in (0, 1) and len(row["labels"]) == len(row["input_ids"])


def test_recipe_descriptions_end_at_the_first_sentence_not_an_abbreviation(tmp_path):
    from bert_recipes.cli import _about

    recipe = tmp_path / "r.yaml"
    recipe.write_text("# The selection of Devlin et al. 2019 (Sec. 4.1, e.g. lr 2e-5): batch 32. Second sentence.\n"
                      "# More.\ntask: rte\n")
    assert _about(recipe) == "The selection of Devlin et al. 2019 (Sec. 4.1, e.g. lr 2e-5): batch 32."


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_vocabulary_is_trained_on_the_text_of_records_and_compressed_files(tmp_path):
    """JSON Lines, parquet and gzipped text were read as raw bytes by the WordPiece trainer
    (braces, keys, gzip bytes in the vocabulary; found by a helper): now as the data reader
    reads them, so each gives the vocabulary of the plain text."""
    import gzip

    import pandas as pd
    from transformers import AutoTokenizer

    text = "\n".join(open(f, encoding="utf-8").read() for f in SAMPLE_TRAIN)
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    (tmp_path / "c.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as handle:
        for i, paragraph in enumerate(paragraphs):
            handle.write(json.dumps({"id": i, "body": paragraph}) + "\n")
    pd.DataFrame({"body": paragraphs}).to_parquet(tmp_path / "c.parquet")
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n\n".join(paragraphs) + "\n")
    vocab = {}
    for name in ("c.txt", "c.jsonl", "c.parquet", "c.txt.gz"):
        out = tmp_path / f"tok-{name}"
        assert main(["tokenizer", "train", str(tmp_path / name), "--out", str(out), "--vocab-size", "400",
                     "--text-column", "body"]) == 0
        vocab[name] = set(AutoTokenizer.from_pretrained(out).get_vocab())
        assert not {"{", "}", "body", "id"} & vocab[name], name
        assert all(token.isascii() for token in vocab[name]), name
    assert all(len(vocab[name] & vocab["c.txt"]) > 0.9 * len(vocab["c.txt"]) for name in vocab)


def test_tokenizer_train_and_inspect_never_replace_files_they_did_not_write(tmp_path, capsys, checkpoint):
    """tokenizer train --out <a model folder> replaced its tokenizer; inspect --out <any file>
    replaced it (model weights included); found by a helper."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    train = ["tokenizer", "train", *SAMPLE_TRAIN, "--vocab-size", "300"]
    assert main([*train, "--out", str(model)]) == 2
    assert "holds a model (config.json)" in _one_error(capsys)
    assert main([*train, "--out", str(model), "--overwrite"]) == 2
    assert "holds a model (config.json)" in _one_error(capsys)
    assert main([*train, "--out", str(model / "model.safetensors")]) == 2
    assert "exists and is not a folder" in _one_error(capsys)
    assert main([*train, "--out", str(tmp_path / "tok"), "--vocab-size", "0"]) == 2
    assert _one_error(capsys) == "error: --vocab-size: expected more than the 5 special tokens, got 0"
    assert main([*train, "--out", str(tmp_path / "tok")]) == 0
    assert main([*train, "--out", str(tmp_path / "tok")]) == 2
    assert "is not empty; add --overwrite" in _one_error(capsys)
    assert main([*train, "--out", str(tmp_path / "tok"), "--overwrite"]) == 0
    inspect = ["inspect", str(TINY_RECIPE), "train.per_device_train_batch_size=2", f"output_dir={tmp_path}/run",
               f"tokenizer.name_or_path={tmp_path / 'tok'}", "--batches", "1"]
    assert main([*inspect, "--out", str(model / "model.safetensors")]) == 2
    assert "exists and is not an earlier inspect output" in _one_error(capsys)
    assert main([*inspect, "--out", str(model)]) == 2
    assert "is a folder" in _one_error(capsys)
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    for text in ([], ["--text"]):  # an earlier inspect output is replaced, as before
        out = tmp_path / f"batches{len(text)}.txt"
        assert main([*inspect, *text, "--out", str(out)]) == 0
        assert main([*inspect, *text, "--out", str(out)]) == 0


def test_inspect_shows_what_pretrain_would_train_on(tmp_path):
    """inspect used the run folder's saved tokenizer over tokenizer.name_or_path and read
    with no DataLoader workers (other shards than training's with 2 workers; found by a
    helper): now the recipe's tokenizer, and its workers."""
    from bert_recipes.data.loader import build_pretraining_dataloader, stop_workers
    from bert_recipes.recipe import load_recipe
    from bert_recipes.tokenizer import load_tokenizer

    tok, stale = tmp_path / "tok", tmp_path / "run" / "tokenizer"
    assert main(["tokenizer", "train", *SAMPLE_TRAIN, "--out", str(tok), "--vocab-size", "800"]) == 0
    assert main(["tokenizer", "train", *SAMPLE_TRAIN, "--out", str(stale), "--vocab-size", "300"]) == 0
    overrides = ["train.per_device_train_batch_size=4", f"output_dir={tmp_path / 'run'}", f"tokenizer.name_or_path={tok}",
                 "data.dataloader_num_workers=2", "data.packing=false"]
    out = tmp_path / "b.jsonl"
    assert main(["inspect", str(TINY_RECIPE), *overrides, "--batches", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    recipe = load_recipe(TINY_RECIPE, overrides)
    loader = build_pretraining_dataloader(recipe.data, load_tokenizer(str(tok)), SAMPLE_TRAIN, batch_size=4,
                                          seed=recipe.seed)
    batches, expected = iter(loader), []
    try:
        for _, batch in zip(range(2), batches):
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
                expected.append([t for t, m in zip(ids, mask) if m])
    finally:
        stop_workers(batches)
    assert max(max(r["input_ids"]) for r in rows) >= 300  # the 800-token vocabulary, not the stale 300
    assert [r["input_ids"][: sum(r["attention_mask"])] for r in rows] == expected  # 2 workers' batches


def test_a_lowercase_setting_a_loaded_tokenizer_ignores_is_named(tmp_path, caplog):
    """tokenizer.lowercase=false with tokenizer.name_or_path lower-cased silently (found by a
    helper): one warning saying the loaded tokenizer keeps its own setting."""
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", *SAMPLE_TRAIN, "--out", str(tok), "--vocab-size", "300"]) == 0
    caplog.set_level("WARNING", logger="bert_recipes")
    base = ["inspect", str(TINY_RECIPE), f"tokenizer.name_or_path={tok}", f"output_dir={tmp_path / 'run'}",
            "--batches", "1", "--out", str(tmp_path / "b.jsonl")]
    assert main([*base, "tokenizer.lowercase=true"]) == 0
    assert not [r for r in caplog.records if "tokenizer.lowercase" in r.getMessage()]
    assert main([*base, "tokenizer.lowercase=false"]) == 0
    warned = [r.getMessage() for r in caplog.records if "tokenizer.lowercase" in r.getMessage()]
    assert warned == [f"tokenizer.lowercase: False is not applied: the tokenizer of tokenizer.name_or_path '{tok}' "
                      "lower-cases (its own setting); train one (no tokenizer.name_or_path) to choose"]


def test_glue_help_after_overrides(capsys):
    """`bert-recipes glue RECIPE key=value --help` said 'unrecognized arguments: --help'."""
    with pytest.raises(SystemExit) as done:
        main(["glue", str(REPO / "recipes" / "glue" / "base.yaml"), "model.name_or_path=x", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: bert-recipes glue")


def test_tokenizer_train_never_writes_into_a_run_and_reads_bad_records_in_one_line(tmp_path, capsys):
    """A run's tokenizer/ replaced by `tokenizer train --overwrite` made a resume go on with
    other token ids; a JSON Lines file whose column changes type before a bad line ended in
    datasets' traceback (found by a helper)."""
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / "recipe.yaml").write_text("seed: 1\n")
    train = ["tokenizer", "train", *SAMPLE_TRAIN, "--vocab-size", "300", "--overwrite"]
    for out in (run, run / "tokenizer"):
        assert main([*train, "--out", str(out)]) == 2
        assert _one_error(capsys).startswith(f"error: --out: '{out}' belongs to a run, whose checkpoints were trained")
    assert sorted(p.name for p in run.rglob("*")) == ["recipe.yaml", "tokenizer"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello world."}\n{"text": 5}\nnot json\n')
    assert main(["tokenizer", "train", str(bad), "--out", str(tmp_path / "tok")]) == 2
    assert _one_error(capsys).startswith(f"error: files: cannot read {bad} as json: ")
