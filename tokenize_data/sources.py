"""The source list: which images, with which labels, in which deterministic order.

* A folder in ImageNet layout: one sub-folder per class (sorted names -> class
  indices 0..C-1, as torchvision's ImageFolder), images anywhere below it,
  sorted by relative path.  Files with a non-image extension and files outside
  any class folder are not rows; they are listed in the report as ignored.
  Hidden files (.DS_Store, ...) are passed over silently.
* A list file (.txt/.tsv/.lst): one image per line, ``path<TAB>label`` or
  ``path label``; label is a class index or a class name; without a label the
  class is the parent folder's name.  Relative paths are relative to the list
  file's folder (or ``root``).  Lines keep their order; blank and ``#`` lines
  are skipped.  Class names, when given, are sorted to indices.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenize_data.images import IMAGE_EXTENSIONS
from tokenize_data.plan import NAMES


@dataclass
class SourceList:
    kind: str  # "folder" or "list"
    root: str  # absolute folder the paths are relative to
    paths: list  # str, relative to root (or absolute)
    labels: list  # int
    class_names: list | None
    ignored: list = field(default_factory=list)  # [{"path", "reason"}]
    list_file: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        return (max(self.labels) + 1) if self.labels else 0

    def abspath(self, i: int) -> str:
        p = self.paths[i]
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for p, lab in zip(self.paths, self.labels):
            h.update(f"{p}\t{lab}\n".encode("utf-8", NAMES))
        return h.hexdigest()


def scan_folder(root: str | os.PathLike) -> SourceList:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {str(root)!r} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))
    ignored = [{"path": e.name, "reason": "outside any class folder"}
               for e in sorted(os.scandir(root), key=lambda e: e.name) if e.is_file() and not e.name.startswith(".")]
    if not classes:
        raise ValueError(f"source folder {str(root)!r} has no class sub-folders (expected ImageNet layout: root/<class>/<image>)")
    paths, labels = [], []
    for idx, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if f.startswith("."):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                if "\n" in rel or "\r" in rel:
                    ignored.append({"path": rel, "reason": "name holds a line break (sources.tsv has one row per line)"})
                elif os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(rel)
                else:
                    ignored.append({"path": rel, "reason": "not an image file (extension)"})
        found.sort()
        paths += found
        labels += [idx] * len(found)
    ignored.sort(key=lambda d: d["path"])
    return SourceList("folder", str(root), paths, labels, classes, ignored)


def read_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> SourceList:
    list_file = Path(list_file).resolve()
    base = Path(root).resolve() if root else list_file.parent
    entries = []
    with open(list_file, encoding="utf-8", errors=NAMES) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" in line:
                path, label = line.split("\t", 1)
                label = label.strip()
            else:
                parts = line.strip().rsplit(None, 1)
                path, label = (parts[0], parts[1]) if len(parts) == 2 else (line.strip(), "")
            if not label:
                label = Path(path).parent.name
                if not label:
                    raise ValueError(f"{list_file}:{lineno}: no label and no parent folder to take the class from: {line!r}")
            entries.append((path.strip(), label, lineno))
    if not entries:
        raise ValueError(f"list file {str(list_file)!r} names no images")
    numeric = [e[1].lstrip("-").isdigit() for e in entries]
    if all(numeric):
        labels = [int(e[1]) for e in entries]
        bad = [e for e, lab in zip(entries, labels) if lab < 0]
        if bad:
            raise ValueError(f"{list_file}:{bad[0][2]}: negative label {bad[0][1]}")
        class_names = None
    elif not any(numeric):
        class_names = sorted({e[1] for e in entries})
        index = {c: i for i, c in enumerate(class_names)}
        labels = [index[e[1]] for e in entries]
    else:
        first = entries[numeric.index(False)]
        raise ValueError(f"{list_file}:{first[2]}: mixes class indices and class names ({first[1]!r}); use one kind")
    paths = [e[0] for e in entries]
    return SourceList("list", str(base), paths, labels, class_names, [], str(list_file))


def load_sources(source: str | os.PathLike, root: str | os.PathLike | None = None) -> SourceList:
    p = Path(source)
    if p.is_dir():
        return scan_folder(p)
    if p.is_file():
        return read_list(p, root)
    raise FileNotFoundError(f"source {str(source)!r} is neither a folder (ImageNet layout) nor a list file")
