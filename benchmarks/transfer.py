"""Does our pretraining transfer? A pretraining export against the same architecture from
random initialisation, fine-tuned with one fixed GLUE protocol. Writes JSON.

    python benchmarks/transfer.py --model runs/mini/final --glue-dir ../shared/data/glue \
        [--tasks sst2,mrpc,stsb] [--seeds 1,2,3] [--jobs 2] [--out-dir runs/transfer] \
        [train.max_steps=300 train.learning_rate=1e-4 ...]

Both arms run ``bert-recipes glue recipes/glue/fixed.yaml`` (one configuration for every
task, no selection on dev, as Cramming compares pretraining runs) with the same overrides
and seeds. The random arm is ``BertForPreTraining(config)`` of the export's own config,
saved with the export's tokenizer (seeded, ``--init-seed``), so the only difference is the
weights. Per task it reports the dev score (the task's leaderboard entry: MRPC the mean of
F1 and accuracy, STS-B of Pearson and Spearman, x100) of each seed, and the paired
difference pretrained - random with its mean and sample std over seeds; and, to explain a
difference, how spread out each encoder's pooled [CLS] and token vectors are before
fine-tuning (:func:`representation_spread`) and what a logistic regression on its frozen
features reaches on ``--probe-task`` (:func:`linear_probe`). The two arms run as
``--jobs`` parallel processes, each with ``OMP_NUM_THREADS = cores / jobs``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine_info, write_json  # noqa: E402


def random_init_copy(export: Path, out: Path, seed: int) -> Path:
    """``out``: the export's config and tokenizer with freshly initialised weights."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertForPreTraining

    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(export)
    torch.manual_seed(seed)
    BertForPreTraining(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(export).save_pretrained(out)
    return out


def per_seed_scores(root: Path, task: str) -> dict[int, float]:
    """``{seed: dev score x100}`` of one task of a finished fixed-protocol GLUE run."""
    from bert_recipes.glue.metrics import task_score

    scores = {}
    for path in sorted((root / task).glob("**/seed-*/results.json")):
        result = json.loads(path.read_text())
        scores[int(result["seed"])] = 100 * statistics.fmean(task_score(task, result["dev"]))
    return scores


class FrozenEncoder:
    """An export's ``BertModel`` and tokenizer, loaded once, run without gradients on GLUE rows."""

    def __init__(self, model_dir: Path, task: str, glue_dir: Path):
        from transformers import AutoTokenizer, BertModel

        from bert_recipes.glue.data import load_glue_split
        from bert_recipes.glue.tasks import get_task

        self.spec, self.glue_dir, self.load_split = get_task(task), glue_dir, load_glue_split
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = BertModel.from_pretrained(model_dir).eval()

    def rows(self, split: str, n: int | None = None):
        rows = self.load_split(self.spec, split, self.glue_dir)
        return rows.select(range(min(n, len(rows)))) if n else rows

    def outputs(self, rows, batch_size: int = 128):
        """``(pooled [CLS] [N, H], mean token vector [N, H], every real token's vector [T, H])``, float32."""
        import torch

        pooled, mean, tokens = [], [], []
        for start in range(0, len(rows), batch_size):
            part = rows.select(range(start, min(start + batch_size, len(rows))))
            batch = self.tokenizer(*[list(part[c]) for c in self.spec.text_columns], padding=True, truncation=True,
                                   max_length=128, return_tensors="pt")
            with torch.no_grad():
                out = self.model(**batch)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled.append(out.pooler_output)
            mean.append((out.last_hidden_state * mask).sum(1) / mask.sum(1))
            tokens.append(out.last_hidden_state[batch["attention_mask"].bool()])
        return torch.cat(pooled), torch.cat(mean), torch.cat(tokens)


def representation_spread(encoder: FrozenEncoder, n: int = 256) -> dict:
    """What an encoder hands the classifier before fine-tuning, on ``n`` dev examples of its
    task: :func:`spread` of the pooled [CLS] vectors (one per example) and of the last layer's
    vectors of every real token (1.0 mean cosine: every input looks the same, a collapsed encoder)."""
    pooled, _, tokens = encoder.outputs(encoder.rows(encoder.spec.dev_splits[0], n))
    return {"examples": n, "cls": spread(pooled.double()), "tokens": spread(tokens.double())}


def linear_probe(encoder: FrozenEncoder, n_train: int = 2000) -> dict:
    """Dev accuracy of a logistic regression on frozen features of ``n_train`` training
    examples of a classification task: the mean of the last layer's token vectors, and the
    pooled [CLS]. Separates what the encoder knows from what 300 fine-tuning steps make of it."""
    from sklearn.linear_model import LogisticRegression

    train, dev = encoder.rows("train", n_train), encoder.rows(encoder.spec.dev_splits[0])
    (train_cls, train_mean, _), (dev_cls, dev_mean, _) = encoder.outputs(train), encoder.outputs(dev)
    probe = {}
    for name, x_train, x_dev in (("mean_tokens", train_mean, dev_mean), ("cls", train_cls, dev_cls)):
        classifier = LogisticRegression(max_iter=2000).fit(x_train.numpy(), list(train["label"]))
        probe[name] = float(classifier.score(x_dev.numpy(), list(dev["label"])))
    return {"train_examples": len(train), "dev_examples": len(dev), **probe}


def spread(vectors) -> dict:
    """Mean cosine similarity between different rows of ``vectors`` [N, H] and the share of
    their variance on the first principal component."""
    import torch

    n = vectors.shape[0]
    unit = torch.nn.functional.normalize(vectors, dim=1)
    cosine = ((unit @ unit.T).sum() - n) / (n * (n - 1))
    variances = torch.linalg.svdvals(vectors - vectors.mean(0)) ** 2
    return {"mean_cosine": float(cosine), "top_component_share": float(variances[0] / variances.sum())}


def run_arms(arms: dict[str, Path], args, overrides: list[str]) -> dict[str, float]:
    """Run the fixed protocol on each arm, ``args.jobs`` at a time; wall seconds per arm."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    seeds = "[" + ", ".join(str(s) for s in args.seeds) + "]"
    pending, running, wall = list(arms.items()), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name, model = pending.pop(0)
            command = [sys.executable, "-m", "bert_recipes", "glue", str(REPO / "recipes/glue/fixed.yaml"),
                       "--tasks", ",".join(args.tasks), f"model.name_or_path={model}", f"data.glue_dir={args.glue_dir}",
                       f"output_dir={args.out_dir / name}", f"seeds={seeds}", "resume_from=latest", *overrides]
            log = open(args.out_dir / f"{name}.log", "a")
            running[name] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(), log)
            print(f"{name}: started ({threads} thread(s)); log {args.out_dir / name}.log", flush=True)
        for name, (process, started, log) in list(running.items()):
            if process.poll() is not None:
                log.close(), running.pop(name)
                wall[name] = time.perf_counter() - started
                if process.returncode:
                    raise SystemExit(f"error: the {name} arm failed (exit {process.returncode}); see {args.out_dir / name}.log")
        time.sleep(2)
    return wall


def compare(arms: dict[str, Path], args) -> dict:
    tasks = {}
    for task in args.tasks:
        scores = {name: per_seed_scores(args.out_dir / name, task) for name in arms}
        seeds = sorted(set(scores["pretrained"]) & set(scores["random"]))
        diffs = [scores["pretrained"][s] - scores["random"][s] for s in seeds]
        tasks[task] = {
            "seeds": seeds,
            **{name: {"per_seed": [scores[name][s] for s in seeds], "mean": statistics.fmean(scores[name][s] for s in seeds)}
               for name in arms},
            "difference": {"per_seed": diffs, "mean": statistics.fmean(diffs),
                           "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0},
        }
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a pretraining export (runs/<name>/final)")
    parser.add_argument("--glue-dir", type=Path, required=True)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=["sst2", "mrpc", "stsb"])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="arms run in parallel")
    parser.add_argument("--init-seed", type=int, default=0)
    parser.add_argument("--probe-task", default="sst2", help="a classification task for the frozen-feature probe")
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "transfer")
    parser.add_argument("--out", default=None, help="JSON path (default: OUT_DIR/transfer.json)")
    args, overrides = parser.parse_known_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: --model: '{args.model}' is not a pretraining export (no config.json)")
    if not args.glue_dir.is_dir():
        raise SystemExit(f"error: --glue-dir: '{args.glue_dir}' is not a folder")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    arms = {"pretrained": args.model.resolve(), "random": random_init_copy(args.model, args.out_dir / "random-init", args.init_seed)}
    spreads = {name: representation_spread(FrozenEncoder(path, args.tasks[0], args.glue_dir)) for name, path in arms.items()}
    for name, v in spreads.items():
        print(f"{name} before fine-tuning, {args.tasks[0]} dev: " + "; ".join(
            f"{kind} mean cosine {v[kind]['mean_cosine']:.3f}, top component {v[kind]['top_component_share']:.2f}"
            for kind in ("cls", "tokens")))
    probes = {name: linear_probe(FrozenEncoder(path, args.probe_task, args.glue_dir)) for name, path in arms.items()}
    for name, v in probes.items():
        print(f"{name} linear probe on {args.probe_task} ({v['train_examples']} train examples), dev accuracy: "
              f"mean tokens {v['mean_tokens']:.3f}, [CLS] {v['cls']:.3f}")
    wall = run_arms(arms, args, overrides)
    tasks = compare(arms, args)
    print(f"{'task':6} {'pretrained':>22} {'random init':>22} {'difference (mean +- std)':>26}")
    for task, row in tasks.items():
        cells = [", ".join(f"{v:.1f}" for v in row[name]["per_seed"]) for name in arms]
        diff = row["difference"]
        print(f"{task:6} {cells[0]:>22} {cells[1]:>22} {diff['mean']:>+18.1f} +- {diff['std']:.1f}")
    record = {"model": str(args.model), "tasks": tasks, "representation_before_finetuning": spreads,
              "linear_probe": probes, "seeds": args.seeds, "overrides": overrides,
              "protocol": "recipes/glue/fixed.yaml", "wall_s": wall, "machine": machine_info()}
    print("wrote", write_json(args.out or args.out_dir / "transfer.json", record))


if __name__ == "__main__":
    main()
