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
                                  "column 'text'")


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
    assert error_line(capsys) == (f"error: {key}: local folder '{value}' not found (expected an export folder with "
                                  "config.json, e.g. runs/tiny/final from `make pretrain`, or a Hub id such as "
                                  "google-bert/bert-base-uncased)")
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
