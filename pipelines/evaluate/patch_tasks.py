"""Patch classification tasks for ``slidestream eval``.

A task is tiles with integer labels and class names, split into train and test:

- a folder per class (``DIR/<class>/*.png|jpg``), optionally with ``DIR/train/<class>`` and
  ``DIR/test/<class>`` for a fixed split (otherwise a stratified split by seed);
- an HDF5 file (``images`` (N, H, W, 3) uint8, ``labels`` (N,) int, optional ``split`` (N,) with
  b"train"/b"test", attribute ``classes`` as JSON) or a Zarr group with the same arrays.

Built-in known-answer tasks are named instead of a path (:func:`builtin_patch_task`), with
options after commas: ``tissue-types[,colour=natural,per_class=120,seed=0,slide=PATH]`` (the tissue
types of the demo slide, colours matched so that only morphology tells them apart:
:func:`pipelines.tasks.build_tissue_type_task`) and ``magnification[,per_class=120,seed=0,slide=PATH]``
(:func:`pipelines.tasks.build_magnification_task`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, MissingInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class PatchTask:
    name: str
    classes: list[str]
    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_test[idx[: max(1, int(round(len(idx) * test_fraction)))]] = True
    return is_test


def _read_images(paths: list[Path], size: int | None) -> np.ndarray:
    from PIL import Image

    out = []
    for p in paths:
        try:
            img = Image.open(p).convert("RGB")
        except OSError as e:
            raise InputError(f"{p}: cannot read image ({e}); remove or replace it") from e
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(img))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise InputError(f"images have different sizes {sorted(shapes)}; pass a tile size to resize them")
    return np.stack(out)


def _class_dirs(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[d.name] = files
    return classes


#: built-in patch tasks: name -> {option: type}
BUILTIN_TASKS: dict[str, dict[str, type]] = {
    "tissue-types": {"colour": str, "per_class": int, "seed": int, "mpp": float, "tile": int, "slide": str},
    "magnification": {"per_class": int, "seed": int, "tile": int, "slide": str},
}


def builtin_patch_task(spec: str) -> PatchTask | None:
    """Build the task ``spec`` names (``NAME[,key=value...]``, see the module docstring); None when
    ``spec`` names no built-in task."""
    name, _, rest = spec.partition(",")
    name = name.strip()
    if name not in BUILTIN_TASKS:
        return None
    kinds = BUILTIN_TASKS[name]
    opts: dict = {}
    for part in (p.strip() for p in rest.split(",") if p.strip()):
        k, eq, v = part.partition("=")
        if not eq or k.strip() not in kinds:
            raise InputError(
                f"patch task {spec!r}: option {part!r} is not one of {sorted(kinds)} (key=value)"
            )
        try:
            opts[k.strip()] = kinds[k.strip()](v.strip())
        except ValueError:
            raise InputError(
                f"patch task {spec!r}: {k}={v!r} is not of type {kinds[k.strip()].__name__}"
            ) from None
    slide = opts.pop("slide", None)
    if slide is not None and not Path(slide).exists():
        raise MissingInputError(f"patch task {spec!r}: slide {slide} not found")
    from ..tasks import DEMO_SLIDE, build_magnification_task, build_tissue_type_task

    if name == "tissue-types":
        try:
            return build_tissue_type_task([slide] if slide else None, **opts)
        except ValueError as e:
            raise InputError(f"patch task {spec!r}: {e}") from None
    return build_magnification_task([slide or DEMO_SLIDE], **opts)


def load_patch_task(
    path: str | Path, *, size: int | None = None, test_fraction: float = 0.3, seed: int = 0
) -> PatchTask:
    """Load a folder-per-class directory, an HDF5 file or a Zarr group (see module docstring), or
    build a built-in task named ``path`` (:func:`builtin_patch_task`) when no such file exists."""
    if not Path(path).exists():
        task = builtin_patch_task(str(path))
        if task is not None:
            return task
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"patch task not found: {path} (built-in tasks: {', '.join(BUILTIN_TASKS)})")
    if path.is_dir() and not (path / "zarr.json").exists() and not (path / ".zgroup").exists():
        if (path / "train").is_dir() and (path / "test").is_dir():
            tr, te = _class_dirs(path / "train"), _class_dirs(path / "test")
            classes = sorted(set(tr) | set(te))

            def load(split):
                files = [(f, classes.index(c)) for c, fs in split.items() for f in fs]
                return _read_images([f for f, _ in files], size), np.array([y for _, y in files])

            (xi, yi), (xt, yt) = load(tr), load(te)
            return PatchTask(path.name, classes, xi, yi, xt, yt)
        cd = _class_dirs(path)
        if len(cd) < 2:
            raise InputError(
                f"{path}: a patch task needs at least two class folders with images, found {list(cd)}"
            )
        classes = list(cd)
        files = [(f, i) for i, c in enumerate(classes) for f in cd[c]]
        images = _read_images([f for f, _ in files], size)
        labels = np.array([y for _, y in files])
        is_test = _stratified_split(labels, test_fraction, seed)
        return PatchTask(
            path.name, classes, images[~is_test], labels[~is_test], images[is_test], labels[is_test]
        )
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            images, labels = f["images"][()], f["labels"][()].astype(int)
            split = f["split"][()] if "split" in f else None
            classes = json.loads(f.attrs["classes"]) if "classes" in f.attrs else None
    else:
        import zarr

        g = zarr.open_group(str(path), mode="r")
        images, labels = np.asarray(g["images"]), np.asarray(g["labels"]).astype(int)
        split = np.asarray(g["split"]) if "split" in g else None
        classes = g.attrs.get("classes")
        if isinstance(classes, str):
            classes = json.loads(classes)
    classes = list(classes) if classes else [str(c) for c in range(int(labels.max()) + 1)]
    if split is not None:
        is_test = np.array([(s.decode() if isinstance(s, bytes) else str(s)) == "test" for s in split])
    else:
        is_test = _stratified_split(labels, test_fraction, seed)
    return PatchTask(path.stem, classes, images[~is_test], labels[~is_test], images[is_test], labels[is_test])


def save_patch_task_h5(task: PatchTask, path: str | Path) -> Path:
    import h5py

    from wsi.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["images"] = np.concatenate([task.train_images, task.test_images])
        f["labels"] = np.concatenate([task.train_labels, task.test_labels])
        f["split"] = np.array([b"train"] * len(task.train_labels) + [b"test"] * len(task.test_labels))
        f.attrs["classes"] = json.dumps(task.classes)
    return path
