"""GLUE data: the TSV reader on every task's quirks, real GLUE files, the Hub loader,
featurisation and checkpoint label mapping."""

from pathlib import Path

import datasets
import pytest

from bert_recipes.errors import DataError, UserError
from bert_recipes.glue.data import (
    label_mapping,
    load_glue_from_hub,
    load_glue_split,
    read_glue_tsv,
    tokenize_glue,
)

HERE = Path(__file__).resolve()
FIXTURES = HERE.parent / "fixtures" / "glue"
SAMPLE = HERE.parents[1] / "data" / "sample" / "glue"
REAL_GLUE = HERE.parents[2] / "shared" / "data" / "glue"


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- fixtures, per task


def test_cola_headerless_train_and_headed_test():
    train = load_glue_split("cola", "train", FIXTURES)
    assert train.column_names == ["idx", "sentence", "label"]
    assert train["label"] == [1, 0, 1, 0]
    assert train["idx"] == [0, 1, 2, 3]
    assert train["sentence"][2] == 'She said "yes" quietly.'
    assert train.features["label"].names == ["unacceptable", "acceptable"]
    assert load_glue_split("cola", "dev", FIXTURES)["label"] == [1, 0, 1]
    test = load_glue_split("cola", "test", FIXTURES)
    assert test["idx"] == [0, 1] and test["label"] == [-1, -1]
    assert test["sentence"] == ["Rain fell on the quiet town.", "Town the quiet fell rain."]


def test_sst2_keeps_text_verbatim_and_allows_an_empty_sentence():
    train = load_glue_split("SST-2", "train", FIXTURES)
    assert train["sentence"] == ["a warm , witty little film ", "flat and joyless ", ""]
    assert train["label"] == [1, 0, 0]
    test = load_glue_split("sst2", "test", FIXTURES)
    assert test["idx"] == [0, 1] and test["label"] == [-1, -1]


def test_mrpc_bom_header_and_bare_quotes_do_not_merge_rows():
    train = load_glue_split("mrpc", "train", FIXTURES)
    assert len(train) == 3  # with csv quoting on, the lone '"' of row 2 would swallow row 3
    assert train.column_names == ["idx", "sentence1", "sentence2", "label"]
    assert train["label"] == [1, 0, 1]
    assert train["sentence1"][1] == '" We are not selling , the chairman said .'
    assert train["sentence2"][2] == "Shares gained 3 percent early in the session ."
    dev = load_glue_split("mrpc", "validation", FIXTURES)
    assert dev["sentence2"][0] == 'Officials said " the bridge stays closed .'
    test = load_glue_split("mrpc", "test", FIXTURES)
    assert test["idx"] == [0, 1] and test["label"] == [-1, -1]


def test_stsb_float_scores():
    train = load_glue_split("STS-B", "train", FIXTURES)
    assert train.features["label"] == datasets.Value("float32")
    assert train["label"] == pytest.approx([4.2, 0.0, 5.0])
    assert train["sentence2"][0] == "A dog is running on the sand."
    test = load_glue_split("stsb", "test", FIXTURES)
    assert test["label"] == [-1.0, -1.0] and test["idx"] == [0, 1]


def test_qqp_columns_and_id_index():
    train = load_glue_split("qqp", "train", FIXTURES)
    assert train.column_names == ["idx", "question1", "question2", "label"]
    assert train["label"] == [1, 0]
    assert train["idx"] == [0, 1]  # train/dev idx is the row number, as in nyu-mll/glue
    assert load_glue_split("qqp", "dev", FIXTURES)["label"] == [1, 0, 1]
    test = load_glue_split("qqp", "test", FIXTURES)  # QQP's index column is called "id"
    assert test["idx"] == [0, 1] and test["question2"] == ["What is a simple bread recipe?", "How tall is Everest?"]


def test_mnli_maps_gold_label_by_name_and_has_two_dev_sets():
    train = load_glue_split("mnli", "train", FIXTURES)
    assert train.column_names == ["idx", "premise", "hypothesis", "label"]
    # entailment, contradiction, neutral -> ids 0, 2, 1 (nyu-mll/glue order)
    assert train["label"] == [0, 2, 1]
    matched = load_glue_split("mnli", "dev_matched", FIXTURES)
    assert matched["label"] == [1, 2]  # gold_label, not label1 (which is "neutral", "contradiction")
    assert matched["premise"] == ["She missed the bus.", "Two children play chess."]
    mismatched = load_glue_split("mnli", "validation_mismatched", FIXTURES)
    assert mismatched["label"] == [0, 2, 1]
    assert mismatched.features["label"].int2str(2) == "contradiction"
    assert len(load_glue_split("mnli", "test_matched", FIXTURES)) == 2
    assert load_glue_split("mnli", "test_mismatched", FIXTURES)["label"] == [-1]


@pytest.mark.parametrize(
    "task, columns, labels",
    [
        ("qnli", ["idx", "question", "sentence", "label"], [0, 1]),
        ("rte", ["idx", "sentence1", "sentence2", "label"], [0, 1]),
        ("wnli", ["idx", "sentence1", "sentence2", "label"], [1, 0]),  # "1" = entailment = id 1
    ],
)
def test_pair_tasks(task, columns, labels):
    train = load_glue_split(task, "train", FIXTURES)
    assert train.column_names == columns and train["label"] == labels
    test = load_glue_split(task, "test", FIXTURES)
    assert set(test["label"]) == {-1} and test["idx"] == list(range(len(test)))


def test_wnli_label_names():
    train = load_glue_split("wnli", "train", FIXTURES)
    assert [train.features["label"].int2str(i) for i in train["label"]] == ["entailment", "not_entailment"]


def test_ax_is_test_only():
    ax = load_glue_split("ax", "test", FIXTURES)
    assert ax.column_names == ["idx", "premise", "hypothesis", "label"]
    assert ax["idx"] == [0, 1, 2] and ax["label"] == [-1, -1, -1]
    assert ax.features["label"].names == ["entailment", "neutral", "contradiction"]
    with pytest.raises(UserError, match="'ax' has no split 'train'"):
        load_glue_split("ax", "train", FIXTURES)


def test_glue_dir_may_be_the_task_folder():
    assert load_glue_split("rte", "train", FIXTURES / "RTE")["label"] == [0, 1]


# --------------------------------------------------------------------------- malformed input


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_label_outside_the_label_set_names_file_line_and_value(tmp_path):
    path = write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(DataError) as err:
        load_glue_split("sst2", "train", tmp_path)
    assert one_line(err) == f"{path}: line 3: label '2' is not one of 0, 1 (task sst2)"


def test_rte_label_must_be_a_name(tmp_path):
    path = write(tmp_path / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailed\n")
    with pytest.raises(DataError, match="line 2: label 'entailed' is not one of entailment, not_entailment"):
        read_glue_tsv(path, "rte", "validation")


def test_missing_column(tmp_path):
    path = write(tmp_path / "train.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(DataError) as err:
        read_glue_tsv(path, "sst2", "train")
    assert one_line(err) == f"{path}: missing column 'sentence'; header has: text, label"


def test_test_file_needs_an_index_column(tmp_path):
    path = write(tmp_path / "test.tsv", "sentence\nfine\n")
    with pytest.raises(DataError, match="missing column 'index'"):
        read_glue_tsv(path, "sst2", "test")


def test_wrong_number_of_fields(tmp_path):
    path = write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t0\n1\ta\tb\textra\t1\n")
    with pytest.raises(DataError) as err:
        read_glue_tsv(path, "wnli", "train")
    assert one_line(err) == (
        f"{path}: line 3: expected 4 tab-separated fields (index, sentence1, sentence2, label), got 5"
    )


def test_headerless_cola_row_with_too_few_fields(tmp_path):
    path = write(tmp_path / "dev.tsv", "gj04\t1\t\tA fine sentence.\ngj04\t1\tno sentence\n")
    with pytest.raises(DataError, match="line 2: expected 4 tab-separated fields .*got 3"):
        read_glue_tsv(path, "cola", "dev")


def test_stsb_score_out_of_range(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = write(tmp_path / "train.tsv", header + "0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n")
    with pytest.raises(DataError, match="line 2: score '7.5' is not a number in \\[0, 5\\]"):
        read_glue_tsv(path, "stsb", "train")


def test_non_integer_test_index(tmp_path):
    path = write(tmp_path / "test.tsv", "index\tsentence\nx1\tfine\n")
    with pytest.raises(DataError, match="line 2: index 'x1' is not an integer"):
        read_glue_tsv(path, "sst2", "test")


def test_missing_file_and_missing_folder(tmp_path):
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(DataError, match="SST-2/dev.tsv: GLUE sst2 validation file not found"):
        load_glue_split("sst2", "dev", tmp_path)
    with pytest.raises(DataError, match="no GLUE folder 'RTE'"):
        load_glue_split("rte", "train", tmp_path)


def test_empty_file_and_header_only(tmp_path):
    with pytest.raises(DataError, match="file is empty"):
        read_glue_tsv(write(tmp_path / "a.tsv", ""), "sst2", "train")
    with pytest.raises(DataError, match="no data rows"):
        read_glue_tsv(write(tmp_path / "b.tsv", "sentence\tlabel\n"), "sst2", "train")


def test_quotes_never_merge_rows(tmp_path):
    path = write(tmp_path / "train.tsv", 'sentence\tlabel\n" an opening quote\t1\nnext row "\t0\n')
    data = read_glue_tsv(path, "sst2", "train")
    assert data["sentence"] == ['" an opening quote', 'next row "'] and data["label"] == [1, 0]


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="'sst2' has no split 'validation_matched'"):
        load_glue_split("sst2", "validation_matched", FIXTURES)


# --------------------------------------------------------------------------- Hub loader (offline: faked)


def test_hub_failure_is_a_clear_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_glue_split("rte", "dev")  # no glue_dir -> the Hub
    assert one_line(err) == (
        "data.glue_dir: not set, and nyu-mll/glue (config 'rte', split 'validation') cannot be loaded from the "
        "Hugging Face Hub or its cache (ConnectionError: Couldn't reach 'nyu-mll/glue' on the Hub "
        "(LocalEntryNotFoundError)); set data.glue_dir=PATH to the GLUE TSV folders (e.g. PATH/RTE/train.tsv), "
        "or go online"
    )


def test_hub_loader_keeps_the_same_columns(monkeypatch):
    calls = []
    features = datasets.Features({
        "premise": datasets.Value("string"),
        "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        "idx": datasets.Value("int32"),
        "extra": datasets.Value("string"),
    })

    def fake(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [7], "extra": ["x"]}, features=features
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = load_glue_from_hub("MNLI", "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert data.column_names == ["idx", "premise", "hypothesis", "label"]
    assert data[0] == {"idx": 7, "premise": "p", "hypothesis": "h", "label": 2}
    assert data.features == load_glue_split("mnli", "dev_matched", FIXTURES).features


# --------------------------------------------------------------------------- real GLUE files


OFFICIAL_ROWS = {
    "cola": (8551, 1043, 1063),
    "sst2": (67349, 872, 1821),
    "mrpc": (3668, 408, 1725),
    "stsb": (5749, 1500, 1379),
    "rte": (2490, 277, 3000),
}


@pytest.mark.realdata
@pytest.mark.parametrize("task", sorted(OFFICIAL_ROWS))
def test_real_glue_row_counts_and_labels(task):
    if not REAL_GLUE.is_dir():
        pytest.skip(f"real GLUE data not available: {REAL_GLUE} is absent (it lives in ../shared/data)")
    train, dev, test = (load_glue_split(task, split, REAL_GLUE) for split in ("train", "validation", "test"))
    assert (len(train), len(dev), len(test)) == OFFICIAL_ROWS[task]
    for labelled in (train, dev):
        labels = labelled["label"]
        if task == "stsb":
            assert 0.0 <= min(labels) and max(labels) <= 5.0 and min(labels) < 1.0 < 4.0 < max(labels)
        else:
            assert set(labels) == {0, 1}
    assert set(test["label"]) == {-1}
    assert test["idx"] == list(range(len(test)))
    text = train.column_names[1]
    assert all(isinstance(s, str) for s in train[text][:100])


@pytest.mark.realdata
def test_real_mrpc_keeps_bare_quotes():
    if not REAL_GLUE.is_dir():
        pytest.skip(f"real GLUE data not available: {REAL_GLUE} is absent (it lives in ../shared/data)")
    dev = load_glue_split("mrpc", "dev", REAL_GLUE)
    assert dev["sentence2"][0].startswith('" The foodservice pie business')
    assert dev["label"][:2] == [1, 0]


# --------------------------------------------------------------------------- the built-in sample


def test_sample_sst2():
    train, dev, test = (load_glue_split("sst2", split, SAMPLE) for split in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (200, 60, 40)
    assert sum(train["label"]) == 100 and sum(dev["label"]) == 30
    assert test["idx"] == list(range(40)) and set(test["label"]) == {-1}
    sentences = list(train["sentence"]) + list(dev["sentence"]) + list(test["sentence"])
    assert len(set(sentences)) == 300  # no sentence repeats across splits


# --------------------------------------------------------------------------- featurisation


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    words = [f"w{i}" for i in range(400)]
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    return BertTokenizer(vocab=vocab)


def pair_dataset(first: str, second: str, label=0):
    return datasets.Dataset.from_dict({"idx": [0], "sentence1": [first], "sentence2": [second], "label": [label]})


def test_pair_truncation_is_longest_first_to_exactly_max_seq_length(tokenizer):
    first = " ".join(f"w{i}" for i in range(25))
    second = " ".join(f"w{i % 400}" for i in range(300))
    features = tokenize_glue(pair_dataset(first, second, label=1), "rte", tokenizer, 128)
    assert features.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    row = features[0]
    assert len(row["input_ids"]) == 128
    # [CLS] + 25 + [SEP] = 27 segment-A tokens; the 300-token side keeps 128 - 3 - 25 = 100 (+ [SEP]).
    assert row["token_type_ids"].count(0) == 27 and row["token_type_ids"].count(1) == 101
    assert row["input_ids"][:3] == [2, 5, 6] and row["input_ids"][26:28] == [3, 5]
    assert row["attention_mask"] == [1] * 128 and row["labels"] == 1


def test_empty_sentences_are_valid(tokenizer):
    single = datasets.Dataset.from_dict({"idx": [0], "sentence": [""], "label": [1]})
    assert tokenize_glue(single, "sst2", tokenizer, 16)[0]["input_ids"] == [2, 3]
    pair = tokenize_glue(pair_dataset("w1", ""), "wnli", tokenizer, 16)[0]
    assert pair["input_ids"] == [2, 6, 3, 3] and pair["token_type_ids"] == [0, 0, 0, 1]


def test_single_sentence_truncation_and_row_order(tokenizer):
    data = datasets.Dataset.from_dict(
        {"idx": [0, 1], "sentence": [" ".join(["w7"] * 50), "w3"], "label": [0, 1]}
    )
    out = tokenize_glue(data, "cola", tokenizer, 10)
    assert out["input_ids"] == [[2] + [12] * 8 + [3], [2, 8, 3]]
    assert out["labels"] == [0, 1]


def test_stsb_labels_are_floats_and_test_splits_have_no_labels(tokenizer):
    stsb = tokenize_glue(load_glue_split("stsb", "train", FIXTURES), "stsb", tokenizer, 32)
    assert stsb["labels"] == pytest.approx([4.2, 0.0, 5.0]) and isinstance(stsb["labels"][0], float)
    test = tokenize_glue(load_glue_split("mnli", "test_matched", FIXTURES), "mnli", tokenizer, 32)
    assert test.column_names == ["input_ids", "token_type_ids", "attention_mask"] and len(test) == 2


def test_partly_hidden_labels_are_refused(tokenizer):
    data = datasets.Dataset.from_dict({"idx": [0, 1], "sentence": ["w1", "w2"], "label": [1, -1]})
    with pytest.raises(DataError, match="1 of 2 examples have hidden labels"):
        tokenize_glue(data, "sst2", tokenizer, 16)


def test_tokenize_checks_columns_and_length(tokenizer):
    with pytest.raises(DataError, match="no column 'question'"):
        tokenize_glue(pair_dataset("a", "b"), "qnli", tokenizer, 16)
    with pytest.raises(UserError, match="max_seq_length must be a positive integer"):
        tokenize_glue(pair_dataset("a", "b"), "rte", tokenizer, 0)


# --------------------------------------------------------------------------- label mapping


def test_label_mapping_uses_the_task_order_for_generic_or_matching_names():
    from transformers import BertConfig

    assert label_mapping("mnli", BertConfig()) is None  # LABEL_0, LABEL_1: a fresh head
    assert label_mapping("mnli", BertConfig(num_labels=3)) is None
    assert label_mapping("sst2", {0: "NEGATIVE", 1: "POSITIVE"}) is None
    assert label_mapping("rte", {"0": "entailment", "1": "not entailment"}) is None  # JSON keys, spaces
    assert label_mapping("cola", {0: "0", 1: "1"}) is None  # the TSV spelling
    assert label_mapping("stsb", {0: "LABEL_0"}) is None
    assert label_mapping("qqp", None) is None


def test_label_mapping_remaps_a_different_order():
    from transformers import BertConfig

    # roberta-large-mnli style: 0 contradiction, 1 neutral, 2 entailment.
    config = BertConfig(id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"})
    # task ids: entailment 0 -> checkpoint 2, neutral 1 -> 1, contradiction 2 -> 0
    assert label_mapping("mnli", config) == {0: 2, 1: 1, 2: 0}
    assert label_mapping("wnli", {0: "entailment", 1: "not_entailment"}) == {0: 1, 1: 0}


@pytest.mark.parametrize(
    "task, id2label, match",
    [
        ("rte", {0: "entailment", 1: "neutral", 2: "contradiction"}, "do not match GLUE task 'rte'"),
        ("sst2", {0: "unacceptable", 1: "acceptable"}, "do not match GLUE task 'sst2' labels \\(negative, positive\\)"),
        ("mnli", {0: "entailment", 1: "entailment", 2: "neutral"}, "do not match"),
        ("stsb", {0: "negative", 1: "positive"}, "'stsb' is a regression"),
    ],
)
def test_label_mapping_conflicts(task, id2label, match):
    with pytest.raises(UserError, match=match) as err:
        label_mapping(task, id2label)
    assert "\n" not in str(err.value)
