"""Random command lines: every one ends in a result or a one-line error, never a
traceback, and leaves a store that verifies.

Arguments come from pools of good and bad values (refs that exist and do not, names
with spaces, newlines and `..`, folders, files, missing paths, malformed globs,
remote URLs of unknown schemes or unreachable hosts). The Hub is a closed port.
"""

import random

import pytest
from click.testing import CliRunner

from compstore import Store
from compstore.cli import cli

COMMANDS = ["ingest", "ls", "show", "du", "diff", "export", "verify", "gc", "rm", "tag", "pull", "adopt",
            "manifest", "push", "fetch", "xet-index", "remote add", "remote ls", "remote rm",
            "remote refs", "remote rm-ref", "remote gc"]


class Invocations:
    def __init__(self, family, tmp_path, seed: int):
        self.rng = random.Random(seed)
        (tmp_path / "a-file.txt").write_text("x")
        (tmp_path / "empty").mkdir()
        self.refs = ["A", "B", "nope", "", " A", "a\nb", "../x", "x" * 2000, "A@", "org/A", "-"]
        self.paths = [str(family["C"]), str(family["D"]), str(family["A"] / "unet"), str(tmp_path / "missing"),
                      str(tmp_path / "a-file.txt"), "/dev/null", str(tmp_path / "empty"), str(tmp_path / "out"),
                      "", "-"]
        self.urls = ["file:///nonexistent/dir", str(tmp_path / "remote"), (tmp_path / "remote").as_uri(),
                     "ftp://nonexistent.invalid/y", "", "not a url", "nosuchproto://x", "file://"]
        self.globs = ["*", "unet/*", "", "[", "**/..", "vae"]

    def maybe(self, p: float, *args: str) -> list[str]:
        return list(args) if self.rng.random() < p else []

    def one(self) -> list[str]:
        pick, c = self.rng.choice, self.rng.choice(COMMANDS)
        args = c.split()
        if c == "ingest":
            args += [pick(self.paths), *self.maybe(.5, "--name", pick(self.refs)),
                     *self.maybe(.3, "--exclude", pick(self.globs)), *self.maybe(.2, "--allow-pickle")]
        elif c in ("show", "rm", "xet-index", "manifest"):
            args += [pick(self.refs)]
        elif c == "diff":
            args += [pick(self.refs), pick(self.refs)]
        elif c == "tag":
            args += [pick(self.refs), pick(self.refs), *self.maybe(.3, "--force")]
        elif c == "export":
            args += [pick(self.refs), pick(self.paths), *self.maybe(.3, "--flatten")]
        elif c == "gc":
            args += self.maybe(.5, "--dry-run")
        elif c == "pull":
            args += [pick(self.refs + ["a/b/c"]), *self.maybe(.3, "--revision", pick(self.refs)),
                     *self.maybe(.3, "--include", pick(self.globs)), *self.maybe(.2, "--variant", "fp16"),
                     *self.maybe(.2, "--all")]
        elif c == "adopt":
            args += self.maybe(.8, "--cache-dir", pick(self.paths))
        elif c == "push":
            args += [pick(self.refs), *self.maybe(.7, "--to", pick(self.urls + ["fleet", "nope"])),
                     *self.maybe(.3, "--as", pick(self.refs))]
        elif c == "fetch":
            args += [pick(self.refs), *self.maybe(.7, "--from", pick(self.urls + ["fleet", "nope"])),
                     *self.maybe(.3, "--name", pick(self.refs))]
        elif c == "remote add":
            args += [pick(["fleet", "", "x y"]), pick(self.urls), *self.maybe(.3, "-o", pick(["k=v", "novalue"]))]
        elif c in ("remote rm", "remote refs"):
            args += [pick(["fleet", "nope", ""])]
        elif c == "remote rm-ref":
            args += [pick(["fleet", "nope"]), pick(self.refs)]
        elif c == "remote gc":
            args += [*self.maybe(.5, pick(["fleet", "nope"])), *self.maybe(.4, "--grace", pick(["-1", "abc", "0"])),
                     *self.maybe(.4, "--dry-run")]
        return args + self.maybe(.4, "--json")


@pytest.mark.parametrize("seed", range(2))
def test_random_command_lines_end_in_a_result_or_one_error_line(family, tmp_path, monkeypatch, seed):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: every pull fails fast
    monkeypatch.chdir(tmp_path)  # `manifest` writes into the working folder
    home = tmp_path / "store"
    with Store(home) as store:
        for name in "AB":
            store.ingest(family[name], name)
    invocations, runner = Invocations(family, tmp_path, seed), CliRunner()
    for _ in range(150):
        args = invocations.one()
        r = runner.invoke(cli, ["--store", str(home), *args])
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
        if r.exit_code:
            assert r.exit_code in (1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert lines[-1].startswith("Error: ") and (len(lines) == 1 or "Usage:" in r.stderr), (args, r.stderr)
    with Store(home) as store:
        assert store.verify().ok
