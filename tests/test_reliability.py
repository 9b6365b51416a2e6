"""Reliability promises of issue 5 at the level of whole runs: non-finite steps are
skipped and bounded, a corrupt latest checkpoint falls back to the previous one, and
two processes resume exactly with identical replicas."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import bert_recipes.pretrain as pretrain_module
from bert_recipes.cli import main
from bert_recipes.modeling import BertPreTrainingObjective

from .conftest import REPO, TINY_RECIPE, tiny_overrides


def records(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def poison(monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None):
    """Make the objective return a NaN MLM loss on the given training forward calls (1-based)."""
    calls = {"n": 0}

    class Poisoned(BertPreTrainingObjective):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if self.training:
                calls["n"] += 1
                if (bad_calls and calls["n"] in bad_calls) or (from_call and calls["n"] >= from_call):
                    out["mlm_loss_sum"] = out["mlm_loss_sum"] * float("nan")
            return out

    monkeypatch.setattr(pretrain_module, "BertPreTrainingObjective", Poisoned)


def test_nonfinite_steps_are_skipped(tmp_path, monkeypatch):
    poison(monkeypatch, bad_calls={2, 3})
    run = tmp_path / "run"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run, **{"train.save_steps": 3})]) == 0
    logged = records(run)
    assert math.isnan(float(logged[2]["loss"])) and math.isnan(float(logged[3]["loss"]))
    assert math.isfinite(logged[4]["loss"])
    assert logged[6]["skipped_steps"] == 2
    state = json.loads((run / "checkpoints" / "checkpoint-00000003" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 2
    for name, tensor in load_file(run / "final" / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name


def test_too_many_nonfinite_steps_stop_the_run(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, from_call=3)
    run = tmp_path / "run"
    code = main(["pretrain", str(TINY_RECIPE),
                 *tiny_overrides(run, **{"train.save_steps": 2, "train.max_consecutive_nonfinite_steps": 2})])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: train.max_consecutive_nonfinite_steps: 3 consecutive steps")
    assert not (run / "final").exists()
    # the checkpoint written before the failure is intact and finite
    ckpt = run / "checkpoints" / "checkpoint-00000002"
    assert (ckpt / "manifest.json").is_file()
    for name, tensor in load_file(ckpt / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    run = tmp_path / "run"
    args = tiny_overrides(run, **{"train.save_steps": 2, "train.max_steps": 6, "train.save_total_limit": 3})
    assert main(["pretrain", str(TINY_RECIPE), *args]) == 0
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000006"]
    weights = ckpts / "checkpoint-00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a crash mid-write
    (ckpts / ".tmp-checkpoint-00000008").mkdir()  # an unfinished save is never picked
    shutil.rmtree(run / "final")
    with caplog.at_level(logging.INFO, logger="bert_recipes"):
        assert main(["pretrain", str(TINY_RECIPE), *args, "resume_from=latest", "train.max_steps=8"]) == 0
    assert "skipping checkpoint" in caplog.text and "model.safetensors is truncated" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-00000004" in caplog.text
    assert max(records(run)) == 8
    # pruning keeps the newest complete checkpoints
    assert "checkpoint-00000008" in {p.name for p in ckpts.iterdir()}


def test_explicit_resume_path_must_be_complete(tmp_path, capsys):
    bad = tmp_path / "checkpoint-00000001"
    bad.mkdir()
    run = tmp_path / "run"
    assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(run), f"resume_from={bad}"]) == 2
    assert "is not a complete checkpoint: no manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path, sample_tokenizer):
    """2 gloo ranks: a run resumed from its step-5 checkpoint reproduces steps 6..10 bit for
    bit, and the replicas hold identical parameters at the end."""
    tokenizer = tmp_path / "tokenizer"
    sample_tokenizer.save_pretrained(tokenizer)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bert_recipes",
              "pretrain", str(TINY_RECIPE)]
    reference = tmp_path / "reference"
    extra = {"train.max_steps": 10, "train.save_steps": 5, "train.save_total_limit": 5,
             "tokenizer.name_or_path": str(tokenizer), "train.eval_steps": 0}
    done = subprocess.run([*launch, *tiny_overrides(reference, **extra), "resume_from=latest"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in done.stderr
    assert done.stderr.count("yet; starting from step 0") == 1  # said once, not per rank
    expected = records(reference)

    crashed = tmp_path / "crashed"  # what a crash right after step 5's checkpoint leaves behind
    crashed.mkdir()
    shutil.copytree(reference / "tokenizer", crashed / "tokenizer")
    shutil.copytree(reference / "checkpoints" / "checkpoint-00000005", crashed / "checkpoints" / "checkpoint-00000005")
    done = subprocess.run([*launch, *tiny_overrides(crashed, **extra), "resume_from=latest"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = records(crashed)
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for step in range(6, 11):
        for key in ("loss", "mlm_loss", "nsp_loss", "lr"):
            assert resumed[step][key] == expected[step][key], (step, key)


CHILD = """
import signal, sys, time
from bert_recipes.training.signals import stop_with_launcher
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").write("SIGTERM"), sys.exit(0)))
print(stop_with_launcher(), flush=True)
time.sleep(60)
"""
LAUNCHER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); time.sleep(60)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_rank_whose_launcher_is_killed_gets_sigterm(tmp_path):
    """torchrun starts each rank in a session of its own: after a `kill -9` of `accelerate
    launch` the ranks trained on as orphans holding the run's lock (found by a helper). A rank
    now asks for SIGTERM (its checkpoint-and-stop signal) when its launcher dies; outside a
    launcher it asks nothing."""
    from bert_recipes.training.signals import stop_with_launcher

    assert "TORCHELASTIC_RUN_ID" in os.environ or stop_with_launcher() is False
    flag = tmp_path / "flag"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, str(flag)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "True"  # the rank has made its request
        launcher.kill()
        launcher.wait(timeout=10)
        for _ in range(100):
            if flag.exists() and flag.read_text():
                break
            time.sleep(0.1)
        assert flag.read_text() == "SIGTERM"
    finally:
        launcher.kill()


def test_leftovers_of_a_killed_save_are_cleared_at_the_next_save(tmp_path):
    """A kill during a save left .tmp-checkpoint-N for good, outside save_total_limit (found
    by a helper); a checkpoint set aside by swap_in is restored when it is the only copy."""
    from bert_recipes.training.checkpoint import clear_leftovers

    root = tmp_path / "checkpoints"
    for name in (".tmp-checkpoint-00000003", ".checkpoint-00000002.old", ".checkpoint-00000001.old", "checkpoint-00000001"):
        (root / name).mkdir(parents=True)
        (root / name / "what").write_text(name)
    clear_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-00000001", "checkpoint-00000002"]
    assert (root / "checkpoint-00000001" / "what").read_text() == "checkpoint-00000001"
    assert (root / "checkpoint-00000002" / "what").read_text() == ".checkpoint-00000002.old"
    clear_leftovers(tmp_path / "nowhere")  # a first save: nothing there yet


def test_a_signal_repeated_at_once_is_the_same_stop_a_later_one_interrupts(monkeypatch):
    """A scheduler signalling every process of the job reaches a rank directly and through
    torchrun, milliseconds apart: that second copy took the "interrupt at once" path and the
    checkpoint was skipped (found by a helper). A repeat within REPEAT_AFTER_S is ignored; a
    later one still interrupts at once."""
    import signal as signals

    from bert_recipes.training.signals import StopRequest

    before = signals.getsignal(signals.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signals.SIGTERM)
        os.kill(os.getpid(), signals.SIGTERM)
        time.sleep(0.05)  # delivered at the next bytecode boundary
        assert stop.requested == "SIGTERM"
    os.kill(os.getpid(), signals.SIGTERM)  # a late copy, after the run stopped: still the same stop (it killed)
    time.sleep(0.05)
    signals.signal(signals.SIGTERM, before)
    monkeypatch.setattr(StopRequest, "REPEAT_AFTER_S", 0.0)
    with pytest.raises(KeyboardInterrupt):
        with StopRequest() as stop:
            os.kill(os.getpid(), signals.SIGINT)
            time.sleep(0.05)
            assert stop.requested == "SIGINT"
            os.kill(os.getpid(), signals.SIGINT)
            time.sleep(0.05)


def test_a_rank_whose_peer_stopped_says_so_in_one_line(monkeypatch, capsys):
    """When one rank stops on an error, the others' collectives fail with gloo's "Connection
    closed by peer": a page of traceback after the real one-line error (found by a helper)."""
    import bert_recipes.cli as cli

    def collective(_args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")

    monkeypatch.setitem(cli.COMMANDS, "pretrain", collective)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["pretrain", str(TINY_RECIPE)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: another process of this run stopped (its error, if it printed one, is above); rank 1 "
                          "stops too: ")
    assert err.count("\n") == 1
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, the same error is a bug: its traceback
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main(["pretrain", str(TINY_RECIPE)])


PID1_LAUNCHER = ("import os, subprocess, sys; assert os.getpid() == 1; "
                 "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)")
RANK = ("import time; from bert_recipes.training.signals import stop_with_launcher; "
        "assert stop_with_launcher(); time.sleep(0.5); print('trained')")


def test_a_launcher_that_is_pid_1_is_alive(tmp_path):
    """In a container whose command is the launcher (Docker ENTRYPOINT, a Kubernetes
    PyTorchJob) the launcher is PID 1: a rank took its parent's PID 1 for "the launcher died"
    and killed itself at start (found by a helper)."""
    import shutil

    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run([unshare, "-p", "-f", "--mount-proc", "true"], capture_output=True)
    if not probe or probe.returncode != 0:
        pytest.skip("unshare -p (a PID namespace) is not available here")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": str(REPO)}
    done = subprocess.run([unshare, "-p", "-f", "--mount-proc", sys.executable, "-c", PID1_LAUNCHER, RANK], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "trained", done.stderr[-2000:]


def test_a_checkpoint_set_aside_by_an_interrupted_swap_is_found_by_resume(tmp_path):
    """A kill between swap_in's two renames leaves checkpoint N only as .checkpoint-N.old:
    resume_from=latest ignored it (and with overwrite retrained from step 0, deleting it:
    found by a helper)."""
    from bert_recipes.training.checkpoint import list_checkpoints

    root = tmp_path / "checkpoints"
    for name in ("checkpoint-00000010", ".checkpoint-00000020.old", ".checkpoint-00000010.old", ".tmp-checkpoint-00000030"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-00000010", ".checkpoint-00000020.old"]


def test_under_a_launcher_inspect_is_refused_and_other_ranks_log_warnings_only(monkeypatch, capsys, tmp_path):
    """inspect under accelerate launch wrote rank 0's batches from every rank into one file;
    every rank repeated the run's set-up lines (found by a helper)."""
    import logging as logs

    import bert_recipes.cli as cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["inspect", str(TINY_RECIPE), "--out", str(tmp_path / "b.jsonl")]) == 2
    assert capsys.readouterr().err == ("error: inspect runs in one process, not under accelerate launch / torchrun: run "
                                       "it alone with --rank R --world-size 2 to see what rank R trains on\n")
    assert logs.getLogger("bert_recipes").level == logs.WARNING  # set by main on rank 1
    monkeypatch.setenv("WORLD_SIZE", "abc")  # not a number: one process (it was a traceback)
    from bert_recipes.training.accelerator import launched_processes

    assert launched_processes() == 1
    monkeypatch.setenv("RANK", "0")
    cli._setup_logging()
    assert logs.getLogger("bert_recipes").level == logs.INFO
