"""Read an input folder and decide what it holds, before anything is written.

`scan_folder` walks a diffusers pipeline folder (model_index.json or
modular_model_index.json + component subfolders) or a single component folder
(config.json + weights), validates every file, and returns a `FolderScan`: the
file list, each safetensors header, and the components with their variants.
Every check that can refuse the input happens here, so a refused ingest has not
touched the store.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import InvalidInputError, PickleRefusedError
from .gguf_layout import read_gguf_layout
from .safetensors_header import SafetensorsHeader, read_header

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# Bookkeeping folders of git and of `hf download --local-dir`; not repo content.
SKIPPED_DIRS = {".git", ".cache"}
PIPELINE_INDEXES = ("model_index.json", "modular_model_index.json")
_INDEX_RE = re.compile(r"^(?P<stem>.+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")
SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")


@dataclass
class ScannedFile:
    path: str  # posix path relative to the folder: the name it is exported under
    source: str  # absolute path to read bytes from (a symlink's resolved target)
    size: int
    header: SafetensorsHeader | None = None  # set for safetensors files, and GGUF ones (gguf_layout.py)

    @property
    def is_safetensors(self) -> bool:
        return self.header is not None and not self.is_gguf

    @property
    def is_gguf(self) -> bool:
        return self.path.lower().endswith(".gguf")


@dataclass
class ScannedComponent:
    slot: str  # subfolder name; "" for a single-component folder
    variant: str  # "" for the default weights
    library: str | None
    class_name: str | None
    weight_files: list[str] = field(default_factory=list)  # paths of its safetensors files
    files: list[str] = field(default_factory=list)  # every file of the slot


@dataclass
class FolderScan:
    root: str
    kind: str  # "pipeline" | "modular" | "component" | "components" (folders, no index) | "files"
    files: dict[str, ScannedFile]
    components: list[ScannedComponent]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def config(self, slot: str) -> dict | None:
        """The config.json of a slot ("" for a single component's), None if it has none."""
        return _read_json(self.files, f"{slot}/config.json" if slot else "config.json")


def _allowed_roots(root: str) -> list[str]:
    roots = [root]
    # A Hugging Face cache snapshot (.../models--org--name/snapshots/<rev>) links
    # into its repo's own blobs/ folder, and huggingface_hub 2.4 may share one
    # blob store across repos (.../hub/blobs): both are legitimate targets.
    parts = Path(root).parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        repo_dir = Path(*parts[:-2])
        roots.append(str(repo_dir / "blobs"))
        roots.append(str(repo_dir.parent / "blobs"))
    return roots


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def safe_relpath(name: str, where: str) -> str:
    """Validate a relative path read from a JSON file (index or pointer)."""
    if not isinstance(name, str) or not name:
        raise InvalidInputError(where, f"file name {name!r} is not a non-empty string")
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise InvalidInputError(where, f"absolute or non-posix path {name!r} is not allowed")
    if any(part == ".." for part in p.parts):
        raise InvalidInputError(where, f"path {name!r} leaves the folder ('..' is not allowed)")
    return str(p)


def _walk(root: str, allow_pickle: bool, exclude: list[str]) -> dict[str, ScannedFile]:
    allowed = _allowed_roots(root)
    files: dict[str, ScannedFile] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                rel = PurePosixPath(os.path.relpath(full, root)).as_posix()
                raise InvalidInputError(
                    rel, "symlinked directories are not supported; copy the folder instead"
                )
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = PurePosixPath(os.path.normpath(os.path.join(rel_dir, name))).as_posix()
            if any(fnmatch.fnmatch(rel, pat) for pat in exclude):
                continue
            source = os.path.realpath(full)
            if not _inside(source, allowed):
                raise InvalidInputError(
                    rel, f"symlink points outside the input folder (to {source}); refusing it"
                )
            if not os.path.isfile(source):
                raise InvalidInputError(rel, "not a regular file (broken link or special file)")
            if name.lower().endswith(PICKLE_SUFFIXES) and not allow_pickle:
                raise PickleRefusedError(
                    rel,
                    "pickle checkpoint refused: compstore never loads pickle. Convert it to "
                    "safetensors, leave it out with --exclude, or store it as opaque bytes "
                    "with --allow-pickle",
                )
            sf = ScannedFile(rel, source, os.path.getsize(source))
            if name.endswith(".safetensors"):
                sf.header = read_header(source, rel)
            elif sf.is_gguf:  # kept by its tensors where it reads as GGUF, else as one blob
                sf.header = read_gguf_layout(source)
            files[rel] = sf
    return files


def variant_of(filename: str, index_variants: dict[str, str] | None = None) -> str:
    """The variant of a weights file: from its index if it has one, else its name.

    diffusers names variant files `stem.<variant>.safetensors` (and shards
    `stem.<variant>-00001-of-00002.safetensors` or `stem-00001-of-00002.<variant>...`).
    """
    if index_variants and filename in index_variants:
        return index_variants[filename]
    m = _INDEX_RE.match(PurePosixPath(filename).name)
    if m:
        return m.group("variant") or ""
    base = PurePosixPath(filename).name[: -len(".safetensors")]
    base = SHARD_RE.sub("", base)
    parts = base.split(".")
    if len(parts) >= 2:
        return SHARD_RE.sub("", parts[-1])
    return ""


def _check_indexes(files: dict[str, ScannedFile]) -> dict[str, str]:
    """Validate every `*.safetensors.index[.variant].json`; map shard path -> variant."""
    shard_variant: dict[str, str] = {}
    for path, f in files.items():
        m = _INDEX_RE.match(PurePosixPath(path).name)
        if not m:
            continue
        try:
            with open(f.source, "rb") as fh:
                index = json.loads(fh.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidInputError(path, f"index is not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise InvalidInputError(path, "index has no 'weight_map' object")
        parent = PurePosixPath(path).parent
        for tensor, shard in weight_map.items():
            shard_rel = safe_relpath(shard, path)
            full = (parent / shard_rel).as_posix()
            if full not in files:
                raise InvalidInputError(
                    path, f"names shard {shard!r} (for tensor {tensor!r}) which is missing"
                )
            if not files[full].is_safetensors:
                raise InvalidInputError(path, f"names shard {shard!r} which is not safetensors")
            shard_variant[full] = m.group("variant") or ""
    return shard_variant


def _split_colliding(
    by_variant: dict[str, list[str]], files: dict[str, ScannedFile], indexed: dict[str, str]
) -> dict[str, list[str]]:
    """Unindexed files of one variant whose tensor names collide are separate checkpoints
    (e.g. two single-file models side by side): each becomes its own variant, named
    after its file."""
    out: dict[str, list[str]] = {}
    for variant, paths in by_variant.items():
        names = [t.name for p in paths for t in files[p].header.tensors]
        if len(names) == len(set(names)) or all(p in indexed for p in paths):
            out[variant] = paths
        else:
            for p in paths:
                out[PurePosixPath(p).name] = [p]
    return out


def _read_json(files: dict[str, ScannedFile], path: str) -> dict | None:
    f = files.get(path)
    if f is None:
        return None
    try:
        with open(f.source, "rb") as fh:
            value = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(path, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InvalidInputError(path, "must hold a JSON object")
    return value


def _json_or_none(files: dict[str, ScannedFile], path: str) -> dict | None:
    try:
        return _read_json(files, path)
    except InvalidInputError:  # not a model's config: the folder is plain files
        return None


def _component_class(config: dict | None) -> tuple[str | None, str | None]:
    if not config:
        return None, None
    if isinstance(config.get("_class_name"), str):
        return "diffusers", config["_class_name"]
    arch = config.get("architectures")
    if isinstance(arch, list) and arch and isinstance(arch[0], str):
        return "transformers", arch[0]
    return None, None


def index_entries(index: dict):
    """(slot, library, class) of each component a pipeline index names; slots the
    pipeline leaves empty (`[null, null]`, e.g. safety_checker) are not named."""
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) < 2:
            continue
        if value[0] is not None and value[1] is not None:
            yield key, value[0], value[1]


def _slots(files: dict[str, ScannedFile]) -> tuple[str, dict[str, tuple[str | None, str | None]]]:
    """The folder's kind and its slots: slot name -> (library, class)."""
    for index_name in PIPELINE_INDEXES:
        index = _read_json(files, index_name)
        if index is None:
            continue
        slots: dict[str, tuple[str | None, str | None]] = {}
        for key, library, cls in index_entries(index):
            if not isinstance(library, str) or not isinstance(cls, str):
                raise InvalidInputError(index_name, f"entry {key!r}: library and class must be "
                                                    f"strings, not {library!r}, {cls!r}")
            safe_relpath(key, index_name)
            slots[key] = (library, cls)
        return ("pipeline" if index_name == "model_index.json" else "modular"), slots
    config = _read_json(files, "config.json")
    if config is not None or any(f.is_safetensors and "/" not in p for p, f in files.items()):
        return "component", {"": _component_class(config)}
    # Models in folders of their own, no index: what diffusers' `subfolder="vae"`
    # downloads (a Hugging Face cache snapshot holding `vae/` alone).
    slots = {p.partition("/")[0]: _component_class(_json_or_none(files, p)) for p in files
             if p.count("/") == 1 and p.endswith("/config.json")}
    slots = {slot: named for slot, named in slots.items() if named[1]}
    if slots:
        return "components", slots
    if any(f.is_safetensors for f in files.values()):
        return "component", {"": _component_class(config)}
    return "files", {}


def scan_folder(
    root: str | os.PathLike, *, allow_pickle: bool = False, exclude: list[str] | None = None
) -> FolderScan:
    """Walk and validate `root`; raise `InvalidInputError` on the first problem.

    >>> scan = scan_folder("./my-pipeline")  # doctest: +SKIP
    >>> [(c.slot, c.variant) for c in scan.components]  # doctest: +SKIP
    [('text_encoder', ''), ('unet', ''), ('unet', 'fp16'), ...]
    """
    if not os.fspath(root).strip():  # "" would be the working folder
        raise InvalidInputError(repr(os.fspath(root)), "an empty path: name the folder (\".\" for this one)")
    root_str = os.path.realpath(os.fspath(root))
    if not os.path.isdir(root_str):
        raise InvalidInputError(os.fspath(root), "not a directory")
    files = _walk(root_str, allow_pickle, exclude or [])
    if not files:
        raise InvalidInputError(os.fspath(root), "folder holds no files")
    shard_variant = _check_indexes(files)
    kind, slots = _slots(files)

    components: list[ScannedComponent] = []
    for slot, (library, cls) in sorted(slots.items()):
        prefix = f"{slot}/" if slot else ""
        slot_files = [p for p in files if p.startswith(prefix)]
        if slot and not slot_files:
            continue  # modular entries pointing elsewhere have no local folder
        if slot:  # a pipeline slot's own config names the class when it is more precise
            lib2, cls2 = _component_class(_read_json(files, f"{prefix}config.json"))
            library, cls = library or lib2, cls or cls2
        by_variant: dict[str, list[str]] = {}
        for p in slot_files:
            if files[p].is_safetensors and "/" not in p[len(prefix):]:
                by_variant.setdefault(variant_of(p, shard_variant), []).append(p)
        by_variant = _split_colliding(by_variant, files, shard_variant)
        if not by_variant:
            by_variant[""] = []
        for variant, weights in sorted(by_variant.items()):
            components.append(
                ScannedComponent(slot, variant, library, cls, sorted(weights), sorted(slot_files))
            )
    return FolderScan(root_str, kind, files, components)
