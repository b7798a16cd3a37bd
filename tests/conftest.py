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
    """Save `pipe` with tensor names as SD 1.x/2.x repos publish them, which today's
    libraries rename on load: the CLIP text encoder's under `text_model.` (with its
    `position_ids`), and the VAE's attention weights as diffusers' deprecated
    attention blocks named them (query, key, value, proj_attn)."""
    import torch
    from safetensors.torch import load_file, save_file

    pipe.save_pretrained(folder)
    te = folder / "text_encoder" / "model.safetensors"
    sd = {f"text_model.{name}": t for name, t in load_file(te).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, te, metadata={"format": "pt"})
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, t in load_file(vae).items():
        for new, was in old.items():
            if ".mid_block.attentions." in name and f".{new}." in name:
                name = name.replace(f".{new}.", f".{was}.")
        renamed[name] = t
    assert any(".query." in name for name in renamed)
    save_file(renamed, vae, metadata={"format": "pt"})
