"""The one training loop (bert_recipes.training.loop): its host syncs per optimizer step, and
a stopped run's outcome."""

from __future__ import annotations

import itertools
import math
import signal
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertForPreTraining

from bert_recipes.modeling import BertPreTrainingObjective
from bert_recipes.pretrain_job import PretrainJob
from bert_recipes.recipe import load_recipe
from bert_recipes.training.checkpoint import TrainerState
from bert_recipes.training.loop import Run, train
from bert_recipes.training.optim import build_optimizer, build_scheduler
from bert_recipes.training.signals import RunStopped

from .conftest import TINY_RECIPE, fp32_accelerator, tiny_overrides

# Per optimizer step off the logging/eval/save steps: the loop reads nothing on the host (a
# non-finite step is skipped on the device by fused AdamW's found_inf; the gradient norm and
# the skip counts wait for the next logging step; a stop request is a host flag). The sparse
# MLM head gathers the collator's masked_lm_positions (no `nonzero`). What is left is
# transformers' own SDPA check for padding (`attention_mask.all()`, which picks the mask-free
# kernel for an unpadded batch), once per padded micro-batch; a packed batch passes its
# block-diagonal mask and makes none.
LOOP_SYNCS_PER_STEP = 0
FORWARD_SYNCS_PER_MICRO_BATCH = {"padded": 1, "packed": 0}
PYTHON_READS = ("tolist", "numpy", "cpu")  # reads that never reach the dispatcher on a CPU tensor


class HostSyncs(TorchDispatchMode):
    """Counts what makes the host wait for the device: scalar reads (item, float, int, bool:
    ``_local_scalar_dense``), data-dependent shapes (``nonzero``, boolean-mask indexing,
    ``masked_select``) and, patched in :func:`counting_host_syncs`, ``tolist``/``numpy``/``cpu``."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.constants = 0  # torch.tensor(value, device=...): on a GPU a copy from the host that waits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        self.constants += func is aten.lift_fresh.default
        boolean_index = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if boolean_index or func in (aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


class Records:
    """A Reporter that keeps the records in memory."""

    def __init__(self):
        self.records, self.lines = [], []

    def log(self, record, step):
        self.records.append({"step": step, **record})

    def advance(self, n=1, **postfix):
        pass

    def close(self):
        pass

    def write(self, line):
        self.lines.append(line)


def random_batches(vocab: int, batch: int = 4, length: int = 24, seed: int = 0, packed: bool = False):
    """Batches as the collators lay them out (plain, or two instances per row when ``packed``)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        input_ids = torch.randint(5, vocab, (batch, length), generator=generator)
        labels = torch.full_like(input_ids, -100)
        labels[:, 1:4] = input_ids[:, 1:4]
        out = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
               "attention_mask": torch.ones_like(input_ids), "labels": labels,
               "masked_lm_positions": (torch.arange(batch)[:, None] * length + torch.arange(1, 4)).flatten()}
        half = length // 2
        if packed:
            out.update(position_ids=torch.arange(length).remainder(half).repeat(batch, 1),
                       segment_ids=(torch.arange(length) // half + 1).repeat(batch, 1),
                       cls_index=torch.arange(2 * batch) * half)
        instances = 2 * batch if packed else batch
        out["next_sentence_label"] = torch.randint(0, 2, (instances,), generator=generator)
        yield out


def tiny_run(tmp_path: Path, packed: bool = False, **train_overrides):
    overrides = {"train.gradient_accumulation_steps": 2, "train.logging_steps": 1000, **train_overrides}
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tmp_path / "run", **overrides))
    accelerator = fp32_accelerator()
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64))
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, recipe.train.max_steps)
    objective, optimizer = accelerator.prepare(BertPreTrainingObjective(model), optimizer)
    run = Run(accelerator, objective, optimizer, scheduler, recipe, tmp_path / "run", TrainerState(), Records())
    job = PretrainJob(recipe, random_batches(100, packed=packed), accelerator.device, recipe.train.max_steps, model.config)
    return run, job


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_host_syncs_per_optimizer_step_off_logging_steps(tmp_path, monkeypatch, layout):
    """Every host sync between the starts of consecutive optimizer steps of a 2-micro-batch
    window, counted at the dispatcher: steps 1..4 do not log (logging_steps 1000), step 5
    is the last and logs. The loop's own share is none."""
    run, job = tiny_run(tmp_path, packed=layout == "packed", **{"train.max_steps": 5})
    mode, python_reads = HostSyncs(), []
    for name in PYTHON_READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            mode.count += 1
            python_reads.append((len(at_window), _name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    at_window, constants = [], []
    window = job.window

    def windowed(step):
        at_window.append(mode.count)
        batches = window(step)  # the data (built on the host) is not the step's
        constants.append(mode.constants)
        return batches

    job.window = windowed
    with mode:
        train(job, run)
    monkeypatch.undo()

    micro_batches = run.recipe.train.gradient_accumulation_steps
    per_step = [b - a for a, b in itertools.pairwise(at_window)]  # steps 1..4, none of them logs
    expected = LOOP_SYNCS_PER_STEP + FORWARD_SYNCS_PER_MICRO_BATCH[layout] * micro_batches
    assert per_step == [expected] * 4 == [2 if layout == "padded" else 0] * 4
    assert [name for step, name in python_reads if 1 <= step <= 4] == []  # the loop's own reads
    # no host-made constants either: counts are made on the device (torch.full), none copied from the host
    assert [b - a for a, b in itertools.pairwise(constants)] == [0] * 4
    assert [r["step"] for r in run.reporter.records] == [5]  # the last step logs: its reads are allowed
    assert run.state.step == 5 and run.state.skipped_steps == 0
    assert math.isfinite(run.reporter.records[0]["grad_norm"]) and run.reporter.records[0]["grad_norm"] > 0


def test_a_nonfinite_step_is_skipped_on_the_device(tmp_path):
    """A NaN loss at step 2 of 4 (no logging before step 4): fused AdamW's found_inf leaves
    the weights and the optimizer state exactly as a step that was never taken, and the
    logging step reads the skip count and the warning."""
    run, job = tiny_run(tmp_path, **{"train.max_steps": 4, "train.gradient_accumulation_steps": 1})
    forward, calls, snapshots = job.forward, {"n": 0}, {}

    def poisoned(model, batch):
        calls["n"] += 1
        out = forward(model, batch)
        if calls["n"] == 2:
            snapshots["before"] = [p.detach().clone() for p in model.parameters()]
            snapshots["steps"] = [s["step"].clone() for s in run.optimizer.optimizer.state.values()]
            out["mlm_loss_sum"] = out["mlm_loss_sum"] * float("nan")
        if calls["n"] == 3:  # step 3 starts from the weights step 1 left
            snapshots["after"] = [p.detach().clone() for p in model.parameters()]
            snapshots["steps_after"] = [s["step"].clone() for s in run.optimizer.optimizer.state.values()]
        return out

    job.forward = poisoned
    train(job, run)
    assert all(torch.equal(a, b) for a, b in zip(snapshots["before"], snapshots["after"]))
    assert [int(s) for s in snapshots["steps"]] == [int(s) for s in snapshots["steps_after"]] == [1] * len(snapshots["steps"])
    assert run.state.skipped_steps == 1 and run.state.consecutive_nonfinite == 0
    assert [r["skipped_steps"] for r in run.reporter.records] == [1]


def poison(job, bad) -> None:
    """Make the job's training forward return a NaN MLM loss on the calls (1-based) where ``bad(call)``."""
    forward, calls = job.forward, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = forward(model, batch)
        if bad(calls["n"]):
            out["mlm_loss_sum"] = out["mlm_loss_sum"] * float("nan")
        return out

    job.forward = poisoned


def test_too_many_nonfinite_steps_are_seen_at_the_next_logging_step(tmp_path):
    """NaN from step 2 on, at most 2 in a row, logging every 4 steps: the device counts, and
    the read at step 4 (3 in a row) stops the run with the one-line error."""
    from bert_recipes.errors import TrainingError

    run, job = tiny_run(tmp_path, **{"train.max_steps": 8, "train.gradient_accumulation_steps": 1,
                                     "train.logging_steps": 4, "train.max_consecutive_nonfinite_steps": 2})
    poison(job, lambda call: call >= 2)
    with pytest.raises(TrainingError, match="^train.max_consecutive_nonfinite_steps: 3 consecutive steps"):
        train(job, run)
    assert run.state.step == 4 and run.state.skipped_steps == 3 and run.reporter.records == []


def test_a_run_of_nonfinite_steps_that_recovered_before_the_read_still_stops_the_run(tmp_path):
    """NaN at steps 2-5, finite again at 6, logging at 8, at most 2 in a row: the read at step 8
    sees the longest run (4), not the current one (0), as a host read every step would."""
    from bert_recipes.errors import TrainingError

    run, job = tiny_run(tmp_path, **{"train.max_steps": 8, "train.gradient_accumulation_steps": 1,
                                     "train.logging_steps": 8, "train.max_consecutive_nonfinite_steps": 2})
    poison(job, lambda call: 2 <= call <= 5)
    with pytest.raises(TrainingError, match="^train.max_consecutive_nonfinite_steps: 4 consecutive steps"):
        train(job, run)
    assert run.state.step == 8 and run.state.skipped_steps == 4 and run.state.consecutive_nonfinite == 0


def test_a_stopped_run_saves_and_raises_run_stopped(tmp_path):
    """A signal before step 2 is seen by every rank at step 2's reduction: checkpoint 2,
    then RunStopped (the CLI turns it into exit code 128 + signal)."""
    run, job = tiny_run(tmp_path, **{"train.max_steps": 6})
    window = job.window

    def signalling(step):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return window(step)

    job.window = signalling
    with pytest.raises(RunStopped) as stopped:
        train(job, run)
    assert stopped.value.signal == "SIGTERM" and stopped.value.step == 2
    assert stopped.value.checkpoint == tmp_path / "run" / "checkpoints" / "checkpoint-00000002"
    assert (stopped.value.checkpoint / "manifest.json").is_file()
    assert "resume with resume_from=latest" in run.reporter.lines[-1]


def test_clip_divisor_matches_clip_grad_norm():
    """The divisor fused AdamW gets is the reciprocal of clip_grad_norm_'s factor: 1 below the
    limit, (norm + 1e-6) / limit above it, 1 with no limit, NaN for a NaN norm."""
    from bert_recipes.training.loop import clip_divisor

    assert float(clip_divisor(torch.tensor(0.5), 1.0)) == 1.0
    assert float(clip_divisor(torch.tensor(4.0), 1.0)) == pytest.approx(4.000001, rel=1e-7)
    assert float(clip_divisor(torch.tensor(4.0, dtype=torch.float64), 2.0)) == pytest.approx(2.0000005, rel=1e-7)
    assert float(clip_divisor(torch.tensor(1e9), float("inf"))) == 1.0
    assert math.isnan(float(clip_divisor(torch.tensor(float("nan")), 1.0)))
    assert clip_divisor(torch.tensor(3.0, dtype=torch.float64), 1.0).dtype == torch.float32


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e6])
def test_folded_clip_steps_like_clip_grad_norm_then_adamw(tmp_path, monkeypatch, max_grad_norm):
    """Three steps of the loop, the clip folded into fused AdamW's grad_scale, against the same
    three steps with clip_grad_norm_ scaling every gradient before the fused step (the loop's
    host-read path). Clipping every step (limit 1e-3): parameters within 1e-6 (the division
    rounds differently from the multiplication); never clipping (1e6): bit-identical. The
    logged gradient norms (the unclipped ones) agree."""
    import bert_recipes.training.loop as loop

    overrides = {"train.max_steps": 3, "train.gradient_accumulation_steps": 1, "train.max_grad_norm": max_grad_norm,
                 "train.logging_steps": 1}
    folded, folded_job = tiny_run(tmp_path / "folded", **overrides)
    train(folded_job, folded, checkpoint_at_end=False)
    monkeypatch.setattr(loop, "skips_on_device", lambda optimizer, model: False)
    clipped, clipped_job = tiny_run(tmp_path / "clipped", **overrides)
    train(clipped_job, clipped, checkpoint_at_end=False)

    diffs = [float((a.detach() - b.detach()).abs().max()) for a, b in zip(folded.model.parameters(), clipped.model.parameters())]
    norms = [r["grad_norm"] for r in clipped.reporter.records]
    assert [r["grad_norm"] for r in folded.reporter.records] == pytest.approx(norms, rel=1e-6)
    if max_grad_norm > 1:
        assert max(diffs) == 0.0
    else:
        assert min(norms) > max_grad_norm  # every step clipped
        assert 0.0 < max(diffs) <= 1e-6
