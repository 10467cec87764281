"""A run directory on a local disk or behind a URI (``s3://bucket/prefix``, ``gs://...``), through
pyarrow filesystems, so the same code writes a laptop's ``runs/x`` and a cluster's bucket.

Layout (``splitnet run``)::
    config.yaml            the resolved configuration (a re-run must match it)
    state.json             finished stages and their results (what a re-run skips)
    checkpoints/<stage>/   Ray Train checkpoints (a re-run resumes the interrupted stage here)
    baseline/ group/       model.safetensors of the dense and the grouped model
    cut/                   the tree right after the cut (SplitTree artifacts)
    tree/                  the finetuned tree: what `splitnet serve` deploys
    report.md report.json *.png bad_records.jsonl
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs


class RunDir:
    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
            self.local = None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
            self.local = Path(self.root)
        self.fs.create_dir(self.root, recursive=True)

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return self.local is not None

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (for pyarrow / Ray Train ``storage_path``)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def display(self, rel: str = "") -> str:
        if self.is_local:
            return str(self.local / rel) if rel else str(self.local)
        return self.uri.rstrip("/") + ("/" + rel if rel else "")

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically on local disk (tmp + rename); object stores publish whole objects anyway."""
        parent = posixpath.dirname(self.path(rel))
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            target = self.local / rel
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_json(self, rel: str, default=None):
        return json.loads(self.read_text(rel)) if self.exists(rel) else default

    def write_json(self, rel: str, data) -> None:
        self.write_text(rel, json.dumps(data, indent=2))

    def upload_dir(self, local_dir: str | os.PathLike, rel: str) -> None:
        """Copy a local folder to ``rel`` (replacing what was there)."""
        if self.is_local:
            target = self.local / rel
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(local_dir, tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            return
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))
        pafs.copy_files(str(Path(local_dir).resolve()), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    @contextmanager
    def local_copy(self, rel: str):
        """A local folder holding ``rel`` (the folder itself when the run dir is local)."""
        if self.is_local:
            yield self.local / rel
            return
        with tempfile.TemporaryDirectory(prefix="splitnet-") as tmp:
            pafs.copy_files(self.path(rel), tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            yield Path(tmp)

    @contextmanager
    def staging(self, rel: str):
        """A local folder to write into; published to ``rel`` when the block ends without error."""
        with tempfile.TemporaryDirectory(prefix="splitnet-") as tmp:
            yield Path(tmp)
            self.upload_dir(tmp, rel)
