"""Bad input through the real command: a one-line error and exit code 2, or a run that
trains and warns with counts. Nothing here may end in a traceback."""

from __future__ import annotations

import logging

import pytest

from bert_recipes.cli import main

from .conftest import REPO, SAMPLE_TRAIN, TINY_RECIPE, tiny_overrides


def pretrain(tmp_path, files, *extra, **overrides) -> int:
    listed = "[" + ",".join(str(f) for f in files) + "]"
    values = {"train.max_steps": 2, "data.eval_files": "[]", "data.train_files": listed,
              "tokenizer.train_files": "[" + ",".join(SAMPLE_TRAIN) + "]", **overrides}
    return main(["pretrain", str(TINY_RECIPE), *tiny_overrides(tmp_path / "run", **values), *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_empty_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert pretrain(tmp_path, [empty]) == 2
    assert error_line(capsys) == f"error: data.train_files: all 1 file(s) are empty (e.g. {empty})"


@pytest.mark.parametrize("workers", [0, 1])
def test_files_with_only_blank_lines(tmp_path, capsys, workers):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n\n")
    assert pretrain(tmp_path, [blank], **{"data.dataloader_num_workers": workers}) == 2
    err = error_line(capsys)  # also from inside a DataLoader worker
    assert err.startswith("error: data.train_files: ") and "no text" in err


def test_invalid_regex_and_missing_jsonl_column(tmp_path, capsys):
    assert pretrain(tmp_path, SAMPLE_TRAIN, **{"data.document_start_regex": "'(unclosed'"}) == 2
    assert "data.document_start_regex: invalid regular expression" in error_line(capsys)
    records = tmp_path / "docs.jsonl"
    records.write_text('{"body": "One sentence here. Another one there."}\n')
    assert pretrain(tmp_path, [records], **{"data.document_split": "record"}) == 2
    assert "data.text_column: column 'text' not found" in error_line(capsys)


def test_a_bad_jsonl_record_is_named_by_its_line(tmp_path, capsys):
    records = tmp_path / "docs.jsonl"
    good = [f'{{"text": "Record {i} has a sentence. It has a second one too."}}' for i in range(6)]
    records.write_text("\n".join([*good[:3], "", '{"text": "unterminated', *good[3:]]) + "\n")  # line 5 is bad
    assert pretrain(tmp_path, [records], **{"data.document_split": "record"}) == 2
    assert error_line(capsys) == (f"error: data.text_column: line 5 of {records} is not a JSON object with "
                                  "text (a string) in column 'text'")


def test_a_text_column_that_is_not_text_is_refused(tmp_path, capsys):
    """A list or a number in the text column was trained on as its repr ('[UNK] ' a b c . '')
    or as "0", "1", ... (found by a helper)."""
    import pandas as pd

    records = tmp_path / "docs.jsonl"
    good = [f'{{"text": "Record {i} has a sentence. It has a second one too."}}' for i in range(6)]
    records.write_text("\n".join([*good[:2], '{"text": ["a list.", "of sentences."]}', *good[2:]]) + "\n")
    assert pretrain(tmp_path, [records], **{"data.document_split": "record"}) == 2
    assert error_line(capsys) == (f"error: data.text_column: line 3 of {records} is not a JSON object with "
                                  "text (a string) in column 'text'")
    table = tmp_path / "docs.parquet"
    pd.DataFrame({"id": list(range(8)), "text": [f"Row {i} is here. And more." for i in range(8)]}).to_parquet(table)
    assert pretrain(tmp_path, [table], **{"data.text_column": "id"}) == 2
    assert error_line(capsys) == (f"error: data.text_column: column 'id' of {table} holds int64 values, expected "
                                  "text (strings); point data.text_column at the text column")


def test_non_utf8_bytes_and_a_megabyte_line_train(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9 au lait is warm. The caf\xe9 opens early.\n\nA second document. It has two sentences.\n".encode("latin-1"))
    long_line = tmp_path / "long.txt"
    long_line.write_text(" ".join(["the river bends near the mill and the water runs fast ."] * 20000) + "\n")
    assert long_line.stat().st_size > 1_000_000
    assert pretrain(tmp_path, [bad, long_line]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_single_sentence_documents_warn_and_a_one_document_corpus_is_refused(tmp_path, caplog, capsys):
    singles = tmp_path / "singles.txt"
    singles.write_text("\n\n".join(f"Document {i} has exactly one sentence about topic {i}." for i in range(12)) + "\n")
    with caplog.at_level(logging.WARNING, logger="bert_recipes"):
        assert pretrain(tmp_path, [singles, *SAMPLE_TRAIN[:1]], **{"data.shuffle_buffer_size": 0, "train.max_steps": 40}) == 0
    assert "have a single sentence" in caplog.text and "every instance from them is random-next" in caplog.text
    caplog.clear()
    capsys.readouterr()
    one = tmp_path / "one.txt"
    one.write_text(" ".join(f"Sentence number {i} talks about the harbour." for i in range(60)) + "\n")
    assert pretrain(tmp_path / "b", [one], **{"data.document_split": "file"}) == 2
    assert "data.train_files: the corpus is one document, so next-sentence prediction" in error_line(capsys)
    assert not (tmp_path / "b" / "run" / "checkpoints").exists()


@pytest.mark.parametrize("command,key,value", [
    ("finetune", "model.name_or_path", "runs/nothere"),  # 'runs' exists: a path, not a Hub id
    ("finetune", "model.name_or_path", "./nothere"),
    ("pretrain", "model.name_or_path", "/no/such/bert"),
    ("pretrain", "tokenizer.name_or_path", "~/no-such-tokenizer"),
])
def test_a_missing_local_model_folder_fails_at_once(tmp_path, capsys, monkeypatch, command, key, value):
    """No Hub round trip (a minute of retries when the Hub is unreachable) and nothing written."""
    import huggingface_hub

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the Hub was asked"))
    recipe = REPO / "recipes" / ("glue/sample.yaml" if command == "finetune" else "pretrain/tiny.yaml")
    assert main([command, str(recipe), f"output_dir={tmp_path / 'out'}", f"{key}={value}"]) == 2
    expected = ("a tokenizer folder with tokenizer.json or vocab.txt, e.g. runs/tiny/tokenizer" if "tokenizer" in key
                else "an export folder with config.json, e.g. runs/tiny/final from `make pretrain`")
    assert error_line(capsys) == (f"error: {key}: local folder '{value}' not found (expected {expected}, or a Hub id "
                                  "such as google-bert/bert-base-uncased)")
    assert not (tmp_path / "out").exists()


def test_bad_data_is_refused_before_overwrite_deletes_the_old_run(tmp_path, capsys):
    """tiny.yaml has overwrite: true; a data mistake must fail in the preflight, not after
    the old run is gone."""
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-00000002").mkdir(parents=True)
    (run / "final").mkdir()
    (run / "final" / "model.safetensors").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "recipe.yaml").write_text("seed: 1\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    one = tmp_path / "one.txt"
    one.write_text(" ".join(f"Sentence {i} about the harbour." for i in range(40)) + "\n")
    for extra in ({"data.train_files": f"[{one}]", "data.document_split": "file"},
                  {"data.eval_files": f"[{one}]", "data.document_split": "file"},
                  {"data.index_cache_dir": str(one)}):  # a file, not a folder
        values = {"data.train_files": "[" + ",".join(SAMPLE_TRAIN) + "]", **extra}
        assert pretrain(tmp_path, [], **values) == 2
        err = error_line(capsys)
        assert err.startswith(("error: data.train_files: the corpus is one document", "error: data.eval_files: the corpus",
                               "error: data.index_cache_dir: cannot write")), err
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
        assert (run / "final" / "model.safetensors").read_bytes() == b"weights"


def _finished(tmp_path, name="old") -> tuple:
    """A folder that looks like a finished run, and a snapshot of it."""
    run = tmp_path / name
    (run / "best").mkdir(parents=True)
    (run / "best" / "model.safetensors").write_bytes(b"weights")
    (run / "results.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run, {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_damaged_inputs_are_refused_before_overwrite_deletes_anything(tmp_path, capsys, checkpoint):
    """overwrite=true deleted the old run, then the model's weights, its tokenizer or a GLUE
    dev/test file failed to load (found by a helper): each is now a one-line error first."""
    import shutil

    from .test_finetune import FIXTURES

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_vocab = tmp_path / "no-vocab"
    shutil.copytree(checkpoint, no_vocab)
    for name in ("vocab.txt", "tokenizer.json"):
        (no_vocab / name).unlink(missing_ok=True)
    no_dev = tmp_path / "glue"
    shutil.copytree(FIXTURES / "RTE", no_dev / "RTE")
    (no_dev / "RTE" / "dev.tsv").unlink()
    no_test = tmp_path / "glue-no-test"
    shutil.copytree(FIXTURES / "RTE", no_test / "RTE")
    (no_test / "RTE" / "test.tsv").unlink()
    run, before = _finished(tmp_path)
    cases = [
        ([f"model.name_or_path={truncated}"], f"error: model.name_or_path: cannot read the weights '{weights}' ("),
        ([f"model.name_or_path={no_vocab}"], f"error: model.name_or_path '{no_vocab}': the tokenizer has only its "),
        ([f"data.glue_dir={no_dev}"], f"error: {no_dev / 'RTE' / 'dev.tsv'}: GLUE rte validation file not found"),
        ([f"data.glue_dir={no_test}", "predict_test=true"], f"error: {no_test / 'RTE' / 'test.tsv'}: GLUE rte test file"),
    ]
    for extra, start in cases:
        args = [f"model.name_or_path={checkpoint}", f"data.glue_dir={FIXTURES}", *extra]
        assert main(["finetune", str(REPO / "recipes" / "glue" / "rte.yaml"), f"output_dir={run}", "overwrite=true",
                     *args]) == 2
        err = error_line(capsys)
        assert err.startswith(start), (err, start)
        assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # pretraining from the damaged checkpoint, or with a tokenizer folder without a vocabulary
    for key, value, start in [("model.name_or_path", truncated, "error: model.name_or_path: cannot read the weights"),
                              ("tokenizer.name_or_path", no_vocab, "error: tokenizer.name_or_path '")]:
        overrides = {key: value, "train.max_steps": 2, "data.max_seq_length": 32}
        assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **overrides)]) == 2  # tiny.yaml: overwrite
        err = error_line(capsys)
        assert err.startswith(start), err
        assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_the_model_it_reads_is_never_the_output_dir(tmp_path, capsys, checkpoint, command):
    """output_dir=<the model folder> without overwrite wrote the run's recipe.yaml, tokenizer
    and checkpoints into the export it read (found by a helper): refused, nothing written."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    before = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    recipe = REPO / "recipes" / ("glue/sample.yaml" if command == "finetune" else "pretrain/tiny.yaml")
    assert main([command, str(recipe), f"model.name_or_path={model}", f"output_dir={model}", "overwrite=false",
                 "train.max_steps=2"]) == 2
    assert error_line(capsys) == (f"error: output_dir: '{model}' is the model.name_or_path this run reads; its "
                                  "recipe.yaml, tokenizer and checkpoints would be written into it: choose another "
                                  "output_dir")
    assert {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_binary_files_and_save_to_disk_folders_are_refused(tmp_path, capsys):
    """An image or an Arrow file in the glob, or UTF-16 text, was trained on as text (found
    by a helper); a save_to_disk folder was only 'a directory'."""
    png = tmp_path / "loss.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    utf16 = tmp_path / "book.txt"
    utf16.write_text("A sentence in UTF-16. Another one.\n", encoding="utf-16")
    for path in (png, utf16):
        assert pretrain(tmp_path, [*SAMPLE_TRAIN, path]) == 2
        assert error_line(capsys) == (f"error: data.train_files: '{path}' is not UTF-8 text (NUL bytes: a binary file, "
                                      "or UTF-16 text?); expected text, JSON Lines or parquet files")
    saved = tmp_path / "hfds"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(tmp_path / "run", **{"data.train_files": f"[{saved}]"})]) == 2
    assert error_line(capsys).startswith(f"error: data.train_files: '{saved}' is a datasets save_to_disk folder; "
                                         "export it as files (dataset.to_parquet(")


def test_a_tokenizer_larger_than_the_models_embeddings_is_refused(tmp_path, capsys, checkpoint):
    """finetune with another model's tokenizer ended in an IndexError traceback mid-run (found
    by a helper): one line before anything is written."""
    from bert_recipes.modeling import load_config

    from transformers import AutoTokenizer

    big = tmp_path / "big-tok"  # the checkpoint's tokenizer and 50 more words: ids past its embeddings
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_tokens([f"newword{i}" for i in range(50)])
    tokenizer.save_pretrained(big)
    size, vocab = len(AutoTokenizer.from_pretrained(big)), load_config(str(checkpoint)).vocab_size
    assert size > vocab
    out = tmp_path / "out"
    assert main(["finetune", str(REPO / "recipes" / "glue" / "sample.yaml"), f"model.name_or_path={checkpoint}",
                 f"tokenizer_name_or_path={big}", f"output_dir={out}"]) == 2
    assert error_line(capsys) == (f"error: tokenizer_name_or_path: the tokenizer has {size} tokens but the model's "
                                  f"embeddings {vocab} (model.name_or_path '{checkpoint}'): use the model's own tokenizer "
                                  "(remove tokenizer_name_or_path) or the one it was trained with")
    assert not out.exists()


def test_a_model_too_large_for_memory_is_one_line(tmp_path, capsys):
    """model.config.max_position_embeddings=1e12 ended in torch's allocator traceback (found by
    a helper)."""
    assert pretrain(tmp_path, SAMPLE_TRAIN, **{"model.config.max_position_embeddings": 10**12}) == 2
    err = error_line(capsys)
    assert err.startswith("error: out of host memory (") and "can't allocate memory" in err, err


def test_a_device_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    from bert_recipes import pretrain as pretrain_module

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pretrain_module, "train", full)
    assert pretrain(tmp_path, SAMPLE_TRAIN) == 2
    assert error_line(capsys).startswith("error: out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB)")


def test_a_truncated_pytorch_model_bin_is_refused_before_overwrite(tmp_path, capsys, checkpoint):
    """check_weight_files let a truncated torch.save archive through (found by a helper)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "bin-model"
    shutil.copytree(checkpoint, model)
    weights = model / "pytorch_model.bin"
    torch.save(load_file(model / "model.safetensors"), weights)
    (model / "model.safetensors").unlink()
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run, before = _finished(tmp_path)
    assert main(["finetune", str(REPO / "recipes" / "glue" / "sample.yaml"), f"model.name_or_path={model}",
                 f"output_dir={run}", "overwrite=true"]) == 2
    assert error_line(capsys).startswith(f"error: model.name_or_path: cannot read the weights '{weights}' (")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_compressed_corpus_says_once_that_it_is_streamed(tmp_path, caplog):
    """The preflight and the stream both logged 'streaming front to back' (found by a helper)."""
    import gzip

    corpus = tmp_path / "corpus.txt.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(open(path, encoding="utf-8").read() for path in SAMPLE_TRAIN))
    caplog.set_level("INFO", logger="bert_recipes")
    assert pretrain(tmp_path, [corpus]) == 0
    said = [r.getMessage() for r in caplog.records if "streaming front to back" in r.getMessage()]
    assert len(said) == 1 and str(corpus) in said[0], said
