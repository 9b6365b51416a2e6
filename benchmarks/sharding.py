"""Bytes read per data shard, and the document index's build rate.

    .venv/bin/python benchmarks/sharding.py [--files 240] [--shards 1,4,16] [--sentence-split punkt]

Method. The Gutenberg books of ../shared/data/corpus are cut at paragraph boundaries into
``--files`` text files (about 40 KB each; Google's layout: blank lines between documents,
``document_split: blank_line``) in a temporary folder. The document index is built cold
(empty cache, 1 and 2 scanning processes) and then loaded from the cache. For every
``S`` of ``--shards`` each shard streams one pass (``infinite=False``) of its own
documents, and ``IndexedCorpus.bytes_read`` reports the bytes it asked the files for: its
own documents (``own``) and the few lines each random-next B segment needs
(``random_next``). Goal: own bytes per shard <= 1.2 x corpus / S (plus the index). The
front-to-back streaming source (Hub datasets, compressed files) reads the whole corpus in
every shard: S x corpus in all.

Prints a table and writes benchmarks/out/sharding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json  # noqa: E402


def make_corpus(source: Path, out: Path, files: int) -> list[str]:
    """Cut every book into pieces of whole paragraphs so that there are about ``files`` files."""
    books = sorted(source.glob("*.txt"))
    total = sum(p.stat().st_size for p in books)
    target = total / files
    paths, number = [], 0
    for book in books:
        paragraphs = book.read_bytes().replace(b"\r\n", b"\n").split(b"\n\n")
        piece: list[bytes] = []
        size = 0
        for paragraph in paragraphs:
            piece.append(paragraph)
            size += len(paragraph) + 2
            if size >= target:
                paths.append(_write(out / f"part-{number:04d}.txt", piece))
                number, piece, size = number + 1, [], 0
        if piece:
            paths.append(_write(out / f"part-{number:04d}.txt", piece))
            number += 1
    return paths


def _write(path: Path, paragraphs: list[bytes]) -> str:
    path.write_bytes(b"\n\n".join(paragraphs) + b"\n")
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-dir", default=str(ROOT.parent / "shared" / "data" / "corpus" / "gutenberg"))
    parser.add_argument("--files", type=int, default=240)
    parser.add_argument("--shards", default="1,4,16")
    parser.add_argument("--sentence-split", default="punkt", choices=["punkt", "line"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sharding.json"))
    args = parser.parse_args()
    source = Path(args.corpus_dir)
    if not source.is_dir():
        print(f"skipped: corpus not found at {source} (../shared/data is only present in the dev setup)")
        return 0

    from bert_recipes.data import PretrainingStream
    from bert_recipes.data.index import build_index
    from bert_recipes.recipe import DataConfig
    from bert_recipes.tokenizer import train_wordpiece

    work = Path(tempfile.mkdtemp(prefix="bert-recipes-sharding-"))
    try:
        (work / "corpus").mkdir()
        files = make_corpus(source, work / "corpus", args.files)
        corpus_bytes = sum(os.path.getsize(f) for f in files)
        cfg = DataConfig(train_files=files, document_split="blank_line", sentence_split=args.sentence_split,
                         index_cache_dir=str(work / "cache"), shuffle_buffer_size=0)
        builds = {}
        for procs in (1, 2):
            shutil.rmtree(work / "cache", ignore_errors=True)
            start = time.perf_counter()
            index = build_index(files, cfg, num_proc=procs, show_progress=False)
            builds[f"cold_{procs}_proc_s"] = time.perf_counter() - start
        start = time.perf_counter()
        build_index(files, cfg, show_progress=False)
        builds["cached_s"] = time.perf_counter() - start
        index_bytes = sum(p.stat().st_size for p in (work / "cache").glob("*.npz"))
        doc_bytes = int(index.document_bytes().sum())
        print(f"corpus: {len(files)} files, {corpus_bytes / 1e6:.2f} MB, {index.num_documents} documents, "
              f"{len(index.unit_start)} units; index {index_bytes / 1e6:.2f} MB on disk")
        print(f"index build: cold {builds['cold_1_proc_s']:.2f} s (1 process, "
              f"{corpus_bytes / 1e6 / builds['cold_1_proc_s']:.1f} MB/s), {builds['cold_2_proc_s']:.2f} s (2), "
              f"cached {builds['cached_s']:.3f} s")

        tokenizer = train_wordpiece(files[:40], vocab_size=8000)
        rows = []
        for shards in (int(s) for s in args.shards.split(",")):
            own, random_next, instances = [], [], 0
            start = time.perf_counter()
            for shard in range(shards):
                stream = PretrainingStream(cfg, tokenizer, files, seed=0, rank=shard, world_size=shards,
                                           infinite=False)
                instances += sum(1 for _ in stream)
                own.append(stream.corpus.bytes_read["own"])
                random_next.append(stream.corpus.bytes_read["random_next"])
            elapsed = time.perf_counter() - start
            share = doc_bytes / shards
            row = {"shards": shards, "own_bytes_mean": sum(own) / shards, "own_bytes_max": max(own),
                   "own_max_over_share": max(own) / share, "random_next_bytes_mean": sum(random_next) / shards,
                   "total_max_over_share": max(o + r for o, r in zip(own, random_next)) / share,
                   "instances": instances, "instances_per_s": instances / elapsed,
                   "stream_source_bytes_per_shard": corpus_bytes}
            rows.append(row)
        print(f"\n{'S':>3} | {'own/shard (mean, MB)':>20} | {'max own / (corpus/S)':>20} | "
              f"{'random-next B/shard (MB)':>24} | {'max all / (corpus/S)':>20} | {'instances/s':>11}")
        for r in rows:
            print(f"{r['shards']:>3} | {r['own_bytes_mean'] / 1e6:>20.3f} | {r['own_max_over_share']:>20.3f} | "
                  f"{r['random_next_bytes_mean'] / 1e6:>24.3f} | {r['total_max_over_share']:>20.3f} | "
                  f"{r['instances_per_s']:>11.0f}")
        print("(the streaming source, for sources without random access, reads the whole corpus in every shard)")
        write_json(args.out, {"files": len(files), "corpus_bytes": corpus_bytes, "document_bytes": doc_bytes,
                              "documents": index.num_documents, "units": len(index.unit_start),
                              "index_bytes": index_bytes, "sentence_split": args.sentence_split,
                              "index_build": builds, "shards": rows})
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
