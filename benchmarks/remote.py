"""Push/fetch through a shared remote vs naive whole-folder copies, in one run.

    python benchmarks/remote.py

Starts an S3-compatible server (moto, tests/s3_server.py) on 127.0.0.1 that counts
the bytes it receives and sends. Node 1 ingests the tiny A/B/C/D family and pushes
A, B, C, D in that order; node 2, starting empty, fetches them in the same order.
Beside each, the naive way: upload (or download) the pipeline's whole folder.
Prints bytes on the wire (counted by the server; of which pack payload) and
seconds for each.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from compstore import Store  # noqa: E402
from compstore.loader.synthetic import build_family  # noqa: E402
from compstore.store.remote import Remote  # noqa: E402
from s3_server import S3Server  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="compstore-remote-"))
    family = build_family(work / "family")
    server = S3Server()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=server.endpoint)
    fs = Remote("s3://bench").fs
    fs.mkdir("bench")
    n1, n2 = Store(work / "n1"), Store(work / "n2")
    for s in (n1, n2):
        s.remote_add("fleet", "s3://bench/fleet")

    def wire(fn):
        server.reset_counts()
        t0 = time.perf_counter()
        fn()
        return (sum(server.received.values()) + sum(server.sent.values()),
                time.perf_counter() - t0, server.received["packs"] + server.sent["packs"])

    rows = []
    for name, folder in family.items():
        n1.ingest(folder, name)
        folder_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        push_b, push_s, push_packs = wire(lambda: n1.push(name))
        naive_up_b, naive_up_s, _ = wire(
            lambda: fs.put(str(folder), f"bench/naive/{name}", recursive=True))
        fetch_b, fetch_s, fetch_packs = wire(lambda: n2.fetch(name))
        dl = work / "naive-download" / name
        naive_dn_b, naive_dn_s, _ = wire(
            lambda: fs.get(f"bench/naive/{name}", str(dl), recursive=True))
        rows.append((name, folder_bytes, push_b, push_s, naive_up_b, naive_up_s,
                     fetch_b, fetch_s, naive_dn_b, naive_dn_s, push_packs, fetch_packs))

    print("bytes on the wire (counted by the S3 server) and seconds, in push order A, B, C, D")
    print(f"{'ref':<4}{'folder':>11}{'push':>11}{'s':>6}{'naive up':>11}{'s':>6}"
          f"{'fetch':>11}{'s':>6}{'naive down':>12}{'s':>6}")
    for r in rows:
        print(f"{r[0]:<4}{r[1]:>11,}{r[2]:>11,}{r[3]:>6.2f}{r[4]:>11,}{r[5]:>6.2f}"
              f"{r[6]:>11,}{r[7]:>6.2f}{r[8]:>12,}{r[9]:>6.2f}")
    tot = [sum(r[i] for r in rows) for i in range(1, 12)]
    print(f"{'all':<4}{tot[0]:>11,}{tot[1]:>11,}{tot[2]:>6.2f}{tot[3]:>11,}{tot[4]:>6.2f}"
          f"{tot[5]:>11,}{tot[6]:>6.2f}{tot[7]:>12,}{tot[8]:>6.2f}")
    print(f"push moved {tot[1] / tot[3]:.2f}x the naive upload's bytes; fetch "
          f"{tot[5] / tot[7]:.2f}x the naive download's")
    print("of which pack payload (the blobs the other side lacked): " + ", ".join(
        f"{r[0]} push {r[10]:,} / fetch {r[11]:,}" for r in rows))
    n1.close()
    n2.close()
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
