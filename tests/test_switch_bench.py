"""The switch benchmark runs end to end on CPU and its figures add up."""

import json

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
