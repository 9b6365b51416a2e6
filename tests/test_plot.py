"""``bert-recipes plot RUN_DIR``: PNG curves from metrics.jsonl, for pretraining and fine-tuning runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bert_recipes.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run / "metrics.jsonl").write_text(text)
    return run


def pretraining_records(steps: int = 6) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        records.append({
            "step": step, "loss": 7.0 - 0.1 * step, "mlm_loss": 6.3 - 0.1 * step, "nsp_loss": 0.7,
            "mlm_accuracy": 0.01 * step, "nsp_accuracy": 0.5, "tokens_per_s": 1000.0 + step, "sequences_per_s": 15.0,
            "lr": 1e-3 * (1 - step / steps), "grad_norm": "nan" if step == 2 else 1.5, "skipped_steps": 0,
        })
        if step % 3 == 0:
            records.append({"step": step, "eval_mlm_loss": 6.0, "eval_nsp_loss": 0.69, "eval_mlm_accuracy": 0.02,
                            "eval_nsp_accuracy": 0.55, "eval_perplexity": 403.4, "eval_sequences": 16})
    return records


def finetuning_records() -> list[dict]:
    return [
        {"step": 1, "epoch": 0.5, "loss": 0.69, "samples_per_s": 40.0, "tokens_per_s": 900.0, "lr": 2e-5, "grad_norm": 3.0},
        {"step": 2, "epoch": 1.0, "loss": 0.60, "samples_per_s": 41.0, "tokens_per_s": 910.0, "lr": 1e-5, "grad_norm": 2.0},
        {"step": 2, "epoch": 1.0, "eval_accuracy": 0.71, "eval_f1": 0.80, "eval_loss": 0.58, "eval_runtime_s": 0.3},
    ]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_pretraining_curves(tmp_path, capsys):
    run = write_metrics(tmp_path / "run", pretraining_records(), tail='{"step": 7, "loss": 6.')  # a killed run's last line
    assert main(["plot", str(run)]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    names = {p.name for p in written}
    assert {"loss.png", "accuracy.png", "lr.png", "throughput.png", "perplexity.png", "grad_norm.png"} <= names
    assert "eval_metrics.png" not in names  # pretraining evals are all losses, accuracies or perplexity
    for path in written:
        assert path.parent == run / "plots"
        assert_png(path)


def test_series_keeps_eval_points_and_last_value_per_step():
    from bert_recipes.plot import series

    records = pretraining_records() + [{"step": 6, "loss": 1.0}]  # a resumed run logs step 6 again
    data = series(records)
    assert data["eval_mlm_accuracy"] == ([3, 6], [0.02, 0.02])
    assert data["loss"][0] == [1, 2, 3, 4, 5, 6] and data["loss"][1][-1] == 1.0
    assert str(data["grad_norm"][1][1]) == "nan"  # non-finite values, written as strings, stay gaps


def test_finetuning_curves_to_out_dir(tmp_path):
    run = write_metrics(tmp_path / "ft", finetuning_records())
    out = tmp_path / "figures"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy.png", "eval_metrics.png", "grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    for name in names:
        assert_png(out / name)


@pytest.mark.parametrize("case", ["missing_dir", "missing_file", "empty_file"])
def test_plot_errors_are_one_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing_dir":
        run.mkdir()
    if case == "empty_file":
        (run / "metrics.jsonl").write_text("")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(run) in err
    assert not (run / "plots").exists()
