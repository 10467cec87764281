"""ILSVRC-2012 as users download it: the official tars with the devkit, Kaggle's copy, and the common
train/<wnid>/ + val/<wnid>/ folders, each built here as a tiny synthetic copy (real WordNet wnids,
a fake devkit whose meta.mat gives the class IDs in a shuffled order, as the real one does) and
prepared. Every validation image's label is checked against the image itself: the generator
paints each (class, index) differently."""
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datagen import make_split_imagefolder
from pipelines.cli import main
from pipelines.data.ilsvrc import GROUND_TRUTH, META
from pipelines.data.sources import LayoutError, list_source, read_item, source_splits
from pipelines.data.synthetic import Painter, choose_wnids, generate

pytestmark = pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="needs Debian's wordnet-base")

CLASSES, PER_CLASS, VAL_PER_CLASS, SIZE = 6, 2, 2, 24


@pytest.fixture(scope="module", params=["ilsvrc2012", "ilsvrc2012-kaggle"])
def release(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    generate(root, classes=CLASSES, per_class=PER_CLASS, size=SIZE, layout=request.param, val_per_class=VAL_PER_CLASS,
             log=lambda _: None)
    return request.param, root


def _check_labels(src):
    """Every image's bytes are what the generator painted for its (class, index)."""
    wnids = choose_wnids(CLASSES)
    painter = Painter(wnids, SIZE)
    assert src.classes == sorted(wnids)
    for split, items in src.items.items():
        for item in items:
            label = wnids.index(src.classes[item.label])
            stem = item.key.rsplit("/", 1)[-1]
            index = int(stem.rsplit("_", 1)[1])
            expected = painter.jpeg(label, index if split == "train" else PER_CLASS + index)
            assert read_item(item) == expected, (split, item.key)


def test_a_release_is_listed_in_place_with_its_validation_labels(release):
    layout, root = release
    src = list_source(root)
    assert src.kind == layout and source_splits(root) == ["train", "val"]
    assert {s: len(v) for s, v in src.items.items()} == {"train": CLASSES * PER_CLASS, "val": CLASSES * VAL_PER_CLASS}
    _check_labels(src)
    where = "ILSVRC2012_devkit_t12.tar.gz" if layout == "ilsvrc2012" else "LOC_val_solution.csv"
    assert src.notes[0] == f"val labels from {root / where}" and src.warnings == []
    if layout == "ilsvrc2012":  # read in place: offsets into the outer tars, the nested ones included
        assert {Path(it.ref).name for it in src.items["train"]} == {"ILSVRC2012_img_train.tar"}
        assert {Path(it.ref).name for it in src.items["val"]} == {"ILSVRC2012_img_val.tar"}


def test_an_unpacked_devkit_or_its_two_files_label_the_same(tmp_path):
    generate(tmp_path / "r", classes=CLASSES, per_class=1, size=SIZE, layout="ilsvrc2012", val_per_class=1,
             log=lambda _: None)
    expected = [(it.key, it.label) for it in list_source(tmp_path / "r").items["val"]]
    packed = tmp_path / "r" / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(packed) as tf:
        tf.extractall(tmp_path / "r", filter="data")
    packed.unlink()
    assert [(it.key, it.label) for it in list_source(tmp_path / "r").items["val"]] == expected
    data = tmp_path / "r" / "ILSVRC2012_devkit_t12" / "data"
    for name in (GROUND_TRUTH, META):
        (data / Path(name).name).rename(tmp_path / "r" / Path(name).name)
    src = list_source(tmp_path / "r")
    assert [(it.key, it.label) for it in src.items["val"]] == expected and src.notes == [f"val labels from {tmp_path / 'r'}"]


def test_the_common_folders_name_classes_by_wnid_with_lemmas(ray_cluster, tmp_path, capsys):
    wnids = ["n01440764", "n02084071", "n02121808"]  # tench, dog, domestic cat
    make_split_imagefolder(tmp_path / "data", wnids, {"train": 2, "val": 1}, fmt="jpg")
    assert main(["prepare", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    table = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert [(r["name"], r["lemma"]) for r in table] == [("n01440764", "tench"), ("n02084071", "dog"),
                                                          ("n02121808", "domestic cat")]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["train-00000.parquet", "val-00000.parquet"]


def test_splitnet_prepare_writes_train_and_val_shards_named_by_wnid(ray_cluster, release, tmp_path, capsys):
    layout, root = release
    assert main(["prepare", str(root), "--out", str(tmp_path / "out"), "--shard-size", "5"]) == 0
    out = capsys.readouterr().out
    assert f"prepare: {layout} at {root}: {CLASSES * (PER_CLASS + VAL_PER_CLASS)} images" in out and "val labels from" in out
    summary = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert summary["images_by_split"] == {"train": CLASSES * PER_CLASS, "val": CLASSES * VAL_PER_CLASS}
    assert summary["layout"] == layout and summary["bad_records"] == 0
    from splitnet.wordnet import load_nouns

    nouns = load_nouns()
    table = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert [r["name"] for r in table] == sorted(choose_wnids(CLASSES))
    assert all(r["lemma"] == nouns[r["name"]].lemma and r["parent"] in nouns for r in table)
    # the val shards keep the labels the devkit / the CSV gave
    src = list_source(root)
    want = {it.key: it.label for it in src.items["val"]}
    got = {}
    for shard in sorted((tmp_path / "out").glob("val-*.parquet")):
        t = pq.read_table(shard, columns=["key", "label"]).to_pydict()
        got.update(zip(t["key"], t["label"]))
    assert got == want


# ---- refused in one line ------------------------------------------------------------------------

def _release(tmp_path, layout="ilsvrc2012") -> Path:
    root = tmp_path / "data"
    generate(root, classes=3, per_class=1, size=16, layout=layout, val_per_class=1, log=lambda _: None)
    return root


def _no_labels(tmp_path):
    root = _release(tmp_path)
    (root / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    return root


def _devkit_without_meta(tmp_path):
    root = _release(tmp_path)
    packed = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(packed) as tf:
        truth = tf.extractfile(f"ILSVRC2012_devkit_t12/{GROUND_TRUTH}").read()
    with tarfile.open(packed, "w:gz") as tf:
        import io

        info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{GROUND_TRUTH}")
        info.size = len(truth)
        tf.addfile(info, io.BytesIO(truth))
    return root


def _kaggle_csv_without_header(tmp_path):
    root = _release(tmp_path, "ilsvrc2012-kaggle")
    csv = root / "LOC_val_solution.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[1:]) + "\n")
    return root


def _kaggle_label_not_a_class(tmp_path):
    root = _release(tmp_path, "ilsvrc2012-kaggle")
    csv = root / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ",n09999999 1 1 2 2"
    csv.write_text("\n".join(lines) + "\n")
    return root


def _labels_of_another_copy(tmp_path):
    root = _release(tmp_path, "ilsvrc2012-kaggle")
    csv = root / "LOC_val_solution.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")  # the last image has no row
    return root


def _val_without_train(tmp_path):
    root = _release(tmp_path)
    (root / "ILSVRC2012_img_train.tar").unlink()
    return root


def _ground_truth_id_not_in_meta(tmp_path):
    root = _release(tmp_path)
    packed = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(packed) as tf:
        tf.extractall(root, filter="data")
    packed.unlink()
    truth = root / "ILSVRC2012_devkit_t12" / GROUND_TRUTH
    truth.write_text("4\n" + "".join(line + "\n" for line in truth.read_text().split()[1:]))  # 4: the parent synset
    return root


REFUSED = {
    "no_labels": (_no_labels, "validation images without labels: put the development kit"),
    "devkit_without_meta": (_devkit_without_meta, "no data/meta.mat inside: not the ILSVRC2012 development kit"),
    "csv_without_header": (_kaggle_csv_without_header, "expected the header ImageId,PredictionString"),
    "label_not_a_class": (_kaggle_label_not_a_class, "is labelled n09999999, a class the train split does not have"),
    "labels_of_another_copy": (_labels_of_another_copy, "1 of 3 validation images have no label"),
    "val_without_train": (_val_without_train, "ILSVRC2012_img_val.tar without ILSVRC2012_img_train.tar"),
    "ground_truth_id_not_in_meta": (_ground_truth_id_not_in_meta, "line 1: '4' is not an ILSVRC2012_ID"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_release_whose_labels_cannot_be_found_is_refused_in_one_line(tmp_path, case, capsys):
    build, fragment = REFUSED[case]
    root = build(tmp_path)
    with pytest.raises(LayoutError) as err:
        list_source(root)
    message = str(err.value)
    assert fragment in message and "\n" not in message, message
    assert main(["prepare", str(root), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"splitnet: error: {message}"]
    assert not (tmp_path / "out").exists()


def test_ids_are_not_assumed_in_wnid_order(release):
    """The fake devkit numbers the classes in a shuffled order, as the real one does (ID 1 is
    n02119789, kit fox): labels read by assuming sorted IDs would fail :func:`_check_labels`."""
    layout, root = release
    if layout != "ilsvrc2012":
        pytest.skip("the devkit's IDs")
    from scipy.io import loadmat

    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz") as tf:
        synsets = loadmat(tf.extractfile(f"ILSVRC2012_devkit_t12/{META}"), squeeze_me=True)["synsets"]
    leaves = [(int(i), str(w)) for i, w, c in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"])
              if int(c) == 0]
    assert [w for _, w in sorted(leaves)] != sorted(w for _, w in leaves)
    assert np.any(synsets["num_children"].astype(int) > 0)  # a parent synset in meta.mat is not a class
