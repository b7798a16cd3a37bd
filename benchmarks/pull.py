"""Bytes the Hub serves for a pull vs bytes the store lacked, on the emulated Hub.

    python benchmarks/pull.py

Serves the tiny A/B/C/D family from tests/hub_emulator.py on 127.0.0.1 and pulls
A, B, C, D in that order into one store; then publishes C with a compstore
manifest and pulls it into a store that holds only A. Prints, per pull, what the
store lacked (whole files by sha256; tensors by the catalog's diff) beside what
the emulator served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import huggingface_hub.constants  # noqa: E402

from compstore import Store  # noqa: E402
from compstore.loader.synthetic import build_family  # noqa: E402
from hub_emulator import HubEmulator  # noqa: E402


def main() -> None:
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    work = Path(tempfile.mkdtemp(prefix="compstore-pull-"))
    family = build_family(work / "family")
    hub = HubEmulator()
    os.environ["HF_ENDPOINT"] = hub.url
    for name, folder in family.items():
        hub.add_repo(f"org/{name}", folder)

    print("whole-file pulls, in order, into one store")
    store, seen = Store(work / "store"), set()
    for name, folder in family.items():
        files = [p.read_bytes() for p in folder.rglob("*") if p.is_file()]
        lacked = sum(len(b) for b in files if hashlib.sha256(b).hexdigest() not in seen)
        seen |= {hashlib.sha256(b).hexdigest() for b in files}
        hub.reset_counts()
        r = store.pull(f"org/{name}")
        print(f"  org/{name}: repo {sum(map(len, files)):>9,} B  store lacked {lacked:>9,} B  "
              f"Hub served {hub.served_bytes:>9,} B  files downloaded {r.downloaded_files}, "
              f"skipped {r.skipped_files}")

    with Store(work / "publisher") as pub:
        pub.ingest(family["A"], "A")
        pub.ingest(family["C"], "C")
        delta = pub.diff("A", "C").delta_bytes
        published = work / "C-with-manifest"
        shutil.copytree(family["C"], published)
        (published / "compstore.manifest.json").write_text(json.dumps(pub.manifest("C")))
    hub.add_repo("org/C-m", published)
    with Store(work / "consumer") as consumer:
        consumer.pull("org/A")
        hub.reset_counts()
        consumer.pull("org/C-m")
    print("tensor-level pull with a manifest: org/C-m into a store holding org/A")
    print(f"  C's new tensor bytes {delta:,} B; manifest "
          f"{(published / 'compstore.manifest.json').stat().st_size:,} B; Hub served "
          f"{hub.served_bytes:,} B (the rest: new safetensors headers and index files)")
    hub.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
