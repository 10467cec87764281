from PIL import Image

from splitnet import build_model, cut
from splitnet.accounting import model_cost
from splitnet.artifacts import read_manifest
from splitnet.models import CLASSES
from splitnet.plots import plot_assignment, plot_split_layers, plot_tree

from conftest import randomize


def test_pictures_are_real_pngs(tmp_path):
    model = randomize(build_model("wrn-10-1", 10, "1-2-4"))
    tree = cut(model)
    tree.save(tmp_path / "tree", dense_cost=model_cost(model, 32))
    paths = [
        plot_assignment(model.assignments.probs(CLASSES), tmp_path / "a.png", names=[str(i) for i in range(10)]),
        plot_split_layers([("fc", model.fc.weight, tree.hard.group_of(model.split_graph().features, 4),
                            tree.class_to_group)], tmp_path / "b.png"),
        plot_tree(read_manifest(tmp_path / "tree"), tmp_path / "t.png"),
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100
