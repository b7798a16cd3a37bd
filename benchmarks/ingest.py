"""Ingest throughput beside a plain `cp -r` of the same folder to the same disk.

    python benchmarks/ingest.py --size-mb 1024 --repeat 3

Writes a folder of random fp16 tensors in safetensors shards (a UNet-sized
component: ~1,700 tensors per GB), then in one run times, median of --repeat:
  cp -r                    folder -> a new folder on the same disk
  ingest (new content)     folder -> an empty store (hash, byte-confirm, write, fsync)
  ingest (already held)    the same folder again under a new ref (hash + byte-confirm only)
  ingest (unchanged)       the same folder again under that ref: its stat cache matches
                           (stat_cache.py), so no payload byte is read
  ingest (1 file changed)  config.json edited, or a byte of one 256 MB shard changed, and
                           the folder again under that ref: only that file is read;
                           beside each, the same change ingested under a new ref, which
                           reads every file (as every ingest did before the per-file stat
                           cache)
and prints MB/s (of the median round, and of the fastest) and the ratio ingest / cp
(goal: >= 0.5 for both). `--drop-caches` (root, Linux) empties the page cache
before each ingest of a changed folder: what a load after a reboot reads from disk. Ingest fsyncs
its pack before the catalog commits; plain `cp -r` leaves its bytes in the page
cache, so `cp -r && sync` is timed too, as the like-for-like durable copy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compstore import Store  # noqa: E402


def make_folder(folder: Path, size_mb: int, shard_mb: int = 256) -> int:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    total, shard, tensors, i = 0, 0, {}, 0
    # Tensor sizes spread like a UNet's: many small ones, some large.
    sizes = [640 * 640, 1280 * 1280, 320 * 320, 1280, 640, 2560 * 1280]
    while total < size_mb << 20:
        n = sizes[i % len(sizes)]
        tensors[f"block.{i}.weight"] = rng.standard_normal(n, dtype=np.float32).astype(np.float16)
        total += 2 * n
        i += 1
        if sum(t.nbytes for t in tensors.values()) >= shard_mb << 20:
            save_file(tensors, str(folder / f"model-{shard:05d}.safetensors"))
            tensors, shard = {}, shard + 1
    if tensors:
        save_file(tensors, str(folder / f"model-{shard:05d}.safetensors"))
    (folder / "config.json").write_text('{"_class_name": "Synthetic"}')
    return sum(p.stat().st_size for p in folder.iterdir())


def flip(path: Path, from_end: int) -> None:
    """Change one byte of a tensor near the end of `path`, in place (same size)."""
    with open(path, "r+b") as f:
        f.seek(-from_end, 2)
        byte = f.read(1)
        f.seek(-from_end, 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def drop_caches() -> None:
    """Empty the page cache (root only): the next reads come from the disk."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ingest_only(src: Path, nbytes: int, home: Path, repeat: int) -> None:
    times = []
    for _ in range(repeat):
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        with Store(home) as store:
            times.append(timed(lambda: store.ingest(src, "first")))
    shutil.rmtree(home)
    print(f"ingest, new content: {nbytes / 2**20:.0f} MiB; seconds, fastest first: "
          f"{', '.join(f'{t:.3f}' for t in sorted(times))}; median {nbytes / 1e6 / statistics.median(times):.1f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="on the disk to measure [default: a temp dir]")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the figures here")
    ap.add_argument("--drop-caches", action="store_true",
                    help="empty the page cache before each ingest of a changed folder (root)")
    ap.add_argument("--ingest-only", action="store_true",
                    help="time only ingests of new content, each into an emptied store after a sync "
                         "(no copies beside them: on a shared VM their writes slow the next ones)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="compstore-bench-"))
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    nbytes = make_folder(src, args.size_mb)
    def warm() -> None:
        subprocess.run(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL, check=True)

    warm()

    def cp_r(dst: Path, sync: bool) -> None:
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        if sync:  # the same durability as ingest, which fsyncs its pack
            subprocess.run(["sync"], check=True)

    if args.ingest_only:
        ingest_only(src, nbytes, work / "store", args.repeat)
        return

    cp, cp_sync, new, held, again = [], [], [], [], []
    changed = {key: [] for key in ("config_changed", "config_changed_new_ref", "shard_changed",
                                   "shard_changed_new_ref")}
    shard, config = sorted(src.glob("*.safetensors"))[0], src / "config.json"
    config_text = config.read_text()
    for r in range(args.repeat):
        dst, home = work / f"cp-{r}", work / f"store-{r}"
        for p in (dst, home):
            shutil.rmtree(p, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        cp.append(timed(lambda: cp_r(dst, sync=False)))
        subprocess.run(["sync"], check=True)
        shutil.rmtree(dst)
        cp_sync.append(timed(lambda: cp_r(dst, sync=True)))
        with Store(home) as store:
            new.append(timed(lambda: store.ingest(src, "first")))
            held.append(timed(lambda: store.ingest(src, "second")))
            again.append(timed(lambda: store.ingest(src, "second")))
            # Each change is new content for both ingests of it: one under the ref
            # (reads the changed file), one under a new ref (reads every file).
            for key, change in (("config", lambda i: config.write_text(config_text[:-1] + f', "v": {i}}}')),
                                ("shard", lambda i: flip(shard, i))):
                cold = drop_caches if args.drop_caches else (lambda: None)
                change(1)
                cold()
                changed[f"{key}_changed_new_ref"].append(timed(lambda: store.ingest(src, f"{key}-{r}")))
                change(2)
                cold()
                changed[f"{key}_changed"].append(timed(lambda: store.ingest(src, "second")))
            config.write_text(config_text)  # the folder as made, for the next round
            flip(shard, 1), flip(shard, 2)
            warm()  # the next round's copies and ingests start from the page cache, as this one's
        shutil.rmtree(dst)
        shutil.rmtree(home)

    mb = nbytes / 1e6
    figures = {"bytes": nbytes}
    for key, times in (("cp_r", cp), ("cp_r_sync", cp_sync), ("ingest_new", new), ("ingest_held", held),
                        ("ingest_again", again),
                        *((f"ingest_{key}", times) for key, times in changed.items())):
        figures[f"{key}_s"] = round(statistics.median(times), 4)
        figures[f"{key}_mb_s"] = round(mb / statistics.median(times), 1)
        # The fastest round: on a shared VM, the one least slowed by its neighbours.
        figures[f"{key}_best_mb_s"] = round(mb / min(times), 1)
    figures["ratio_new"] = round(figures["ingest_new_mb_s"] / figures["cp_r_mb_s"], 2)
    figures["ratio_held"] = round(figures["ingest_held_mb_s"] / figures["cp_r_mb_s"], 2)
    figures["ratio_new_vs_cp_sync"] = round(figures["ingest_new_mb_s"] / figures["cp_r_sync_mb_s"], 2)
    print(f"folder: {nbytes / 2**20:.0f} MiB in {len(list(src.iterdir()))} files, page-cache warm"
          f"{' (cold for the changed folders)' if args.drop_caches else ''}; "
          f"MB/s of the median and of the best of {args.repeat}; ratios (of medians) are ingest / cp -r")

    def row(label: str, key: str, note: str) -> None:
        print(f"  {label:28s} {figures[key + '_s']:7.4f} s {figures[key + '_mb_s']:9.1f} MB/s  "
              f"best {figures[key + '_best_mb_s']:9.1f}   {note}")

    row("cp -r", "cp_r", "(page cache, not durable)")
    row("cp -r && sync", "cp_r_sync", "(durable, like ingest)")
    row("ingest, new content", "ingest_new",
        f"ratio {figures['ratio_new']:.2f} (vs cp -r && sync: {figures['ratio_new_vs_cp_sync']:.2f})")
    row("ingest, already held", "ingest_held", f"ratio {figures['ratio_held']:.2f}")
    row("ingest, unchanged", "ingest_again", "(same folder and ref: stat cache, nothing read)")
    n = len(list(src.iterdir()))
    for label, key in (("config.json", "config"), ("a shard", "shard")):
        row(f"ingest, {label} changed", f"ingest_{key}_changed", f"(same ref: 1 of {n} files read)")
        row("  same change, new ref", f"ingest_{key}_changed_new_ref", f"(all {n} files read)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
