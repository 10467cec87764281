"""``splitnet prepare``: convert a source layout into shuffled, evenly sized shards with Ray Data.

The driver lists the source (no pixels read), shuffles the items with a seed and cuts them into
shards whose sizes differ by at most one image. The plan is written to ``_plan.json``; each shard
is then one row of a Ray Data job whose ``map`` reads its images, checks their headers, and writes
the shard under a temporary name before renaming it. Re-running skips shards that exist (the
plan must match, so a resumed run can never mix two different shufflings).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.config import ON_BAD_RECORD

from .records import DEFAULT_MAX_PIXELS, BadImage, BadRecord, BadRecordError, open_image
from .sources import (Item, list_source, read_item, read_parents, write_class_table, write_parquet_shard,
                      write_webdataset_shard)

FORMATS = ("parquet", "webdataset")


class PrepareError(ValueError):
    """Bad input to prepare (printed as one line by the CLI)."""


def _check_header(data: bytes, max_pixels: int) -> None:
    """Cheap validation: the header must parse and be within the pixel limit (no full decode)."""
    if not data:
        raise BadImage("empty", "zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise BadImage("too_large", f"{im.width}x{im.height} > {max_pixels} pixels")
    except UnidentifiedImageError:
        raise BadImage("not_image", f"{len(data)} bytes Pillow cannot identify") from None
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None


def write_shard(row: dict, fmt: str, validate: str, on_bad_record: str, max_pixels: int,
                arrays: dict | None = None) -> dict:
    """Write one planned shard (a Ray Data ``map`` function). Returns its stats and bad records.

    ``arrays``: {npz path: ObjectRef of its pixel array} for CIFAR sources, put in the object
    store once so that every shard task reads them zero-copy instead of re-loading the file.
    """
    import ray

    items = [Item.from_row(r) for r in json.loads(row["items"])]
    path = row["path"]
    keys, images, labels, bad = [], [], [], []
    cache: dict = {k: ray.get(v) for k, v in (arrays or {}).items()}
    for item in items:
        data = read_item(item, cache)
        try:
            if validate == "full":
                open_image(data, max_pixels)
            elif validate == "header":
                _check_header(data, max_pixels)
        except BadImage as e:
            if on_bad_record == "fail":
                raise BadRecordError(f"bad record in source {item.ref}: key {item.key}: {e.kind} ({e.detail})") from None
            bad.append(BadRecord(e.kind, item.key, os.path.basename(path), e.detail).as_dict())
            continue
        keys.append(item.key)
        images.append(data)
        labels.append(item.label)
    tmp = path + ".tmp"
    nbytes = (write_parquet_shard if fmt == "parquet" else write_webdataset_shard)(tmp, keys, images, labels)
    os.replace(tmp, path)
    stats = {"shard": os.path.basename(path), "planned": len(items), "images": len(keys), "bytes": nbytes, "bad": bad}
    Path(path + ".done.json").write_text(json.dumps(stats))
    return {"shard": stats["shard"], "images": len(keys), "bytes": nbytes, "bad_count": len(bad)}


def unwrap_bad_record(error: BaseException) -> BaseException:
    """The BadRecordError inside a Ray task/Data exception chain (or ``error`` itself)."""
    seen = error
    while seen is not None:
        if isinstance(seen, BadRecordError):
            return BadRecordError(str(seen).splitlines()[-1].split("BadRecordError: ")[-1])
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    if "BadRecordError: " in text:
        return BadRecordError(text.split("BadRecordError: ")[-1].splitlines()[0])
    return error


def make_plan(items: list[Item], shard_size: int, seed: int) -> list[list[Item]]:
    """Shuffle (seeded) and cut into ceil(n / shard_size) shards whose sizes differ by at most 1."""
    if not items:
        return []
    order = np.random.default_rng(seed).permutation(len(items))
    count = -(-len(items) // shard_size)
    return [[items[i] for i in chunk] for chunk in np.array_split(order, count)]


def class_subset(items: list[Item], per_class: int, seed: int) -> list[Item]:
    """At most ``per_class`` items of each label, drawn with ``seed`` (source order kept)."""
    if per_class <= 0:
        return items
    rng = np.random.default_rng([seed, per_class])
    by_label: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_label.setdefault(it.label, []).append(i)
    keep = []
    for idx in by_label.values():
        keep.extend(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False).tolist())
    return [items[i] for i in sorted(keep)]


def select_classes(src, wanted: list[str]) -> None:
    """Keep only the classes named in ``wanted`` (class names, or parent names standing for all
    their classes, e.g. CIFAR-100 superclasses), relabelled 0..K-1 in the source's class order.
    In place on ``src`` (a :class:`~pipelines.data.sources.Source`); an unknown name is an error."""
    parents = src.parents or [""] * len(src.classes)
    keep = set()
    for name in wanted:
        hits = [i for i, c in enumerate(src.classes) if c == name] or [i for i, p in enumerate(parents) if p == name]
        if not hits:
            close = difflib.get_close_matches(name, list(src.classes) + [p for p in set(parents) if p], n=1)
            raise ValueError(f"classes: {name!r} is neither a class nor a parent of the source"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        keep.update(hits)
    if len(keep) < 2:
        raise ValueError(f"classes: {wanted} selects {len(keep)} class; a split needs at least 2")
    old = sorted(keep)
    new_label = {o: n for n, o in enumerate(old)}
    for split, items in src.items.items():
        src.items[split] = [dataclasses.replace(it, label=new_label[it.label]) for it in items if it.label in new_label]
    src.classes = [src.classes[o] for o in old]
    if src.parents:
        src.parents = [src.parents[o] for o in old]


def parents_line(path, classes: list[str], parents: list[str]) -> str:
    """One log line: how many classes a parents table covers, and what the report can score."""
    missing = [c for c, p in zip(classes, parents) if not p]
    line = (f"prepare: parents from {path}: {len(classes) - len(missing)} of {len(classes)} classes, "
            f"{len(set(p for p in parents if p))} parents")
    if missing:
        line += (f"; {len(missing)} without a parent ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}) "
                 "are left out of the semantic score")
    if len(set(p for p in parents if p)) < 2:
        line += "; fewer than 2 parents: the report cannot score the groups against them"
    return line


def prepare(source: str, out: str, fmt: str = "parquet", shard_size: int = 1000, seed: int = 0,
            validate: str = "header", on_bad_record: str = "skip", max_pixels: int = DEFAULT_MAX_PIXELS,
            concurrency: int | None = None, per_class: dict[str, int] | int | None = None,
            parents: str | os.PathLike | None = None, classes: list[str] | None = None,
            log: Callable[[str], None] = print, min_classes: int = 2) -> dict:
    """Convert ``source`` into shards under ``out``; returns the summary (also ``out/prepare.json``).

    Every split of the source gets its own shards (``train-00000.parquet``, ``val-...``,
    ``test-...``) and all share one class table. per_class: keep at most this many images of each
    class (an int for every split, or ``{"train": 100, "test": 20}``): class-balanced subsets for
    short schedules and rehearsals. parents: a ``class<TAB>parent`` TSV (see
    :func:`~pipelines.data.sources.read_parents`) written as the class table's parent column,
    so the report scores the groups against it; it replaces the source's own parents. classes:
    keep only these classes (names, or parent names such as CIFAR-100 superclasses), relabelled.
    """
    if fmt not in FORMATS:
        raise PrepareError(f"invalid --format {fmt!r}: use one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise PrepareError(f"invalid --shard-size {shard_size}: must be >= 1")
    if validate not in ("none", "header", "full"):
        raise PrepareError(f"invalid --validate {validate!r}: use none, header or full")
    if on_bad_record not in ON_BAD_RECORD:
        raise PrepareError(f"invalid --on-bad-record {on_bad_record!r}: use {' or '.join(ON_BAD_RECORD)}")
    t0 = time.perf_counter()
    try:
        src = list_source(source, min_classes)
        if parents:
            src.parents = read_parents(parents, src.classes)
        if classes:
            select_classes(src, list(classes))
    except (ValueError, OSError) as e:  # LayoutError and the parents file's errors are one line each
        raise PrepareError(str(e)) from None
    for note in src.notes:
        log(f"prepare: {note}")
    for warning in src.warnings:
        log(f"prepare: warning: {warning}")
    if parents:
        log(parents_line(parents, src.classes, src.parents))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, plan_digest = [], hashlib.sha256()
    ext = "parquet" if fmt == "parquet" else "tar"
    limits = per_class if isinstance(per_class, dict) else {s: per_class or 0 for s in src.items}
    for split in src.items:
        src.items[split] = class_subset(src.items[split], limits.get(split, 0), seed)
    for split, items in src.items.items():
        for i, shard in enumerate(make_plan(items, shard_size, seed)):
            path = str(out_dir / f"{split}-{i:05d}.{ext}")
            plan_digest.update(f"{path}:{','.join(it.key for it in shard)}\n".encode())
            # JSON text: a plain string column for Arrow (a list of mixed-type rows would be pickled)
            rows.append({"path": path, "items": json.dumps([it.to_row() for it in shard]), "planned": len(shard)})
    plan = {"source": str(Path(source).resolve()), "layout": src.kind, "format": fmt, "shard_size": shard_size,
            "seed": seed, "classes": src.classes, "shards": len(rows), "images": {s: len(v) for s, v in src.items.items()},
            "digest": plan_digest.hexdigest()}
    plan_path = out_dir / "_plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old.get("digest") != plan["digest"]:
            raise PrepareError(f"{out_dir} holds shards of a different plan (source, format, shard size or seed "
                               "changed); use a new --out")
    plan_path.write_text(json.dumps(plan, indent=1))
    write_class_table(out_dir, src.classes, src.parents)
    todo = [r for r in rows if not Path(r["path"] + ".done.json").exists()]
    splits = ", ".join(f"{s} {n}" for s, n in plan["images"].items())
    log(f"prepare: {src.kind} at {source}: {sum(plan['images'].values())} images ({splits}), {len(src.classes)} classes -> "
        f"{len(rows)} {fmt} shards ({len(rows) - len(todo)} already done)")
    job_seconds = 0.0
    if todo:
        import ray  # only now: a refused source answers without paying for Ray's import

        if not ray.is_initialized():
            ray.init(log_to_driver=False, include_dashboard=False)
        job_start = time.perf_counter()
        arrays = {}
        if src.kind == "cifar100":
            for split in src.items:
                with np.load(Path(source) / f"{split}.npz", allow_pickle=False) as d:
                    arrays[str(Path(source) / f"{split}.npz")] = ray.put(d["x"])
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        try:
            ds.map(write_shard, fn_kwargs={"fmt": fmt, "validate": validate, "on_bad_record": on_bad_record,
                                           "max_pixels": max_pixels, "arrays": arrays},
                   concurrency=concurrency).materialize()
        except Exception as e:  # Ray wraps the task's exception; surface a bad record as itself
            raise unwrap_bad_record(e) from None
        job_seconds = time.perf_counter() - job_start
    # the summary covers every shard, also those finished by an earlier (interrupted) run
    done = [json.loads(Path(r["path"] + ".done.json").read_text()) for r in rows]
    bad = [b for d in done for b in d["bad"]]
    with open(out_dir / "bad_records.jsonl", "w") as f:
        for b in bad:
            f.write(json.dumps(b) + "\n")
    elapsed = time.perf_counter() - t0
    kinds: dict[str, int] = {}
    for b in bad:
        kinds[b["kind"]] = kinds.get(b["kind"], 0) + 1
    written_now = {os.path.basename(r["path"]) for r in todo}  # a set: 14k shards at ImageNet-22K scale
    written = sum(d["images"] for d in done if d["shard"] in written_now)
    by_split = {s: sum(d["images"] for d in done if d["shard"].startswith(f"{s}-")) for s in src.items}
    summary = {"images": sum(d["images"] for d in done), "shards": len(done), "bytes": sum(d["bytes"] for d in done),
               "bad_records": len(bad), "bad_by_kind": kinds, "written_now": len(todo), "seconds": elapsed,
               "images_per_s": written / job_seconds if job_seconds else 0.0, "format": fmt, "layout": src.kind,
               "classes": len(src.classes), "images_by_split": by_split, "warnings": src.warnings}
    (out_dir / "prepare.json").write_text(json.dumps(summary, indent=1))
    log(f"prepare: {summary['images']} images in {summary['shards']} shards, {summary['bytes'] / 2**20:.1f} MiB, "
        f"{summary['bad_records']} bad records {kinds or ''} (bad_records.jsonl), "
        f"{summary['images_per_s']:.0f} images/s written ({elapsed:.1f} s in all, Ray start-up included)")
    return summary
