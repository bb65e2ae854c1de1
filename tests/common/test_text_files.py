import numpy as np
import pytest

from common.config import ConfigError
from common.tasks.text_files import DataFileError, LabelledText, encode_labels, label_names, read_texts


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --- what reads -------------------------------------------------------------------------------


def test_headerless_tsv_keeps_quotes_inside_text(tmp_path):
    f = write(tmp_path / "news.tsv", 'He said "hi"\tWorld\n"Quoted start\tSports\n')
    records = read_texts(f)
    assert [(r.text, r.label) for r in records] == [('He said "hi"', "World"), ('"Quoted start', "Sports")]
    assert records[0].source == f"{f}:1" and records[1].source == f"{f}:2"


def test_csv_header_with_multiline_field_keeps_line_numbers(tmp_path):
    f = write(tmp_path / "a.csv", 'text,label\n"first\nsecond line",pos\nplain,neg\n,neg\n')
    with pytest.raises(DataFileError) as err:
        read_texts(f)
    assert f"{f}:5" in str(err.value)  # header 1, the multi-line record 2-3, plain 4, bad 5
    write(f, 'text,label\n"first\nsecond line",pos\nplain,neg\n')
    records = read_texts(f)
    assert records[0] == LabelledText("first\nsecond line", "pos", f"{f}:2")
    assert records[1].source == f"{f}:4"


def test_csv_header_in_another_order_with_extra_columns(tmp_path):
    f = write(tmp_path / "a.csv", "id,label,source,text\n1,pos,web,good film\n2,neg,web,bad film\n")
    records = read_texts(f)
    assert [(r.text, r.label) for r in records] == [("good film", "pos"), ("bad film", "neg")]


def test_named_columns_other_than_defaults(tmp_path):
    f = write(tmp_path / "a.csv", "review,sentiment\ngood,pos\n")
    records = read_texts(f, text_column="review", label_column="sentiment")
    assert (records[0].text, records[0].label) == ("good", "pos")


def test_index_columns_without_header(tmp_path):
    f = write(tmp_path / "a.csv", "7,pos,good film\n8,neg,bad film\n")
    records = read_texts(f, text_column="2", label_column="1", header="false")
    assert [(r.text, r.label) for r in records] == [("good film", "pos"), ("bad film", "neg")]
    assert read_texts(f, text_column=2, label_column=1, header=False) == records


def test_index_columns_with_header_skip_it(tmp_path):
    f = write(tmp_path / "a.csv", "a,b\ngood,pos\n")
    records = read_texts(f, text_column="0", label_column="1", header="true")
    assert [(r.text, r.label, r.source) for r in records] == [("good", "pos", f"{f}:2")]


def test_jsonl_with_integer_labels(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "one", "label": 3}\n\n{"text": "two", "label": "1", "x": 0}\n')
    records = read_texts(f)
    assert [(r.text, r.label, r.source) for r in records] == [("one", "3", f"{f}:1"), ("two", "1", f"{f}:3")]


def test_folder_reads_data_files_sorted_by_name(tmp_path):
    write(tmp_path / "b.jsonl", '{"text": "from b", "label": "y"}\n')
    write(tmp_path / "a.tsv", "from a\tx\n")
    write(tmp_path / "notes.md", "ignored\n")
    records = read_texts(tmp_path)
    assert [r.text for r in records] == ["from a", "from b"]
    assert records[0].source == f"{tmp_path / 'a.tsv'}:1"


def test_utf8_bom_is_stripped(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes(b"\xef\xbb\xbftext,label\ncaf\xc3\xa9,food\n")
    assert [(r.text, r.label) for r in read_texts(f)] == [("café", "food")]


def test_forced_format_reads_any_suffix(tmp_path):
    f = write(tmp_path / "a.txt", "good\tpos\n")
    assert read_texts(f, format="tsv")[0].label == "pos"


def test_label_names_sort_integers_numerically():
    records = [LabelledText("t", x, f"f:{i}") for i, x in enumerate(["2", "10", "1", "2"])]
    assert label_names(records) == ["1", "2", "10"]
    assert label_names([LabelledText("t", x, "f:1") for x in ["b", "a", "10"]]) == ["10", "a", "b"]


def test_encode_labels_round_trip(tmp_path):
    f = write(tmp_path / "a.tsv", "a\tsport\nb\tworld\nc\tsport\nd\tbusiness\n")
    records = read_texts(f)
    names = label_names(records)
    codes = encode_labels(records, names)
    assert codes.dtype == np.int64
    assert [names[i] for i in codes] == [r.label for r in records]


def test_encode_labels_matches_integers_by_value():
    records = [LabelledText("t", "03", "f:1"), LabelledText("t", "10", "f:2")]
    assert encode_labels(records, ["3", "10"]).tolist() == [0, 1]


# --- what is refused, and how -----------------------------------------------------------------


def test_errors_are_config_errors():
    assert issubclass(DataFileError, ConfigError) and issubclass(DataFileError, ValueError)


def test_missing_path(tmp_path):
    with pytest.raises(DataFileError, match="does not exist") as err:
        read_texts(tmp_path / "nope.csv")
    assert "nope.csv" in str(err.value) and "task.data.path=" in str(err.value)


def test_unknown_suffix(tmp_path):
    f = write(tmp_path / "a.txt", "good\tpos\n")
    with pytest.raises(DataFileError) as err:
        read_texts(f)
    assert "a.txt" in str(err.value) and "'.txt'" in str(err.value)
    assert "task.data.format=csv|tsv|jsonl" in str(err.value)


def test_unknown_format_value(tmp_path):
    f = write(tmp_path / "a.csv", "text,label\na,b\n")
    with pytest.raises(DataFileError, match="auto, csv, tsv, jsonl"):
        read_texts(f, format="parquet")


def test_folder_with_no_data_files(tmp_path):
    write(tmp_path / "readme.md", "x\n")
    with pytest.raises(DataFileError) as err:
        read_texts(tmp_path)
    assert str(tmp_path) in str(err.value) and ".csv, .tsv, .jsonl" in str(err.value)


def test_not_utf8_names_the_line(tmp_path):
    f = tmp_path / "a.tsv"
    f.write_bytes(b"fine\tWorld\nstill fine\tWorld\ncaf\xe9\tSports\n")
    with pytest.raises(DataFileError) as err:
        read_texts(f)
    assert f"{f}:3" in str(err.value) and "UTF-8" in str(err.value) and "iconv" in str(err.value)


def test_empty_text(tmp_path):
    f = write(tmp_path / "a.tsv", "good\tpos\n   \tneg\n")
    with pytest.raises(DataFileError, match="text column is empty") as err:
        read_texts(f)
    assert f"{f}:2" in str(err.value)


def test_empty_label(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": " "}\n')
    with pytest.raises(DataFileError, match="label column is empty") as err:
        read_texts(f)
    assert f"{f}:2" in str(err.value)


def test_missing_column_in_header(tmp_path):
    f = write(tmp_path / "a.csv", "review,sentiment\ngood,pos\n")
    with pytest.raises(DataFileError) as err:
        read_texts(f, text_column="review", label_column="stars")
    msg = str(err.value)
    assert "a.csv" in msg and "'stars'" in msg and "'sentiment'" in msg and "task.data.label_column=" in msg


def test_name_without_header_is_refused(tmp_path):
    f = write(tmp_path / "a.tsv", "good\tpos\n")
    with pytest.raises(DataFileError) as err:
        read_texts(f, text_column="review", header="false")
    assert "a.tsv" in str(err.value) and "header=true" in str(err.value)


def test_missing_key_in_jsonl(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "class": "y"}\n')
    with pytest.raises(DataFileError) as err:
        read_texts(f)
    msg = str(err.value)
    assert f"{f}:2" in msg and "'label'" in msg and "'class'" in msg


def test_invalid_json_line(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label: y}\n')
    with pytest.raises(DataFileError, match="not valid JSON") as err:
        read_texts(f)
    assert f"{f}:2" in str(err.value)


@pytest.mark.parametrize("label", ["true", "1.5", "null", "[1]"])
def test_jsonl_label_of_wrong_type(tmp_path, label):
    f = write(tmp_path / "a.jsonl", '{"text": "a", "label": %s}\n' % label)
    with pytest.raises(DataFileError, match="string or an integer") as err:
        read_texts(f)
    assert f"{f}:1" in str(err.value)


def test_too_few_columns(tmp_path):
    f = write(tmp_path / "a.tsv", "good\tpos\nno label here\n")
    with pytest.raises(DataFileError) as err:
        read_texts(f)
    msg = str(err.value)
    assert f"{f}:2" in msg and "1 column(s)" in msg and "column 1" in msg


def test_label_outside_the_set(tmp_path):
    f = write(tmp_path / "a.tsv", "a\tsport\nb\tweather\n")
    with pytest.raises(DataFileError) as err:
        encode_labels(read_texts(f), ["sport", "world"])
    msg = str(err.value)
    assert f"{f}:2" in msg and "'weather'" in msg and "task.data.labels" in msg


def test_empty_file(tmp_path):
    f = write(tmp_path / "a.csv", "\n\n")
    with pytest.raises(DataFileError, match="no records") as err:
        read_texts(f)
    assert "a.csv" in str(err.value)


def test_header_only_file_has_no_records(tmp_path):
    f = write(tmp_path / "a.csv", "text,label\n")
    with pytest.raises(DataFileError, match="no records"):
        read_texts(f)
