"""Property-based fuzzing of the CSV readers and the tokenization path: whatever the bytes, the
result is examples plus a counted skip, or a DataError — never a crash from deep inside."""
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtbert.core.tasks import get_task
from mtbert.data.readers import DataError, encode_dataset, read_task_file
from mtbert.data.tokenizer import BertTokenizer
from mtbert.modeling.encoder import default_backbone_dir

TOK = BertTokenizer.from_dir(default_backbone_dir(), max_length=32)
field = st.one_of(st.text(max_size=40), st.sampled_from(["", "0", "1.0", "4", "5.5", "nan", '"', '""x"', "\t"]),
                  st.text(alphabet=string.printable, max_size=20))
row = st.lists(field, min_size=0, max_size=7)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(rows=st.lists(row, max_size=12), task=st.sampled_from(["sst", "qqp", "sts", "cfimdb"]),
       labeled=st.booleans())
def test_readers_skip_and_count_or_fail_clearly(tmp_path_factory, rows, task, labeled):
    spec = get_task(task)
    header = ["", "id", *spec.text_columns] + ([spec.label_column] if labeled else [])
    path = tmp_path_factory.mktemp("fuzz") / "f.csv"
    path.write_text("\t".join(header) + "\n" + "\n".join("\t".join(r) for r in rows) + "\n", encoding="utf-8")
    examples, report = read_task_file(spec, path, labeled=labeled)
    assert len(examples) + report.skipped == report.rows
    for ex in examples:
        assert ex.id and all(t.strip() for t in ex.texts)
        if labeled and spec.kind.scores:
            lo, hi = spec.label_range
            assert lo <= ex.label <= hi
        elif labeled:
            assert ex.label in range(spec.num_labels)
    # every accepted example goes through tokenization within the length limit
    for mode in ("cross", "bi") if spec.is_pair else ("cross",):
        ds = encode_dataset(spec, examples, TOK, mode)
        assert all(len(ids) <= 32 and len(ids) == len(types) for x in ds.inputs for ids, types in x)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "f.csv"
    path.write_bytes(data)
    try:
        examples, report = read_task_file(get_task("qqp"), path)
    except DataError:
        return
    assert len(examples) + report.skipped == report.rows


@SETTINGS
@given(a=st.text(max_size=3000), b=st.text(max_size=3000))
def test_tokenizer_handles_any_unicode_and_huge_text(a, b):
    (ids, types), = TOK.encode_pairs([a], [b])
    assert len(ids) <= 32 and ids[0] == TOK.cls_id and ids.count(TOK.sep_id) >= 2
    (ids, _), = TOK.encode([a * 50])
    assert len(ids) <= 32 and ids[-1] == TOK.sep_id
