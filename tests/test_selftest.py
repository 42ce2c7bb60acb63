"""``mhc-kernels selftest``: stages in a time budget, reports, exit status (mhc_kernels/commands/selftest.py)."""

import json
import time

from mhc_kernels.commands import selftest
from mhc_kernels.commands.selftest import Stage


def test_cpu_run_reports_every_stage_and_writes_json_and_markdown(tmp_path, monkeypatch):
    from mhc_kernels.cli import main

    # a plain CPU machine: the stages' child processes see no Triton interpreter / TileLang emulator switch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MHC_TILELANG_EMULATE", raising=False)

    rc = main(["selftest", "--device", "cpu", "--time-budget", "300", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "selftest.json").read_text())
    stages = {s["name"]: s for s in doc["stages"]}
    assert stages["env"]["status"] == "passed" and stages["env"]["data"]["torch"]
    assert stages["check:reference"]["status"] == "passed"
    cases = stages["check:reference"]["data"]["cases"]
    assert cases and all({"op", "case", "status", "worst_ratio", "max_abs_err"} <= set(c) for c in cases)
    assert stages["tests"]["status"] == "not run" and "CUDA" in stages["tests"]["detail"]
    assert stages["bench"]["status"] == "passed" and stages["bench"]["data"]["records"]
    assert stages["serving"]["status"] == "not run" and "CUDA" in stages["serving"]["detail"]
    for b in ("triton", "tilelang"):        # not available on plain CPU: said so, not passed
        assert stages[f"check:{b}"]["status"] == "not run" and "was not checked" in stages[f"check:{b}"]["detail"]
    assert rc == 0 and doc["exit_status"] == 0
    md = (tmp_path / "selftest.md").read_text()
    assert "| check:reference | passed |" in md and "## Bandwidth" in md


def test_a_stage_out_of_time_is_never_passed(tmp_path):
    stages = selftest.selftest("cpu", 2.5, tmp_path, skip=())
    by = {s.name: s for s in stages}
    for name, s in by.items():
        if name != "env":
            assert s.status in ("not run", "timed out"), (name, s.status)
    assert selftest.exit_status(stages) == 3


def test_an_environment_stage_out_of_time_still_gives_every_backend_a_line(tmp_path, monkeypatch):
    """The environment stage's backend table is missing when it ran out of time (a loaded machine, a 2.5 s
    budget): the checks are then tried for every backend, never a KeyError."""
    monkeypatch.setattr(selftest, "stage_env", lambda deadline: Stage("env", "timed out", detail="cap reached"))
    stages = selftest.selftest("cpu", 0.5, tmp_path, skip=("tests", "bench"))
    assert [s.name for s in stages] == ["env", "check:reference", "check:triton", "check:tilelang", "tests", "bench",
                                        "serving"]
    assert all(s.status != "passed" for s in stages[1:4]), [(s.name, s.status) for s in stages]
    assert selftest.exit_status(stages) != 0


def test_a_hanging_stage_is_killed_at_its_cap():
    t0 = time.perf_counter()
    rc, out, err, seconds = selftest._child("import time; print('started', flush=True); time.sleep(30)", 1.0)
    assert rc is None and time.perf_counter() - t0 < 10
    st = selftest._killed(Stage("bench"), 1.0, out)
    assert st.status == "timed out" and "not passed" in st.detail


def test_exit_status_is_one_when_anything_failed():
    assert selftest.exit_status([Stage("env", "passed"), Stage("check:triton", "failed")]) == 1
    assert selftest.exit_status([Stage("env", "passed"), Stage("tests", "not run", detail="no CUDA device")]) == 0


def test_the_serving_stage_out_of_time_leaves_the_verdict_but_its_failure_counts():
    done = [Stage("env", "passed"), Stage("bench", "passed")]
    assert selftest.exit_status(done + [Stage("serving", "not run", detail="no time left (needs 20 s)")]) == 0
    assert selftest.exit_status(done + [Stage("serving", "timed out")]) == 0
    assert selftest.exit_status(done + [Stage("serving", "failed")]) == 1
    assert selftest.exit_status([Stage("env", "passed"), Stage("bench", "timed out")]) == 3


def test_stages_report_the_tilelang_kernels_they_compiled(tmp_path, monkeypatch):
    """A stage that compiles cold says how many kernels it added to TileLang's cache (the layout TileLang 0.1.x
    writes: <dir>/<version>/<platform>/kernels/<key>), so a selftest without a filled cache explains its time."""
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path))
    kernels = tmp_path / "0.1.15" / "linux-x86_64" / "kernels"
    kernels.mkdir(parents=True)
    (kernels / "old").mkdir()
    assert selftest.tilelang_cache_entries() == (str(tmp_path), 1)

    def stage():
        for key in ("a", "b"):
            (kernels / key).mkdir()
        return Stage("check:tilelang", status="passed", detail="ok")

    st = selftest._counting_compiles(stage)
    assert st.data["tilelang_compiled"] == 2 and "compiled 2 TileLang kernels" in st.detail
    assert selftest._counting_compiles(lambda: Stage("bench", status="passed")).data["tilelang_compiled"] == 0


def test_the_serving_stage_runs_decode_and_the_fp8_and_batch_invariant_boundary(tmp_path, monkeypatch):
    """On CUDA (faked here: the child's run is replaced by the files it writes): ``bench --decode`` and the boundary
    ops at the bandwidth goal's size with ``--fp8 --batch-invariant`` on the kernel backends; the stage keeps their
    rows and records, and selftest.md gets both tables."""
    ran = []

    def child(code, cap, *argv, cwd=None):
        ran.append(code)
        (tmp_path / "decode").mkdir()
        (tmp_path / "decode" / "decode.json").write_text(json.dumps({"rows": [
            {"op": "post_pre", "backend": "triton", "T": 1, "eager_us": 41.0, "graph_us": 9.5, "note": ""},
            {"op": "post_pre", "backend": "tilelang", "T": 1, "eager_us": 60.0, "graph_us": 8.25, "note": ""}]}))
        (tmp_path / "serving").mkdir()
        rec = {"op": "post_pre", "status": "ok", "median_us": 700.0, "gbps": 3000.0}
        (tmp_path / "serving" / "bench.json").write_text(json.dumps({"records": [
            dict(rec, impl="triton", pct_measured_bw=88.0), dict(rec, impl="triton+fp8", pct_measured_bw=86.0),
            dict(rec, impl="triton+bi", pct_measured_bw=80.0)]}))
        return 0, "", "", 12.0

    monkeypatch.setattr(selftest, "_child", child)
    st = selftest.stage_serving("cuda", ["triton", "tilelang"], time.monotonic() + 300, tmp_path)
    assert st.status == "passed", st.detail
    code = ran[0]
    assert "'--decode'" in code and "'--fp8'" in code and "'--batch-invariant'" in code
    assert "'--backends', 'triton', 'tilelang'" in code and f"'{selftest.SERVING['tokens']}'" in code
    assert "8.2 µs" in st.detail and "88% of copy BW" in st.detail
    selftest.write_reports([Stage("env", "passed"), st], tmp_path, "cuda", 300)
    md = (tmp_path / "selftest.md").read_text()
    assert "## Decode" in md and "| post_pre | tilelang | 1 | 60.0 | 8.2 |" in md
    assert "| post_pre | triton+fp8 | 700.0 | 3e+03 | 86 |" in md

    # no kernel backend, or a failing child: said so, never passed
    assert selftest.stage_serving("cuda", [], time.monotonic() + 300, tmp_path).status == "not run"
    monkeypatch.setattr(selftest, "_child", lambda code, cap, *a, cwd=None: (1, "", "boom", 1.0))
    assert selftest.stage_serving("cuda", ["triton"], time.monotonic() + 300, tmp_path / "none").status == "failed"
