"""A 2-machine x 1-process job on loopback, launched the way a multi-node GPU job is: one
``accelerate launch --num_machines 2 --machine_rank R`` per machine, here both on 127.0.0.1
with gloo on the CPU (ACCELERATE_USE_CPU=1), sharing one output_dir as nodes share a file
system. See tests/multinode_launch.py for what each rank does and writes.

The corpus is made so that every instance tells where its text came from: each sentence
carries a marker word ``w<doc><sentence>`` that is a single token of the test's vocabulary.
Documents are short (at most 3 sentences of at most 7 tokens) and ``short_seq_prob`` is 0,
so with max_seq_length 64 no pair is ever truncated: in one pass every sentence is used
exactly once as own-document text (the A segment, and the B segment of an IsNext pair). A
random-next B segment may come from any document, of this rank or another, so it is not
counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import REPO, TINY_RECIPE, tiny_overrides

LAUNCH_SCRIPT = REPO / "tests" / "multinode_launch.py"
TIMEOUT_S = 240
GRACE_S = 20
NUM_DOCUMENTS = 160
FILLERS = ("the cat dog bird sat ran saw ate a on in by red big old new mat hill tree road house light rain "
           "and with near over under small green blue").split()
MARKER = re.compile(r"^w(\d{3})(\d)$")


def loopback_gloo_available() -> str | None:
    """None when a gloo process group binds 127.0.0.1, else why not."""
    probe = ("import datetime, os, torch.distributed as dist;"
             "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:' + os.environ['PROBE_PORT'], rank=0,"
             " world_size=1, timeout=datetime.timedelta(seconds=20));"
             "dist.barrier(); dist.destroy_process_group()")
    env = {**loopback_env(), "PROBE_PORT": str(free_port())}
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "a one-rank gloo group on 127.0.0.1 did not come up within 60 s"
    return None if done.returncode == 0 else f"gloo cannot bind loopback: {done.stderr.strip()[-500:]}"


def loopback_env() -> dict[str, str]:
    env = dict(os.environ)
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on the loopback interface, not the host's address
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corpus(root: Path) -> tuple[list[Path], set[str], Path]:
    """4 text files of blank-line separated documents, the set of all marker words, and a
    WordPiece tokenizer folder whose vocabulary holds every word of the corpus."""
    rng = random.Random(0)
    markers: set[str] = set()
    documents = []
    for doc in range(NUM_DOCUMENTS):
        sentences = []
        for sent in range(rng.choice((1, 2, 2, 3, 3))):  # some single-sentence documents
            marker = f"w{doc:03d}{sent}"
            markers.add(marker)
            words = [rng.choice(FILLERS) for _ in range(rng.randint(2, 5))]
            sentences.append(f"{marker.capitalize()} {' '.join(words)}.")  # [marker, 2..5 words, "."]: <= 7 tokens
        documents.append(" ".join(sentences))
    root.mkdir(parents=True)
    files = []
    for i in range(4):
        path = root / f"part-{i}.txt"
        path.write_text("\n\n".join(documents[i::4]) + "\n", encoding="utf-8")
        files.append(path)

    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *FILLERS, *sorted(markers)]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    folder = root / "tokenizer"
    tokenizer.save_pretrained(folder)
    assert tokenizer.tokenize(documents[0]) == documents[0].lower().replace(".", " .").split()  # no [UNK], no pieces
    return files, markers, folder


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc; just ``pid`` elsewhere). torchrun starts its
    workers in sessions of their own, so killing the launcher's process group misses them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the launchers (torchrun then stops its workers), SIGKILL whatever is left."""
    running = [p for p in procs if p.poll() is None]
    trees = [pid for p in running for pid in process_tree(p.pid)]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in trees:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in running:
        p.wait(timeout=30)


def run_two_machines(args: list[str], logs: Path) -> list[tuple[int, str]]:
    """Start machine 0 and machine 1 as two ``accelerate launch`` processes and wait for both;
    return (exit code, log) per machine. Both are stopped after TIMEOUT_S, and the other one
    GRACE_S after one fails (its peer would wait in a collective for a long time)."""
    port = free_port()
    env = {**loopback_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for machine in (0, 1):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags(machine, port),
                   str(LAUNCH_SCRIPT), *args]
            files.append(open(logs / f"machine{machine}.log", "w", encoding="utf-8"))
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=files[-1], stderr=subprocess.STDOUT))
        deadline, failed_at, timed_out = time.monotonic() + TIMEOUT_S, None, False
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now > failed_at + GRACE_S:
                break
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:  # a timeout, a failed peer, Ctrl-C: leave no rank behind
        stop_all(procs)
        for log in files:
            log.close()
    texts = [(logs / f"machine{m}.log").read_text(encoding="utf-8", errors="replace") for m in (0, 1)]
    if timed_out:
        tails = "\n".join(f"--- machine {m}\n{text[-2000:]}" for m, text in enumerate(texts))
        pytest.fail(f"the 2-machine job did not finish within {TIMEOUT_S} s; both stopped\n{tails}")
    return [(p.returncode, text) for p, text in zip(procs, texts)]


def launch_flags(machine: int, port: int) -> list[str]:
    """What each node of a 2-node x 1-GPU job passes to ``accelerate launch``, on loopback."""
    return ["--multi_gpu", "--num_machines", "2", "--machine_rank", str(machine), "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "static",
            "--same_network", "--mixed_precision", "no", "--dynamo_backend", "no"]


def own_document_markers(instance: dict) -> list[str]:
    """Marker words of the instance's own-document text: A, plus B of an IsNext pair."""
    tokens = instance["a"] + (instance["b"] if instance["next_sentence_label"] == 0 else [])
    return [t for t in tokens if MARKER.match(t)]


@pytest.mark.slow
def test_two_machines_shard_the_corpus_and_end_with_identical_parameters(tmp_path):
    """Machines 0 and 1 (one rank each) build disjoint halves of one pass over the corpus that
    together use every sentence once, then pretrain 3 steps (a checkpoint at step 2) into one
    output_dir and end with the same parameters, which are the exported ones."""
    reason = loopback_gloo_available()
    if reason:
        pytest.skip(reason)
    files, markers, tokenizer = make_corpus(tmp_path / "corpus")
    run, out = tmp_path / "run", tmp_path / "ranks"
    overrides = tiny_overrides(run, **{
        "tokenizer.name_or_path": str(tokenizer),
        "data.train_files": "[" + ",".join(str(f) for f in files) + "]",
        "data.eval_files": "[]",
        "data.short_seq_prob": 0.0,  # no short targets: no pair is ever truncated
        "train.max_steps": 3,
        "train.save_steps": 2,
    })
    results = run_two_machines([str(out), str(TINY_RECIPE), *overrides], tmp_path / "logs")
    for machine, (code, log) in enumerate(results):
        assert code == 0, f"machine {machine} exited with {code}\n{log[-4000:]}"
    log0 = results[0][1]
    assert "accelerate: MULTI_CPU, 2 process(es)" in log0
    assert "host memory: " in log0  # keep_host_memory: true (the default) on CPU ranks, and what it did
    assert "parameters identical on all 2 ranks" in log0

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, rank in enumerate(ranks):  # one process per machine: global rank r is local rank 0 of node r
        topology = rank["topology"]
        assert (topology["process_index"], topology["num_processes"], topology["local_process_index"]) == (r, 2, 0)
        assert (topology["node_rank"], topology["local_world_size"], topology["backend"]) == (str(r), "1", "gloo")
        assert rank["exit_code"] == 0

    # (a) one pass: each rank's own-document text comes from its own documents only, and the
    # two ranks together use every sentence of the corpus exactly once
    documents, used = [], Counter()
    for r, rank in enumerate(ranks):
        assert rank["instances"], f"rank {r} built no instances"
        mine = set()
        for instance in rank["instances"]:
            assert instance["a"][0] == "[CLS]" and instance["a"][-1] == "[SEP]" and instance["b"][-1] == "[SEP]"
            own = own_document_markers(instance)
            origins = {MARKER.match(t).group(1) for t in own}
            assert len(origins) == 1, f"rank {r}: an instance's own-document text has markers {own}"
            mine |= origins
            used.update(own)
        documents.append(mine)
    assert not documents[0] & documents[1], f"documents on both ranks: {sorted(documents[0] & documents[1])[:10]}"
    missing = {f"{d:03d}" for d in range(NUM_DOCUMENTS)} - (documents[0] | documents[1])
    assert not missing, f"documents on neither rank: {sorted(missing)[:10]}"
    assert abs(len(documents[0]) - len(documents[1])) <= NUM_DOCUMENTS // 4  # both ranks have a real share
    assert set(used) == markers, f"sentences never used: {sorted(markers - set(used))[:10]}"
    assert [m for m, n in used.items() if n > 1] == [], "sentences used twice"
    for r, rank in enumerate(ranks):  # the pass also has both kinds of NSP pairs
        assert {i["next_sentence_label"] for i in rank["instances"]} == {0, 1}, r

    # the same output_dir written by both machines holds one consistent run
    checkpoint = run / "checkpoints" / "checkpoint-00000002"
    for name in ("data_state_rank0.pt", "data_state_rank1.pt", "random_states_0.pkl", "random_states_1.pkl"):
        assert (checkpoint / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    # (b) both ranks end with the same parameters, which are the exported ones
    params0, params1 = ranks[0]["parameters"], ranks[1]["parameters"]
    assert params0 and params0.keys() == params1.keys()
    assert [name for name in params0 if params0[name] != params1[name]] == []

    exported = load_file(run / "final" / "model.safetensors")
    assert [name for name in params0 if name not in exported] == []
    for name in params0:
        digest = hashlib.sha256(exported[name].contiguous().numpy().tobytes()).hexdigest()
        assert digest == params0[name], name
