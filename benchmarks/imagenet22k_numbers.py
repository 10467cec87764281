"""The full-size ImageNet-22K model's numbers: ResNet-50, layer4 + fc in 4 groups, 21,841 classes.

1. Dense vs split weights / params / FLOPs at 224 px (``pipelines.plan.plan``, balanced groups).
2. A real cut of a randomly initialised ResNet-50 4-4 with 21,841 WordNet classes, saved with
   ``tree.save``: each subtree's weight file, classes and parameters (and the trunk's).
3. Peak RSS (VmHWM) of a fresh process that loads one subtree with ``load_subtree`` and answers a
   batch of trunk features, next to one that loads the whole tree and one that holds the dense
   model (what a replica would cost without the split); ``import torch`` alone for reference.
4. WordNet coherence of the class groups vs random balanced groups: purity / NMI against the
   classes' WordNet parents (as ``report.json`` has it) and against their lexicographer file
   (noun.animal, noun.artifact, ...: ~20 coarse categories), and the mean WordNet path length
   between two classes of the same group vs of different groups (sampled pairs). From the
   rehearsal run's tree when ``--run`` is given, for the untrained cut of (2), and for a reference
   split along the hierarchy (WordNet's depth-first order cut into 4 equal runs): what a
   semantic split scores on the same measures.

    python benchmarks/imagenet22k_numbers.py [--run runs/in22k-rehearsal] [--out benchmarks/results/imagenet22k_numbers.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCH, SPLIT, CLASSES = "resnet50", "4-4", 21841

PROBE = r"""
import json, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch
torch.set_num_threads(1)
from splitnet import build_model
from splitnet.artifacts import load_subtree, load_tree
what, directory, g, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
after_import = hwm()
with torch.inference_mode():
    if what == "subtree":
        module, entry = load_subtree(directory, g)
        loaded = hwm()
        module(torch.zeros(shape))
    elif what == "tree":
        module = load_tree(directory)
        loaded = hwm()
        module(torch.zeros(shape))
    elif what == "dense":
        module = build_model(sys.argv[5], int(sys.argv[6]), "1").eval()
        loaded = hwm()
        module(torch.zeros(shape))
    else:
        loaded = after_import
print(json.dumps({"after_import": after_import, "loaded": loaded, "peak": hwm()}))
"""


def probe(what: str, tree_dir: str, g: int, shape: list[int], num_classes: int) -> dict:
    """VmHWM of a fresh process: after imports, after loading, and at the end (after a forward)."""
    r = subprocess.run([sys.executable, "-c", PROBE, what, tree_dir, str(g), json.dumps(shape), ARCH, str(num_classes)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(f"probe {what} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- WordNet coherence ----------------------------------------------------------------------

def ancestors(wnid: str, nouns) -> dict[str, int]:
    """Every hypernym of ``wnid`` (itself included) -> its shortest distance in hypernym edges."""
    dist, frontier = {wnid: 0}, [wnid]
    while frontier:
        nxt = []
        for w in frontier:
            for p in nouns[w].parents if w in nouns else ():
                if p not in dist:
                    dist[p] = dist[w] + 1
                    nxt.append(p)
        frontier = nxt
    return dist


def path_length(a: dict[str, int], b: dict[str, int]) -> int:
    """Shortest path between two synsets through a common hypernym (WordNet's path distance)."""
    small, large = (a, b) if len(a) < len(b) else (b, a)
    return min((d + large[w] for w, d in small.items() if w in large), default=40)


def mean_paths(groups: np.ndarray, anc: list[dict], rng: np.random.Generator, pairs: int) -> tuple[float, float]:
    """Mean path length of ``pairs`` random same-group pairs and ``pairs`` different-group pairs."""
    by_group = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    sizes = np.array([len(m) for m in by_group], float)
    within, across = [], []
    for g in rng.choice(len(by_group), size=pairs, p=sizes / sizes.sum()):
        a, b = rng.choice(by_group[g], 2, replace=False)
        within.append(path_length(anc[a], anc[b]))
    n = len(groups)
    while len(across) < pairs:
        a, b = rng.integers(0, n, 2)
        if groups[a] != groups[b]:
            across.append(path_length(anc[a], anc[b]))
    return float(np.mean(within)), float(np.mean(across))


def hierarchy_groups(wnids: list[str], nouns, groups: int) -> list[int]:
    """A semantic reference grouping: classes in WordNet's depth-first order (by the chain of first
    hypernyms from the root), cut into ``groups`` equal runs — what a split along the hierarchy scores."""
    def chain(w: str) -> tuple[str, ...]:
        out = [w]
        while out[-1] in nouns and nouns[out[-1]].parents and len(out) < 40:
            out.append(nouns[out[-1]].parents[0])
        return tuple(reversed(out))

    order = sorted(range(len(wnids)), key=lambda i: chain(wnids[i]))
    out = [0] * len(wnids)
    for rank, i in enumerate(order):
        out[i] = rank * groups // len(wnids)
    return out


def coherence(class_to_group, wnids: list[str], nouns, lex: dict[str, int], pairs: int, randoms: int) -> dict:
    """Purity / NMI vs WordNet parents and lexicographer files, and within/across-group path
    lengths, each next to mean ± std over ``randoms`` random balanced groupings."""
    from splitnet.metrics import semantic_quality

    groups = np.asarray(class_to_group)
    parents = [nouns[w].parents[0] if nouns[w].parents else "" for w in wnids]
    lexfile = [lex[w] for w in wnids]
    anc = [ancestors(w, nouns) for w in wnids]
    rng = np.random.default_rng(0)
    within, across = mean_paths(groups, anc, rng, pairs)
    balanced = np.arange(len(groups)) * len(np.unique(groups)) // len(groups)
    rand_gap = []
    for _ in range(randoms):
        w, a = mean_paths(rng.permutation(balanced), anc, rng, pairs)
        rand_gap.append(a - w)
    return {"vs_parent": semantic_quality(groups.tolist(), parents, num_random=randoms),
            "vs_lexicographer_file": semantic_quality(groups.tolist(), lexfile, num_random=randoms),
            "path_within": within, "path_across": across, "path_gap": across - within,
            "random_path_gap_mean": float(np.mean(rand_gap)), "random_path_gap_std": float(np.std(rand_gap)),
            "pairs": pairs, "randoms": randoms, "group_sizes": np.bincount(groups).tolist()}


# ---- main -----------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a rehearsal run dir (its tree's groups, report.json, stage times)")
    ap.add_argument("--classes", type=int, default=CLASSES)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8, help="images per forward in the memory probes")
    ap.add_argument("--pairs", type=int, default=4000, help="sampled class pairs per path-length mean")
    ap.add_argument("--randoms", type=int, default=20, help="random balanced groupings for the baselines")
    ap.add_argument("--out", default="benchmarks/results/imagenet22k_numbers.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from pipelines.data.synthetic import choose_wnids, lexicographer_files
    from splitnet import build_model, cut
    from pipelines.plan import plan
    from splitnet.accounting import model_cost
    from splitnet.artifacts import read_manifest
    from splitnet.wordnet import DEFAULT_PATH, load_nouns

    t0 = time.perf_counter()
    planned = plan(ARCH, SPLIT, args.classes, args.input_size)
    wnids = choose_wnids(args.classes)
    model = build_model(ARCH, args.classes, SPLIT).eval()
    dense_cost = model_cost(model, args.input_size)
    tree = cut(model, info={"class_names": wnids, "input_size": args.input_size,
                            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}).eval()
    with torch.inference_mode():
        features = list(tree.trunk(torch.zeros(1, 3, args.input_size, args.input_size)).shape)
    nouns, (lex, _) = load_nouns(), lexicographer_files(DEFAULT_PATH)
    with tempfile.TemporaryDirectory(prefix="in22k-tree-") as tmp:
        tree.save(tmp, input_size=args.input_size, dense_cost=dense_cost)
        manifest = read_manifest(tmp)
        untrained_groups = manifest["class_to_group"]
        del model, tree
        batch_features = [args.batch] + features[1:]
        memory = {"import_only": probe("import", tmp, 0, batch_features, args.classes),
                  "subtree": [probe("subtree", tmp, g, batch_features, args.classes) for g in range(len(manifest["subtrees"]))],
                  "tree": probe("tree", tmp, 0, [args.batch, 3, args.input_size, args.input_size], args.classes),
                  "dense": probe("dense", tmp, 0, [args.batch, 3, args.input_size, args.input_size], args.classes)}
    parts = {"trunk": {k: manifest["trunk"][k] for k in ("params", "weights", "flops", "file_bytes")},
             "subtrees": [{"name": s["name"], "classes": len(s["classes"]), "params": s["params"], "weights": s["weights"],
                           "flops": s["flops"], "file_bytes": s["file_bytes"]} for s in manifest["subtrees"]]}
    result = {"benchmark": "imagenet22k_numbers", "arch": ARCH, "split": SPLIT, "num_classes": args.classes,
              "input_size": args.input_size, "torch": torch.__version__, "cores": os.cpu_count(),
              "plan": {k: planned[k] for k in ("dense", "reduction", "ideal_speedup")} | {
                  "split": {k: v for k, v in planned["split_tree"].items() if k != "subtrees"}},
              "classifier_params": 2048 * args.classes + args.classes,
              "cut": {"counts": manifest["counts"], **parts}, "memory_probe_batch": args.batch, "memory": memory,
              "coherence": {"untrained_cut": coherence(untrained_groups, wnids, nouns, lex, args.pairs, args.randoms),
                            "wordnet_order": coherence(hierarchy_groups(wnids, nouns, len(parts["subtrees"])), wnids,
                                                       nouns, lex, args.pairs, args.randoms)}}
    if args.run:
        run = Path(args.run)
        rm = read_manifest(run / "tree")
        report = json.loads((run / "report.json").read_text())
        state = json.loads((run / "state.json").read_text())
        shards = Path(state["stages"]["prepare"]["result"]["data"]["shards"])
        prepared = json.loads((shards / "prepare.json").read_text()) if (shards / "prepare.json").is_file() else None
        result["rehearsal"] = {
            "run_dir": str(run), "counts": rm["counts"], "input_size": rm["input_size"],
            "report_semantic": report["semantic"], "stage_seconds": {k: v.get("seconds") for k, v in state["stages"].items()},
            "prepare": prepared, "subtree_classes": [len(s["classes"]) for s in rm["subtrees"]]}
        result["coherence"]["rehearsal"] = coherence(rm["class_to_group"], rm["class_names"], nouns, lex,
                                                     args.pairs, args.randoms)
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {args.out}")


def print_table(r: dict) -> None:
    mib = 2 ** 20
    d, s, red = r["plan"]["dense"], r["plan"]["split"], r["plan"]["reduction"]
    print(f"{r['arch']} split {r['split']}, {r['num_classes']} classes, {r['input_size']} px "
          f"(plan: balanced groups; the classifier alone is {r['classifier_params'] / 1e6:.2f}M params)")
    print(f"{'':10}{'weights':>10}{'params':>10}{'GFLOPs':>9}")
    for name, c in (("dense", d), ("split", s)):
        print(f"{name:10}{c['weights'] / 1e6:>9.2f}M{c['params'] / 1e6:>9.2f}M{c['flops'] / 1e9:>9.3f}")
    print(f"{'reduction':10}{red['weights']:>10.1%}{red['params']:>10.1%}{red['flops']:>9.1%}")
    cc = r["cut"]["counts"]
    print(f"random-init cut: dense {cc['dense']['params'] / 1e6:.2f}M -> tree {cc['split']['params'] / 1e6:.2f}M params "
          f"({cc['reduction']['params']:.1%} fewer), {cc['split']['flops'] / 1e9:.3f} GFLOPs")
    m = r["memory"]
    base = m["import_only"]["peak"]
    print(f"\n{'part':10}{'classes':>8}{'params':>9}{'GFLOPs':>8}{'file MiB':>9}{'peak RSS MiB':>13}{'(load)':>8}")
    t = r["cut"]["trunk"]
    print(f"{'trunk':10}{'':>8}{t['params'] / 1e6:>8.2f}M{t['flops'] / 1e9:>8.3f}{t['file_bytes'] / mib:>9.1f}")
    for sub, mem in zip(r["cut"]["subtrees"], m["subtree"]):
        print(f"{sub['name']:10}{sub['classes']:>8}{sub['params'] / 1e6:>8.2f}M{sub['flops'] / 1e9:>8.3f}"
              f"{sub['file_bytes'] / mib:>9.1f}{mem['peak'] / mib:>13.0f}{mem['loaded'] / mib:>8.0f}")
    print(f"peak RSS of a fresh process (batch {r['memory_probe_batch']}): import torch + splitnet {base / mib:.0f} MiB; "
          f"one subtree {max(x['peak'] for x in m['subtree']) / mib:.0f} MiB (max of {len(m['subtree'])}); "
          f"whole tree {m['tree']['peak'] / mib:.0f} MiB; dense model {m['dense']['peak'] / mib:.0f} MiB")
    print("\nWordNet coherence of the class groups (purity / NMI vs random balanced groups, mean ± std; "
          "path = mean hypernym path length, across minus within groups)")
    for name, c in r["coherence"].items():
        for ref in ("vs_parent", "vs_lexicographer_file"):
            q = c[ref]
            print(f"  {name:14} {ref:22} purity {q['purity']:.4f} (random {q['random_purity_mean']:.4f} ± "
                  f"{q['random_purity_std']:.4f})  NMI {q['nmi']:.4f} (random {q['random_nmi_mean']:.4f} ± "
                  f"{q['random_nmi_std']:.4f})")
        print(f"  {name:14} {'path gap':22} {c['path_gap']:+.3f} (within {c['path_within']:.2f}, across "
              f"{c['path_across']:.2f}; random {c['random_path_gap_mean']:+.3f} ± {c['random_path_gap_std']:.3f}); "
              f"group sizes {c['group_sizes']}")
    if "rehearsal" in r:
        h = r["rehearsal"]
        print(f"\nrehearsal {h['run_dir']}: {h['input_size']} px, tree {h['counts']['split']['params'] / 1e6:.2f}M params; "
              "stage seconds " + ", ".join(f"{k} {v:.0f}" for k, v in h["stage_seconds"].items() if v is not None))
        if h["prepare"]:
            p = h["prepare"]
            print(f"prepare of its shards: {p['images']} images, {p['classes']} classes from {p['layout']} in "
                  f"{p['seconds']:.1f} s ({p['images_per_s']:.0f} images/s written)")


if __name__ == "__main__":
    main()
