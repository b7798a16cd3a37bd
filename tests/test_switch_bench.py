"""The switch benchmark runs end to end on CPU and its figures add up."""

import json

import pytest
import torch
from click.testing import CliRunner

from compstore.cli.main import cli


def test_bench_switch_tiny_sdxl_report(tmp_path):
    out = tmp_path / "report"
    r = CliRunner().invoke(cli, ["bench", "switch", "--size", "tiny", "--family", "sdxl",
                                 "--repeat", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert (out / "switch.png").stat().st_size > 10_000
    assert "| compstore page cache |" in (out / "report.md").read_text()
    (fam,) = report["families"]
    systems = {s["name"]: s for s in fam["systems"]}
    delta = fam["delta_bytes"]
    assert 0 < delta < fam["pipeline_bytes"]
    # compstore moves B's delta, from the page cache or the pinned tier; nothing when resident.
    assert systems["compstore page cache"]["bytes_moved"] == delta
    assert systems["compstore pinned"]["bytes_moved"] == delta
    assert systems["compstore resident (A->B->A)"]["bytes_moved"] == 0
    # The issue's goals are checked in every report; a tiny CPU run is not what they apply to.
    resident = next(g for g in fam["goals"] if g["goal"] == "A -> B -> A, the second switch")
    assert resident["value"] == round(systems["compstore resident (A->B->A)"]["seconds"], 4)
    assert not resident["applies"] and "a yardstick only" in (out / "report.md").read_text()
    # A dropped first, a budget of 0: B still reuses A's VAE and text encoders
    dropped = systems["compstore pinned, A dropped first"]
    assert dropped["bytes_moved"] == dropped["transfer"]["bytes_from_pinned"] == delta
    # staged on the host beforehand (`pool.stage`): B's move takes its delta from the pinned tier
    staged = systems["compstore staged (pool.stage), B's move only"]
    assert staged["bytes_moved"] == staged["transfer"]["bytes_from_pinned"] == delta
    # C shares two thirds of A's UNet: only the changed third moves, against its own floor
    c = systems["compstore A -> C (2/3 of the UNet shared)"]
    assert 0 < c["bytes_moved"] < delta
    assert c["floor_seconds"] == pytest.approx(c["bytes_moved"] / fam["h2d_bytes_per_s"])
    a_bytes = systems["compstore cold load"]["bytes_moved"]
    assert a_bytes > delta and systems["compstore cold pool, warm process"]["bytes_moved"] == a_bytes
    assert systems["diffusers naive"]["bytes_moved"] == fam["pipeline_bytes"]
    assert delta <= systems["diffusers expert"]["bytes_moved"] < fam["pipeline_bytes"]
    assert systems["floor"]["seconds"] == fam["floor_seconds"] > 0
    assert fam["image_equal"] and fam["image_max_abs_diff"] == 0
    assert all(s["seconds"] > 0 for s in fam["systems"])
    # compstore's systems carry the pool's own report of the switch, per component
    pc = systems["compstore page cache"]["transfer"]
    assert pc["bytes_uploaded"] == delta and {c["component"] for c in pc["components"]} >= {"unet", "vae"}
    assert systems["diffusers naive"]["transfer"] is None


@pytest.mark.parametrize("finished", [0, 2])
def test_a_run_stopped_midway_leaves_the_figures_it_took(tmp_path, monkeypatch, finished):
    """Stopped (a time limit, say) after `finished` systems: the report has them, and
    B's image check, which runs before any system (before the fix, a run stopped in
    the first system wrote no report at all)."""
    from compstore.loader import switch_bench

    timed = []
    median_run = switch_bench._median_run

    def stop(fn, repeat):
        if len(timed) == finished:
            raise KeyboardInterrupt
        timed.append(fn)
        return median_run(fn, repeat)

    monkeypatch.setattr(switch_bench, "_median_run", stop)
    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        switch_bench.run_switch_bench(size="tiny", families=("sdxl",), repeat=1, out=out,
                                      workdir=tmp_path, echo=lambda _: None)
    (fam,) = json.loads((out / "report.json").read_text())["families"]
    assert [s["name"] for s in fam["systems"]] == ["diffusers naive", "diffusers expert"][:finished]
    assert fam["delta_bytes"] > 0
    if finished:
        assert fam["pipeline_bytes"] > fam["delta_bytes"]
    assert fam["image_equal"] and "equals plain diffusers': True" in (out / "report.md").read_text()


def test_keep_reuses_a_built_family(tmp_path, monkeypatch):
    from compstore.loader import switch_bench

    folders, store = switch_bench._built_family("flux", "tiny", torch.float32, tmp_path, lambda _: None)
    refs = store.ls()
    store.close()
    monkeypatch.setattr(switch_bench, "switch_family", lambda *a, **k: pytest.fail("built again"))
    said = []
    again, store = switch_bench._built_family("flux", "tiny", torch.float32, tmp_path, said.append)
    assert again == folders and store.ls() == refs and "reusing" in said[0]
    store.close()


def test_build_only_builds_what_a_kept_run_then_reuses(tmp_path, monkeypatch):
    """`--build-only` (a GPU session builds while its tests run) leaves the family
    where `--keep` looks for it: the timed run that follows builds nothing."""
    from compstore.loader import switch_bench

    monkeypatch.chdir(tmp_path)  # where the default --out would be
    args = ["bench", "switch", "--size", "tiny", "--family", "sdxl", "--workdir", str(tmp_path)]
    r = CliRunner().invoke(cli, [*args, "--build-only", "--json"])
    assert r.exit_code == 0, r.output
    (built,) = json.loads(r.stdout).values()
    assert sorted(built) == ["A", "B", "C"] and all((tmp_path / p).is_dir() for p in built.values())
    assert not (tmp_path / "switch-report").exists()  # nothing timed, no report

    def stop(fn, repeat):
        raise KeyboardInterrupt  # the first system: the build is what this test is about

    monkeypatch.setattr(switch_bench, "switch_family", lambda *a, **k: pytest.fail("built again"))
    monkeypatch.setattr(switch_bench, "_median_run", stop)
    with pytest.raises(KeyboardInterrupt):
        switch_bench.run_switch_bench(size="tiny", families=("sdxl",), repeat=1, out=tmp_path / "r",
                                      workdir=tmp_path, keep=True, echo=lambda _: None)


@pytest.mark.parametrize("device", ["gpu", "cuda:7"])
def test_a_device_torch_cannot_use_is_a_one_line_error(device, tmp_path):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    r = CliRunner().invoke(cli, ["bench", "switch", "--size", "tiny", "--device", device,
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"Error: --device {device!r} is not a device this torch can use")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--workdir", "--out"])
def test_a_workdir_or_out_that_cannot_be_a_folder_is_a_one_line_error(option, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    bad, good = tmp_path / "a-file" / "sub", tmp_path / "fine"
    other = "--out" if option == "--workdir" else "--workdir"
    r = CliRunner().invoke(cli, ["bench", "switch", "--size", "tiny", option, str(bad), other, str(good)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"Error: {option} {str(bad)!r} cannot be a folder here (Not a directory)")
    assert (tmp_path / "a-file").read_text() == "not a folder"
    if option == "--workdir":
        assert not good.exists()  # found before the report's folder is made


@pytest.mark.parametrize("repeat", ["0", "-2"])
def test_a_repeat_below_one_is_a_one_line_error(repeat, tmp_path):
    r = CliRunner().invoke(cli, ["bench", "switch", "--size", "tiny", "--repeat", repeat,
                                 "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()
    assert line == f"Error: --repeat {repeat}: a median needs at least 1 timed run"
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_images_with_nan_in_the_same_places_are_equal_and_others_are_not():
    """Random 16-bit weights can overflow to NaN: the image check compares NaN
    positions and the finite values, where NaN != NaN would call them different."""
    import numpy as np

    from compstore.loader.switch_bench import compare_images, markdown

    ref = np.array([[0.25, np.nan], [1.0, 0.5]])
    assert compare_images(ref.copy(), ref) == (True, 0.0, 1)
    moved = np.array([[np.nan, 0.25], [1.0, 0.5]])
    assert compare_images(moved, ref)[0] is False
    assert compare_images(ref + 0.125, ref) == (False, 0.125, 1)
    family = {"family": "sdxl", "size": "full", "device": "cuda:0", "dtype": "float16",
              "pipeline_bytes": 1, "delta_bytes": 1, "h2d_bytes_per_s": 1e9, "floor_seconds": 1.0,
              "image_equal": True, "image_max_abs_diff": 0.0, "image_nan_values": 3072,
              "systems": []}  # a run stopped before its first system
    text = markdown({"device": "H100", "torch": "2.11", "repeat": 3, "families": [family]})
    assert "equals plain diffusers': True (max abs diff 0; 3,072 NaN values in diffusers' image)" in text


def test_the_report_checks_the_issues_goals_where_they_apply():
    from compstore.loader.switch_bench import goals, markdown

    def system(name, seconds, moved=1):
        return {"name": name, "seconds": seconds, "upload_seconds": None, "bytes_moved": moved}

    family = {"family": "sdxl", "size": "full", "device": "cuda:0", "dtype": "float16",
              "pipeline_bytes": 6, "delta_bytes": 5, "h2d_bytes_per_s": 5e10, "floor_seconds": 0.1,
              "image_equal": True, "image_max_abs_diff": 0.0, "image_nan_values": 0,
              "systems": [system("diffusers naive", 2.0), system("compstore page cache", 0.44),
                          system("compstore pinned", 0.16), system("compstore resident (A->B->A)", 0.01, 5)]}
    found = {g["goal"]: g for g in goals(family)}
    assert [g["met"] for g in found.values()] == [True, False, False, None, True]
    assert found["A -> B, B's delta in the pinned tier, vs the floor"]["value"] == 1.6
    assert found["cold load of A onto the device"]["value"] is None  # not timed (yet)
    assert all(g["applies"] for g in found.values())
    text = markdown({"device": "H100", "torch": "2.11", "repeat": 3,
                     "families": [{**family, "goals": goals(family)}]})
    assert "this run is one" in text and "| A -> B -> A, the second switch | 0.01 | " \
        "<= 0.05 s, 0 bytes moved | no |" in text
    assert [g["applies"] for g in goals({**family, "size": "tiny"})] == [False] * 5
    assert goals({**family, "family": "flux"}) == []


@pytest.mark.parametrize("option", ["--device", "--workdir"])
def test_build_only_refuses_a_bad_device_or_workdir_in_one_line(option, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    bad = {"--device": "gpu", "--workdir": str(tmp_path / "a-file" / "sub")}[option]
    args = ["bench", "switch", "--build-only", "--size", "tiny", "--family", "sdxl", option, bad]
    if option == "--device":
        args += ["--workdir", str(tmp_path / "work")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith({"--device": "Error: --device 'gpu' is not a device this torch can use",
                            "--workdir": f"Error: --workdir {bad!r} cannot be a folder here"}[option])
    assert (tmp_path / "a-file").read_text() == "not a folder" and not (tmp_path / "work").exists()
