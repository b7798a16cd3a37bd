import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from compstore import Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """The A/B/C/D tiny family (see compstore.loader.synthetic), built once."""
    from compstore.loader.synthetic import build_family

    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def family_store(store, family):
    for name in "ABCD":
        store.ingest(family[name], name)
    return store


@pytest.fixture
def pipeline_copy(family, tmp_path):
    """A private copy of family member A, safe to damage."""
    def make(name: str = "A") -> Path:
        dest = tmp_path / f"copy-{name}"
        shutil.copytree(family[name], dest)
        return dest
    return make


def use_hub(monkeypatch, hub) -> None:
    """Point huggingface_hub at an emulated Hub, online and without any token."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")


def collect_beside(store: Store, refs: list[str] = (), wait_s: float = 1.0):
    """rm `refs` and gc from another thread with its own `Store`, as another process
    would; wait up to `wait_s` for it (a gc waiting for this thread's `reading()` takes
    longer) and return the thread's done Event."""
    import threading

    done = threading.Event()

    def collect():
        with Store(store.home) as other:
            for ref in refs:
                if other.has_ref(ref):
                    other.rm(ref)
            other.gc()
        done.set()

    threading.Thread(target=collect, daemon=True).start()
    done.wait(wait_s)
    return done


def run_random_steps(rng, steps: list, n: int, log: list[str], check=lambda i: None, label: str = "") -> None:
    """`n` steps drawn by `rng` from `steps`, `check(i)` after each; a failure is raised
    with `log`, the steps taken so far, so that a random sequence can be replayed."""
    try:
        for i in range(n):
            rng.choice(steps)()
            check(i)
    except Exception as e:
        raise AssertionError(f"{label}after: {'; '.join(log)}") from e


def tree_sha256(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def recorded_sha256(store: Store, ref: str) -> dict[str, str]:
    """path -> the sha256 the catalog records for each file of `ref`'s snapshot."""
    return dict(store.db.execute(
        "SELECT sf.path, f.sha256 FROM snapshot_files sf JOIN files f ON f.id = sf.file_id "
        "WHERE sf.snapshot_id = ?", [store.resolve(ref)]).fetchall())


def same_state(a, b) -> None:
    """Two models hold the same tensors: names, dtypes and bytes."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def store_state(home: Path) -> tuple:
    """Everything observable about a store: catalog rows and payload files."""
    con = sqlite3.connect(home / "catalog.db")
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    rows = {t: sorted(map(repr, con.execute(f"SELECT * FROM [{t}]"))) for t in tables}
    con.close()
    files = {
        p.relative_to(home).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((home / "objects").rglob("*")) if p.is_file()
    }
    tmp = sorted(p.name for p in (home / "tmp").iterdir())
    return rows, files, tmp


def publish_as_the_hub_has_it(pipe, folder) -> None:
    """Save `pipe` with tensor names as SD 1.x/2.x repos publish them
    (`compstore.loader.synthetic.rename_as_published`)."""
    from compstore.loader.synthetic import rename_as_published

    from safetensors import safe_open

    pipe.save_pretrained(folder)
    rename_as_published(folder)
    with safe_open(folder / "vae" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert any(".query." in name for name in f.keys())
    with safe_open(folder / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(name.startswith("text_model.") for name in f.keys())
