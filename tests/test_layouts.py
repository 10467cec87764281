"""Folder layouts users hold their images in: split folders (train/ val/ test/) are read as splits
with one class table, every ambiguous tree is refused with one line (exit 2), and a user's
class -> parent table becomes the class table's parent column. Real PNG/JPEG files on disk."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from datagen import WNIDS, make_split_imagefolder, write_images
from pipelines.cli import main
from pipelines.data.sources import LayoutError, list_source, read_parents, source_splits, write_class_table

CLASSES = ["bear", "cat", "dog"]


# ---- layouts that are read ------------------------------------------------------------------

def test_train_and_test_folders_are_splits_with_one_class_table(tmp_path):
    """The issue's layout: mydata/train/<class>/, mydata/test/<class>/ — was read as 2 classes."""
    make_split_imagefolder(tmp_path, ["dog", "bear", "cat"], {"train": 3, "test": 2})
    src = list_source(tmp_path)
    assert src.kind == "imagefolder-splits"
    assert src.classes == CLASSES  # sorted, not the split folders
    assert {s: len(v) for s, v in src.items.items()} == {"train": 9, "test": 6}
    for split, items in src.items.items():
        for it in items:
            assert it.split == split and it.key.startswith(f"{split}/")
            assert Path(it.ref).parent.name == src.classes[it.label]  # one label per class name in every split
            assert Path(it.ref).parent.parent.name == split
    assert len({it.key for v in src.items.values() for it in v}) == 15  # keys unique across splits
    assert src.warnings == []
    assert source_splits(tmp_path) == ["test", "train"]


def test_validation_folder_is_the_val_split_and_missing_eval_classes_warn(tmp_path):
    make_split_imagefolder(tmp_path, CLASSES, {"train": 2, "validation": 1, "test": 1}, fmt="jpg",
                           missing={"test": ["cat"]})
    src = list_source(tmp_path)
    assert set(src.items) == {"train", "val", "test"} and src.classes == CLASSES
    assert len(src.items["val"]) == 3 and len(src.items["test"]) == 2
    # a train class without images in test is allowed (long-tail eval sets) but said out loud
    assert len(src.warnings) == 1 and src.warnings[0].startswith("test: 1 of train's 3 classes") and "cat" in src.warnings[0]


def test_flat_imagefolder_still_reads_a_class_named_train(tmp_path):
    """root/<class>/: CIFAR-100 has a class called "train"; next to other classes it is a class."""
    for c, name in enumerate(["apple", "train", "tulip"]):
        write_images(tmp_path / name, 2, seed=c * 10)
    (tmp_path / "README.txt").write_text("not an image")  # non-image files at the top are not images
    (tmp_path / "apple" / "notes.txt").write_text("skipped, and reported")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden entries are skipped
    src = list_source(tmp_path)
    assert src.kind == "imagefolder" and src.classes == ["apple", "train", "tulip"]
    assert list(src.items) == ["train"] and len(src.items["train"]) == 6
    assert [it.key for it in src.items["train"][:2]] == ["apple/img0", "apple/img1"]
    assert len(src.warnings) == 1 and "apple/notes.txt" in src.warnings[0]
    assert source_splits(tmp_path) == ["train"]


def test_two_files_with_one_stem_get_two_keys(tmp_path):
    for name in CLASSES:
        write_images(tmp_path / name, 1)
    write_images(tmp_path / "cat", 1, fmt="jpg")  # cat/img0.png and cat/img0.jpg
    keys = [it.key for it in list_source(tmp_path).items["train"]]
    assert len(keys) == len(set(keys)) == 4 and "cat/img0_png" in keys


# ---- layouts that are refused ---------------------------------------------------------------

def _images_next_to_class_folders(root):
    make_split_imagefolder(root, CLASSES, {"train": 2})
    write_images(root / "train", 1)  # train/img0.png next to train/bear/


def _images_next_to_class_folders_at_the_top(root):
    for name in CLASSES:
        write_images(root / name, 2)
    write_images(root, 1, fmt="jpg")


def _class_folders_nested_deeper(root):
    write_images(root / "animals" / "dog", 2)
    write_images(root / "animals" / "cat", 2)
    write_images(root / "plants", 2)


def _nested_inside_a_split(root):
    make_split_imagefolder(root, CLASSES, {"train": 2, "test": 1})
    write_images(root / "train" / "cat" / "kittens", 1)


def _test_class_not_in_train(root):
    make_split_imagefolder(root, CLASSES, {"train": 2})
    make_split_imagefolder(root, ["bear", "cat", "Dog"], {"test": 1})


def _validation_class_not_in_train(root):
    make_split_imagefolder(root, CLASSES, {"train": 2})
    make_split_imagefolder(root, ["cat", "emu"], {"validation": 1})


def _single_class(root):
    write_images(root / "images", 3)


def _single_class_in_splits(root):
    make_split_imagefolder(root, ["cat"], {"train": 2, "test": 1})


def _empty_class_folder(root):
    make_split_imagefolder(root, CLASSES, {"train": 2})
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "Thumbs.db").write_bytes(b"x")


def _split_folders_next_to_class_folders(root):
    make_split_imagefolder(root, CLASSES, {"train": 2})
    write_images(root / "extra", 2)


def _split_named_folders_holding_images(root):
    write_images(root / "train", 3)  # the tree one level short: no class folders at all
    write_images(root / "test", 2)


def _val_and_validation(root):
    make_split_imagefolder(root, CLASSES, {"train": 2, "val": 1, "validation": 1})


def _no_train_split(root):
    make_split_imagefolder(root, CLASSES, {"val": 1, "test": 1})


def _test_split_holding_images(root):
    make_split_imagefolder(root, CLASSES, {"train": 2})
    write_images(root / "test", 2)


def _only_images(root):
    write_images(root, 3)


REFUSED = {
    "images_next_to_class_folders": (_images_next_to_class_folders, "images (img0.png) mixed with class folders"),
    "images_next_to_class_folders_at_the_top": (_images_next_to_class_folders_at_the_top,
                                                "images (img0.jpg) mixed with class folders"),
    "class_folders_nested_deeper": (_class_folders_nested_deeper, "animals: class folder holding a folder (cat/)"),
    "nested_inside_a_split": (_nested_inside_a_split, "cat: class folder holding a folder (kittens/)"),
    "test_class_not_in_train": (_test_class_not_in_train, "class folder(s) 'Dog' not in train/ (did you mean 'dog'?)"),
    "validation_class_not_in_train": (_validation_class_not_in_train, "validation: class folder(s) 'emu' not in train/:"),
    "single_class": (_single_class, "a single class (images)"),
    "single_class_in_splits": (_single_class_in_splits, "a single class (cat)"),
    "empty_class_folder": (_empty_class_folder, "emu: empty class folder"),
    "split_folders_next_to_class_folders": (_split_folders_next_to_class_folders,
                                            "split folders (train/) next to other folders (extra/)"),
    "split_named_folders_holding_images": (_split_named_folders_holding_images,
                                           "the folders test/, train/ are named like splits but hold images directly"),
    "val_and_validation": (_val_and_validation, "both val/ and validation/ are the val split"),
    "no_train_split": (_no_train_split, "but no train/"),
    "test_split_holding_images": (_test_split_holding_images, "test: holds images (img0.png) directly, no class folders"),
    "only_images": (_only_images, "images (img0.png) but no class folders"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_ambiguous_layouts_are_refused_naming_the_folder(tmp_path, case, capsys):
    build, fragment = REFUSED[case]
    build(tmp_path / "data")
    with pytest.raises(LayoutError) as err:
        list_source(tmp_path / "data")
    message = str(err.value)
    assert fragment in message and "\n" not in message, message
    # the CLI: the same line, exit status 2, no traceback, nothing written
    assert main(["prepare", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"splitnet: error: {message}"]
    assert not (tmp_path / "out").exists()


def test_the_classes_a_tree_grows_by_may_be_one(tmp_path):
    """A training source needs two classes; ``splitnet grow`` lists its source with min_classes=1."""
    _single_class_in_splits(tmp_path / "one")
    src = list_source(tmp_path / "one", min_classes=1)
    assert src.classes == ["cat"] and len(src.items["train"]) == 2 and len(src.items["test"]) == 1
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="not a CIFAR-100 folder"):  # no class at all: not a source
        list_source(tmp_path / "none", min_classes=1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("case", ["images_next_to_class_folders", "class_folders_nested_deeper",
                                  "test_class_not_in_train", "single_class", "empty_class_folder"])
@pytest.mark.integration  # a subprocess run of the CLI
def test_splitnet_prepare_refuses_in_one_line_with_exit_2(tmp_path, case):
    """The issue's five refusals through the real command line."""
    build, fragment = REFUSED[case]
    build(tmp_path / "data")
    r = _cli(str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitnet: error: ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


# ---- the parents table ----------------------------------------------------------------------

def test_parents_table_with_or_without_header(tmp_path):
    path = tmp_path / "parents.tsv"
    path.write_text("class\tparent\n# comment\n\ncat\tmammal\r\ndog\tmammal\nbear\t\n")
    assert read_parents(path, CLASSES) == ["", "mammal", "mammal"]  # bear: empty parent, no parent
    path.write_text("\ufeffdog\tcanine\ncat\tfeline\n")  # no header, a spreadsheet's BOM
    assert read_parents(path, CLASSES) == ["", "feline", "canine"]
    path.write_text("Class\tParent\ncat\tfeline\n")
    assert read_parents(path, ["cat", "dog"]) == ["feline", ""]  # dog: not listed, no parent
    assert read_parents(path, ["cat", "Class"]) == ["feline", "Parent"]  # a class called "Class" is no header


@pytest.mark.parametrize("text,fragment", [
    ("cat\tmammal\ndgo\tmammal\n", "parents.tsv:2: unknown class 'dgo' (the dataset has 3 classes; did you mean 'dog'?)"),
    ("cat mammal\n", "parents.tsv:1: expected 2 tab-separated fields (class<TAB>parent), got 1"),
    ("cat\tmammal\textra\n", "got 3"),
    ("cat\tmammal\ncat\tbird\n", "parents.tsv:2: class 'cat' already has parent 'mammal' (line 1)"),
])
def test_bad_parents_table_is_one_line(tmp_path, text, fragment):
    (tmp_path / "parents.tsv").write_text(text)
    with pytest.raises(ValueError) as err:
        read_parents(tmp_path / "parents.tsv", CLASSES)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_parents_cli_errors_exit_2(tmp_path):
    make_split_imagefolder(tmp_path / "data", CLASSES, {"train": 1})
    (tmp_path / "parents.tsv").write_text("cat\tmammal\nemu\tbird\n")
    assert main(["prepare", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                 "--parents", str(tmp_path / "parents.tsv")]) == 2
    assert main(["prepare", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                 "--parents", str(tmp_path / "nope.tsv")]) == 2
    assert not (tmp_path / "out").exists()


def test_class_table_takes_the_parents(tmp_path):
    rows = write_class_table(tmp_path, CLASSES, ["mammal", "mammal", ""])
    assert [(r["name"], r["parent"]) for r in rows] == [("bear", "mammal"), ("cat", "mammal"), ("dog", "")]
    lines = (tmp_path / "classes.tsv").read_text().splitlines()
    assert lines[1] == "0\tbear\tbear\tmammal\tmammal" and lines[3] == "2\tdog\tdog\t\t"


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="needs Debian's wordnet-base")
def test_a_parents_table_replaces_wordnet_parents_for_wnids(tmp_path):
    rows = write_class_table(tmp_path, WNIDS, ["fish", "pet", "pet"])
    assert [r["lemma"] for r in rows] == ["tench", "dog", "domestic cat"]  # WordNet lemmas stay
    assert [r["parent"] for r in rows] == ["fish", "pet", "pet"]
    assert json.loads((tmp_path / "classes.json").read_text())[1]["parent_name"] == "pet"


# ---- one real prepare through Ray, as `splitnet run` does it ----------------------------------

def test_run_prepares_split_folders_and_evaluates_on_val(ray_cluster, tmp_path):
    """`splitnet run` with data.source = a train/ validation/ test/ tree, data.eval_split=val and
    data.parents: val-* shards, one class table with the user's parents, labels by class name."""
    from pipelines.config import load_config
    from pipelines.data.stream import list_shards
    from pipelines.rundir import RunDir
    from pipelines.run import _prepare

    classes = ["ant", "bee", "cat", "dog"]
    make_split_imagefolder(tmp_path / "data", classes, {"train": 5, "validation": 3, "test": 3})
    (tmp_path / "parents.tsv").write_text("class\tparent\nant\tinsect\nbee\tinsect\ncat\tmammal\n")
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml",
                      [f"data.source={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", "data.eval_split=val",
                       "data.per_class=4", "data.eval_per_class=2", f"data.parents={tmp_path / 'parents.tsv'}",
                       "data.shard_size=5", "data.classes=[]"])  # every class (the demo keeps 20 of CIFAR-100's)
    lines = []
    info = _prepare(cfg, RunDir(str(tmp_path / "run")), {"stages": {}}, lines.append)
    assert info.class_names == classes and info.parents == ["insect", "insect", "mammal", ""]
    assert info.eval_split == "val" and info.eval_subset == "train" and info.train_records == 16
    assert any("parents from" in ln and "3 of 4 classes, 2 parents" in ln and "(dog)" in ln for ln in lines), lines
    shards = tmp_path / "run" / "shards"
    summary = json.loads((shards / "prepare.json").read_text())
    assert summary["layout"] == "imagefolder-splits" and summary["images_by_split"] == {"train": 16, "val": 8, "test": 8}
    table = (shards / "classes.tsv").read_text().splitlines()
    assert table[1].split("\t")[3] == "insect" and table[4].split("\t")[3] == ""
    for split, folder in (("train", "train"), ("val", "validation"), ("test", "test")):
        _, paths, fmt = list_shards(str(shards), split)
        assert fmt == "parquet" and all(Path(p).name.startswith(f"{split}-") for p in paths)
        rows = pq.read_table(paths, columns=["key", "label"]).to_pylist()
        assert rows and all(r["key"].startswith(f"{split}/") for r in rows)
        for r in rows:  # the label is the class folder's index in the shared table, in every split
            assert classes[r["label"]] == r["key"].split("/")[1]
            assert (tmp_path / "data" / folder / r["key"].split("/")[1] / (r["key"].split("/")[2] + ".png")).exists()


def test_run_refuses_an_eval_split_the_source_lacks_before_converting(tmp_path):
    from pipelines.config import load_config
    from pipelines.rundir import RunDir
    from pipelines.run import PipelineError, _prepare

    make_split_imagefolder(tmp_path / "data", CLASSES, {"train": 2, "val": 1})
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml",
                      [f"data.source={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", "data.eval_split=test"])
    with pytest.raises(PipelineError, match="has no test split \\(it has train, val\\); set data.eval_split to val"):
        _prepare(cfg, RunDir(str(tmp_path / "run")), {"stages": {}}, lambda _: None)
    assert not (tmp_path / "run" / "shards").exists()


def test_data_parents_for_shards_read_as_they_are(tmp_path):
    """data.source = shards made elsewhere: the parents table applies to the run's class table
    (the user's shard folder is not written to); a bad table is one PipelineError line."""
    from datagen import png

    from pipelines.config import ConfigError, load_config
    from pipelines.data.sources import write_parquet_shard
    from pipelines.rundir import RunDir
    from pipelines.run import PipelineError, _prepare

    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet_shard(str(shards / "train-00000.parquet"), [f"k{i}" for i in range(6)],
                        [png(seed=i) for i in range(6)], [i % 3 for i in range(6)])
    write_class_table(shards, CLASSES)
    before = (shards / "classes.tsv").read_text()
    (tmp_path / "parents.tsv").write_text("bear\twild\ncat\tpet\ndog\tpet\n")
    overrides = [f"data.source={shards}", "data.eval_split=", "data.val_fraction=0.5",
                 f"data.parents={tmp_path / 'parents.tsv'}"]
    # the demo's class subset cannot apply to shards read as they are: refused, not ignored
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml", overrides + [f"run_dir={tmp_path / 'run0'}"])
    with pytest.raises(PipelineError, match=r"^data.classes: .* holds prepared shards, read as they are"):
        _prepare(cfg, RunDir(str(tmp_path / "run0")), {"stages": {}}, lambda _: None)
    overrides.append("data.classes=[]")
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml", overrides + [f"run_dir={tmp_path / 'run'}"])
    info = _prepare(cfg, RunDir(str(tmp_path / "run")), {"stages": {}}, lambda _: None)
    assert info.parents == ["wild", "pet", "pet"] and info.train_records == 3
    assert (shards / "classes.tsv").read_text() == before
    (tmp_path / "parents.tsv").write_text("bear\twild\ncow\tfarm\n")
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml", overrides + [f"run_dir={tmp_path / 'run2'}"])
    with pytest.raises(PipelineError, match=r"^data.parents: .*parents.tsv:2: unknown class 'cow'"):
        _prepare(cfg, RunDir(str(tmp_path / "run2")), {"stages": {}}, lambda _: None)
    with pytest.raises(ConfigError, match="data.parents: 's3://b/p.tsv': must be a local file"):
        load_config(ROOT / "pipelines/configs/demo.yaml", ["data.parents=s3://b/p.tsv"])
