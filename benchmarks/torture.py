"""Stress compstore: SIGKILL at random moments, and fuzzed hostile input.

    python benchmarks/torture.py --seconds 600 --fuzz-cases 5000

Kills: ingest, export and gc (after rm) run as `python -m compstore ...` child
processes, killed with SIGKILL after a random delay (bounded in time). After each
one: `verify` must pass, every ref must export byte-identical to the folder it was
ingested from (a mismatch counts as bytes lost), and re-running the operation must
complete. At the end, after gc, the store must hold exactly the payload bytes of a
clean store holding the same refs.

Fuzz: mutations of valid safetensors files (header bytes, header length, tensor
entries, truncation, trailing bytes) and of index / config / model_index JSON
(values, paths with '..' or absolute, types). Every case must end in a
`CompstoreError` with the store unchanged, or in a correct ingest (export
byte-identical to the mutated input) -- never another exception or a hang.

Prints the figures and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compstore import CompstoreError, Store  # noqa: E402


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_sources(root: Path) -> dict[str, Path]:
    """The tiny A/B/C/D family and a ~64 MB component, slow enough to kill mid-way."""
    import numpy as np
    from safetensors.numpy import save_file

    from compstore.loader.synthetic import build_family

    sources = dict(build_family(root / "family"))
    big = root / "big"
    big.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        save_file({f"b{i}.w{j}": rng.standard_normal((1024, 1024), dtype=np.float32) for j in range(8)},
                  str(big / f"model-{i}.safetensors"))
    (big / "config.json").write_text('{"_class_name": "Big"}')
    sources["big"] = big
    return sources


def cli(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "compstore", "--store", str(store), *args]


def check_store(home: Path, refs: dict[str, str], sources: dict[str, Path], work: Path,
                pending: tuple[str, str] | None = None) -> int:
    """verify, then export every ref; return the bytes that differ from their sources.

    `pending` is (ref, source) of a killed ingest: it may or may not have committed,
    so that ref may export as either its old source or the new one (then `refs` is
    updated)."""
    lost = 0
    with Store(home) as s:
        report = s.verify()
        if not report.ok:
            lost += sum(1 for _ in report.problems)
        for r in s.ls():
            candidates = [n for n in (refs.get(r["name"]),) if n]
            if pending and pending[0] == r["name"]:
                candidates.append(pending[1])
            out = work / f"check-{time.time_ns()}"
            s.export(r["name"], out)
            got = tree(out)
            match = next((n for n in candidates if tree(sources[n]) == got), None)
            if match is None:
                lost += sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) or 1
                print(f"ref {r['name']} exports as none of {candidates}", file=sys.stderr)
            else:
                refs[r["name"]] = match
            shutil.rmtree(out)
    return lost


def kill_loop(home: Path, sources: dict[str, Path], work: Path, seconds: float, rng: random.Random) -> dict:
    refs: dict[str, str] = {}  # ref -> source name, for what each ref must export to
    stats = {"iterations": 0, "killed": 0, "completed": 0, "bytes_lost": 0, "rerun_failures": 0}
    deadline = time.monotonic() + seconds
    duration = {"ingest": 1.0, "export": 1.0, "gc": 1.0}  # learnt from the runs that finish
    i = 0
    while time.monotonic() < deadline:
        i += 1
        op = rng.choice(["ingest", "ingest", "export", "gc"])
        if op == "ingest" or not refs:
            name = rng.choice(list(sources))
            ref = f"{name}-{rng.randrange(3)}"
            args = ["ingest", str(sources[name]), "--name", ref]
        elif op == "export":
            ref = rng.choice(list(refs))
            args = ["export", ref, str(work / f"export-{i}")]
        else:
            ref = rng.choice(list(refs))
            subprocess.run(cli(home, "rm", ref), check=True, capture_output=True)
            refs.pop(ref)
            args = ["gc"]
        p = subprocess.Popen(cli(home, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, duration[args[0]]))  # any moment of the run, start-up included
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            stats["killed"] += 1
        else:
            stats["completed"] += 1
        p.wait()
        if args[0] == "ingest" and p.returncode == 0:
            refs[ref] = name
        pending = (ref, name) if args[0] == "ingest" else None
        stats["bytes_lost"] += check_store(home, refs, sources, work, pending)
        t0 = time.perf_counter()
        rerun = subprocess.run(cli(home, *args[:-1], str(work / f"export-{i}-again")) if args[0] == "export"
                               else cli(home, *args), capture_output=True)
        duration[args[0]] = 0.5 * duration[args[0]] + 0.5 * (time.perf_counter() - t0)
        if rerun.returncode != 0:
            stats["rerun_failures"] += 1
            print("re-run failed:", args, rerun.stderr.decode()[-300:], file=sys.stderr)
        elif args[0] == "ingest":
            refs[ref] = name
        shutil.rmtree(work / f"export-{i}", ignore_errors=True)
        shutil.rmtree(work / f"export-{i}-again", ignore_errors=True)
        stats["iterations"] += 1

    with Store(home) as s:
        s.gc()
        held = s.du().payload_bytes
        leftovers = list((home / "tmp").iterdir())
    with Store(work / "clean") as clean:
        for ref, name in refs.items():
            clean.ingest(sources[name], ref)
        stats["extra_bytes_after_gc"] = held - clean.du().payload_bytes
    shutil.rmtree(work / "clean")
    stats["tmp_leftovers"] = len(leftovers)
    return stats


# -- fuzzing ---------------------------------------------------------------------------
def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


WEIRD = [None, -1, 0, 1, 2**63, 2**64 + 5, 1.5, "x", "F16", [], [1, -2], [2**40, 2**40], {}, True]


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes in the header
        n = 8 + struct.unpack("<Q", data[:8])[0]
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:
        return data[: rng.randrange(len(data))]
    if kind == 2:
        return struct.pack("<Q", rng.choice([0, 1, 7, 2**20, 2**62, len(data)])) + data[8:]
    if kind == 3:
        return data + bytes(rng.randrange(1, 100))
    header, payload = _split(data)
    names = [k for k in header if k != "__metadata__"]
    entry = header[rng.choice(names)]
    field = rng.choice(["dtype", "shape", "data_offsets"])
    if kind == 4:
        entry[field] = rng.choice(WEIRD + ["BF16", "F64", "U8", "F4"])
    else:
        other = header[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"])  # overlap / duplicate
    return _join(header, payload)


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    doc = json.loads(data)

    def walk(d):
        keys = list(d) if isinstance(d, dict) else list(range(len(d)))
        if not keys:
            return
        k = rng.choice(keys)
        if isinstance(d[k], (dict, list)) and d[k] and rng.random() < 0.6:
            walk(d[k])
        else:
            d[k] = rng.choice(WEIRD + ["../escape.safetensors", "/etc/passwd", "missing.safetensors"])

    walk(doc)
    return json.dumps(doc).encode()


def fuzz(sources: dict[str, Path], work: Path, cases: int, rng: random.Random) -> dict:
    base = work / "fuzz-base"
    shutil.copytree(sources["C"], base)  # sharded UNet: safetensors, index and config JSON
    targets = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                     if p.suffix in (".safetensors", ".json"))
    stats = {"cases": 0, "refused": 0, "ingested": 0, "failures": 0}
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    home = work / "fuzz-store"
    with Store(home) as s:
        s.ingest(sources["A"], "A")
        state = lambda: (s.db.execute("SELECT count(*) FROM blobs").fetchone()[0],
                         sorted(p.name for p in (home / "objects" / "packs").iterdir()),
                         [tuple(r) for r in s.db.execute("SELECT * FROM refs")])
        for i in range(cases):
            case = work / "fuzz-case"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(base, case)
            target = case / rng.choice(targets)
            data = target.read_bytes()
            mutate = mutate_safetensors if target.suffix == ".safetensors" else mutate_json
            try:
                target.write_bytes(mutate(data, rng))
            except (ValueError, struct.error, json.JSONDecodeError):
                continue
            before = state()
            signal.alarm(30)  # a hang fails loudly
            try:
                s.ingest(case, f"fuzz-{i}")
            except CompstoreError:
                stats["refused"] += 1
                if state() != before:
                    stats["failures"] += 1
                    print(f"case {i}: refused but the store changed ({target.name})", file=sys.stderr)
            except Exception as e:  # anything else is a bug
                stats["failures"] += 1
                print(f"case {i}: {type(e).__name__}: {e} ({target.name})", file=sys.stderr)
            else:
                stats["ingested"] += 1
                out = work / "fuzz-out"
                s.export(f"fuzz-{i}", out)
                if tree(out) != tree(case):
                    stats["failures"] += 1
                    print(f"case {i}: ingested but exports differently", file=sys.stderr)
                shutil.rmtree(out)
                s.rm(f"fuzz-{i}")
            finally:
                signal.alarm(0)
            stats["cases"] += 1
    # A header naming a huge shape must never turn into a huge allocation.
    stats["peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) // 1024
    if stats["peak_rss_growth_mb"] > 1024:
        stats["failures"] += 1
    return stats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300, help="time for the kill loop")
    ap.add_argument("--fuzz-cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="compstore-torture-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sources = make_sources(work / "sources")
    kills = kill_loop(work / "store", sources, work, args.seconds, rng)
    fuzzed = fuzz(sources, work, args.fuzz_cases, rng)
    figures = {"kill": kills, "fuzz": fuzzed, "seconds": round(time.perf_counter() - t0, 1)}
    ok = (kills["bytes_lost"] == 0 and kills["rerun_failures"] == 0
          and kills["extra_bytes_after_gc"] == 0 and kills["tmp_leftovers"] == 0
          and fuzzed["failures"] == 0)
    figures["ok"] = ok
    print(f"kill loop: {kills['iterations']} iterations, {kills['killed']} killed by SIGKILL, "
          f"{kills['completed']} finished first; bytes lost {kills['bytes_lost']}, re-run failures "
          f"{kills['rerun_failures']}, bytes beyond a clean store after gc {kills['extra_bytes_after_gc']}")
    print(f"fuzz: {fuzzed['cases']} cases, {fuzzed['refused']} refused with a clear error, "
          f"{fuzzed['ingested']} ingested and exported identically, {fuzzed['failures']} failures, "
          f"peak RSS growth {fuzzed['peak_rss_growth_mb']} MB")
    print(f"{'OK' if ok else 'FAILED'} in {figures['seconds']} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
