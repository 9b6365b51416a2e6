"""Glue for running google-research/bert's create_pretraining_data.py in this process.

Nothing of Google's code is stored here. :func:`load_reference` extracts
``create_pretraining_data.py`` and ``tokenization.py`` from a git directory of
google-research/bert (``git show HEAD:<file>``) into a temporary directory outside the
repository and imports them with a small stand-in for TensorFlow (and for ``six`` when it
is not installed) in ``sys.modules``. The stand-ins are removed from ``sys.modules`` right
after the import (the two modules keep their own references), so nothing else sees them.

:func:`run_reference` calls the reference's ``create_training_instances`` unchanged and
records, for every instance, where it came from, without editing the reference's source:

* the random generator is a :class:`RecordingRandom` that delegates every draw to a plain
  ``random.Random(seed)`` (so the stream of draws is exactly the reference's) and
  remembers the order of the documents at the first ``shuffle`` (the corpus-wide document
  shuffle, before any other draw) and the draws made while a document is being processed;
* the module-level ``create_instances_from_document`` is replaced (for the call only) by a
  wrapper that hands the original a :class:`RecordingList` of the same document objects:
  its first ``__getitem__`` is A's document, every later one is the random B document of
  the next random-next instance, in the order the instances are created. The first draw
  in a document is the ``rng.random() < short_seq_prob`` test; when it is below
  ``short_seq_prob`` the next draw is ``randint(2, max_num_tokens)``, the short target.

Document identity survives the shuffle by object identity: ``id()`` of each document list
before the shuffle gives its position in the file (empty documents are dropped by the
reference before the shuffle; :func:`run_reference` checks the count against the caller's).
:func:`verify_unperturbed` checks that an instrumented run gives exactly the instances of a
plain run with the same seed.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import importlib
import importlib.machinery
import logging
import os
import random
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_REFERENCE_REPO = "/work/.mirror/google-research+bert/repo"
REFERENCE_FILES = ("create_pretraining_data.py", "tokenization.py")


class ReferenceUnavailable(RuntimeError):
    """The reference cannot be loaded (repository or files missing); the message says why."""


# --------------------------------------------------------------------------- TensorFlow stand-in


class _Flags:
    """``tf.flags``: DEFINE_* store the default on FLAGS; nothing is parsed."""

    class _Values:
        pass

    def __init__(self):
        self.FLAGS = self._Values()

    def _define(self, name, default, help=None, **kwargs):  # noqa: A002 - TF's signature
        setattr(self.FLAGS, name, default)

    DEFINE_string = DEFINE_bool = DEFINE_boolean = DEFINE_integer = DEFINE_float = _define

    def mark_flag_as_required(self, name):
        pass


def _gfile_open(path, mode="r"):
    return open(path, mode) if "b" in mode else open(path, mode, encoding="utf-8")


def _unsupported(name):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"tf.{name} is not part of the TensorFlow stand-in (no TFRecord writing)")
    return fail


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def tensorflow_standin() -> types.ModuleType:
    log = logging.getLogger("reference")
    tf_logging = types.SimpleNamespace(
        info=log.info, warning=log.warning, error=log.error, debug=log.debug,
        set_verbosity=lambda level: None, INFO=logging.INFO, DEBUG=logging.DEBUG,
    )
    return _module(
        "tensorflow",
        gfile=types.SimpleNamespace(GFile=_gfile_open, Glob=_glob.glob, Open=_gfile_open),
        logging=tf_logging,
        flags=_Flags(),
        app=types.SimpleNamespace(run=_unsupported("app.run")),
        train=types.SimpleNamespace(Feature=_unsupported("train.Feature"), Int64List=_unsupported("train.Int64List"),
                                    FloatList=_unsupported("train.FloatList"), Example=_unsupported("train.Example"),
                                    Features=_unsupported("train.Features")),
        python_io=types.SimpleNamespace(TFRecordWriter=_unsupported("python_io.TFRecordWriter")),
    )


def six_standin() -> types.ModuleType:
    return _module("six", PY2=False, PY3=True, text_type=str, binary_type=bytes, string_types=(str,),
                   integer_types=(int,))


@contextlib.contextmanager
def _injected(modules: dict):
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


# --------------------------------------------------------------------------- loading


@dataclass
class Reference:
    cpd: types.ModuleType  # create_pretraining_data
    tokenization: types.ModuleType
    commit: str
    source_dir: str


def _git_show(git_dir: str, rev_path: str) -> str:
    out = subprocess.run(["git", f"--git-dir={git_dir}", "show", rev_path], capture_output=True, text=True)
    if out.returncode != 0:
        raise ReferenceUnavailable(f"git show {rev_path} in {git_dir} failed: {out.stderr.strip()}")
    return out.stdout


_LOADED: dict[tuple[str, str], Reference] = {}


def load_reference(git_dir: str = DEFAULT_REFERENCE_REPO, rev: str = "HEAD") -> Reference:
    """Import the reference's two modules from ``git_dir`` at ``rev`` (see the module
    docstring); a second call with the same arguments returns the same modules."""
    if (git_dir, rev) in _LOADED:
        return _LOADED[(git_dir, rev)]
    if not os.path.isdir(git_dir):
        raise ReferenceUnavailable(f"no reference repository at {git_dir}")
    commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", rev], capture_output=True,
                            text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="google-bert-reference-")
    for name in REFERENCE_FILES:
        Path(tmp, name).write_text(_git_show(git_dir, f"{rev}:{name}"))
    standins = {"tensorflow": tensorflow_standin()}
    try:
        import six  # noqa: F401
    except ImportError:
        standins["six"] = six_standin()
    # The reference imports "tokenization" as a top-level module.
    for name in ("tokenization", "create_pretraining_data"):
        if name in sys.modules:
            raise ReferenceUnavailable(f"a module named {name!r} is already imported; cannot import the reference")
    sys.path.insert(0, tmp)
    try:
        with _injected(standins):
            tokenization = importlib.import_module("tokenization")
            cpd = importlib.import_module("create_pretraining_data")
    finally:
        sys.path.remove(tmp)
    _LOADED[(git_dir, rev)] = Reference(cpd=cpd, tokenization=tokenization, commit=commit, source_dir=tmp)
    return _LOADED[(git_dir, rev)]


# --------------------------------------------------------------------------- instrumentation


class RecordingRandom:
    """Every draw delegated to ``random.Random(seed)``; records the document order at the
    first shuffle and, while ``calls`` is a list, the ``random``/``randint`` draws."""

    def __init__(self, seed):
        self._rng = random.Random(seed)
        self.first_shuffle_ids: Optional[list[int]] = None
        self.calls: Optional[list[tuple]] = None

    def random(self):
        value = self._rng.random()
        if self.calls is not None:
            self.calls.append(("random", value))
        return value

    def randint(self, a, b):
        value = self._rng.randint(a, b)
        if self.calls is not None:
            self.calls.append(("randint", a, b, value))
        return value

    def shuffle(self, x):
        if self.first_shuffle_ids is None:
            self.first_shuffle_ids = [id(item) for item in x]
        self._rng.shuffle(x)

    def __getattr__(self, name):  # any other method the reference might use
        return getattr(self._rng, name)


class RecordingList(list):
    """A list of the same document objects whose integer indexing is logged."""

    def __init__(self, items):
        super().__init__(items)
        self.log: list[int] = []

    def __getitem__(self, index):
        self.log.append(index)
        return list.__getitem__(self, index)


class CachedTokenizer:
    """The reference FullTokenizer with a per-line cache (a fresh list per call), so that
    several seeds do not repeat the slow pure-Python WordPiece; output identical."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.vocab = tokenizer.vocab
        self._cache: dict[str, list[str]] = {}

    def tokenize(self, text):
        tokens = self._cache.get(text)
        if tokens is None:
            tokens = self._cache[text] = self.inner.tokenize(text)
        return list(tokens)


@dataclass
class RefInstance:
    tokens: list  # with masked replacements, as the reference emits them
    segment_ids: list
    is_random_next: bool
    masked_lm_positions: list
    masked_lm_labels: list
    a_document: int  # position in the file (0-based, non-empty documents)
    b_document: int  # == a_document for IsNext
    target_length: int
    short_drawn: bool  # the rng.random() < short_seq_prob branch was taken


def run_reference(ref: Reference, input_files, tokenizer, *, max_seq_length, dupe_factor, short_seq_prob,
                  masked_lm_prob, max_predictions_per_seq, seed, expected_documents: Optional[int] = None):
    """Instrumented ``create_training_instances``; returns ``(instances, info)`` where
    ``instances`` are :class:`RefInstance` in the reference's final (shuffled) order."""
    cpd = ref.cpd
    rng = RecordingRandom(seed)
    original = cpd.create_instances_from_document
    max_num_tokens = max_seq_length - 3
    meta: dict[int, tuple] = {}
    state: dict = {"docs": None, "rec": None, "to_file": None}
    doc_draws = {"documents": 0, "short": 0}

    def wrapper(all_documents, document_index, max_seq_length_, short_seq_prob_, masked_lm_prob_,
                max_predictions_per_seq_, vocab_words, rng_):
        if state["docs"] is not all_documents:
            if rng.first_shuffle_ids is None:
                raise AssertionError("create_instances_from_document called before the document shuffle")
            file_pos = {ident: pos for pos, ident in enumerate(rng.first_shuffle_ids)}
            if len(file_pos) != len(rng.first_shuffle_ids) or len(all_documents) != len(file_pos):
                raise AssertionError("the first shuffle was not the document shuffle")
            state.update(docs=all_documents, rec=RecordingList(all_documents),
                         to_file=[file_pos[id(doc)] for doc in all_documents])
        rec, to_file = state["rec"], state["to_file"]
        rec.log = []
        rng.calls = []
        try:
            out = original(rec, document_index, max_seq_length_, short_seq_prob_, masked_lm_prob_,
                           max_predictions_per_seq_, vocab_words, rng_)
        finally:
            calls, rng.calls = rng.calls, None
        if not calls or calls[0][0] != "random":
            raise AssertionError(f"the first draw in a document is not rng.random(): {calls[:2]}")
        short = calls[0][1] < short_seq_prob_
        if short:
            if calls[1][:3] != ("randint", 2, max_num_tokens):
                raise AssertionError(f"the draw after a short test is not randint(2, {max_num_tokens}): {calls[1]}")
            target = calls[1][3]
        else:
            target = max_num_tokens
        doc_draws["documents"] += 1
        doc_draws["short"] += int(short)
        if not rec.log or rec.log[0] != document_index:
            raise AssertionError("the first document access is not A's document")
        b_accesses = iter(rec.log[1:])
        a_file = to_file[document_index]
        for inst in out:
            if inst.is_random_next:
                b_index = next(b_accesses, None)
                if b_index is None:
                    raise AssertionError("fewer random-document accesses than random-next instances")
                b_file = to_file[b_index]
            else:
                b_file = a_file
            meta[id(inst)] = (a_file, b_file, target, short)
        if next(b_accesses, None) is not None:
            raise AssertionError("more random-document accesses than random-next instances")
        return out

    cpd.create_instances_from_document = wrapper
    try:
        raw = cpd.create_training_instances(list(input_files), tokenizer, max_seq_length, dupe_factor,
                                            short_seq_prob, masked_lm_prob, max_predictions_per_seq, rng)
    finally:
        cpd.create_instances_from_document = original
    n_docs = len(rng.first_shuffle_ids or [])
    if expected_documents is not None and n_docs != expected_documents:
        raise AssertionError(f"the reference read {n_docs} non-empty documents, the input has {expected_documents}: "
                             "document positions would not match")
    instances = []
    for inst in raw:
        a, b, target, short = meta[id(inst)]
        instances.append(RefInstance(list(inst.tokens), list(inst.segment_ids), bool(inst.is_random_next),
                                     list(inst.masked_lm_positions), list(inst.masked_lm_labels), a, b, target, short))
    return instances, {"documents": n_docs, "document_draws": doc_draws}


def run_plain(ref: Reference, input_files, tokenizer, *, max_seq_length, dupe_factor, short_seq_prob,
              masked_lm_prob, max_predictions_per_seq, seed):
    """The reference exactly as its main() calls it (``random.Random(seed)``), no instrumentation."""
    return ref.cpd.create_training_instances(list(input_files), tokenizer, max_seq_length, dupe_factor,
                                             short_seq_prob, masked_lm_prob, max_predictions_per_seq,
                                             random.Random(seed))


def verify_unperturbed(plain, instrumented) -> Optional[str]:
    """None when both runs gave the same instances in the same order, else what differs."""
    if len(plain) != len(instrumented):
        return f"{len(plain)} plain vs {len(instrumented)} instrumented instances"
    for i, (p, q) in enumerate(zip(plain, instrumented)):
        if (list(p.tokens), list(p.segment_ids), bool(p.is_random_next), list(p.masked_lm_positions),
                list(p.masked_lm_labels)) != (q.tokens, q.segment_ids, q.is_random_next, q.masked_lm_positions,
                                              q.masked_lm_labels):
            return f"instance {i} differs"
    return None
