"""The static report built from the committed quick-suite records: opened in headless
Chromium, its tables have the right rows, sort and filter; its plots load; its links
resolve; its console stays clean; every run page's command reproduces the run's spec."""
import json
import re
import shlex
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "results" / "quick"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from sparsebench.report.site import build_site
    from sparsebench.store import load_records

    out = tmp_path_factory.mktemp("site")
    build_site(load_records(QUICK), out, svg=False)
    return out


def expected_rows():
    """(model) -> distinct (method, its arguments, target, standing) in the raw record files; the
    standing is the status, or "did_not_act" for an ok run whose mechanism did not act."""
    rows = Counter()
    for path in (QUICK / "records").glob("*.json"):
        d = json.loads(path.read_text())
        m = d.get("mechanism") or {}
        idle = d["status"] == "ok" and m.get("declared") and not m.get("control") and not m.get("acted")
        rows[(d["model"], d["method"], json.dumps(d["spec"]["method_args"], sort_keys=True),
              d["target"]["kind"], d["target"]["value"], "did_not_act" if idle else d["status"])] += 1
    per_model = Counter(k[0] for k in rows if isinstance(k, tuple))
    return per_model


def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get update && apt-get install -y chromium)")
    return exe


# How a probe hands its findings back: JSON in a <pre> the test reads from the dumped DOM.
PROBE_REPORT = """  out.errors = window.__errors;
  var pre = document.createElement("pre");
  pre.id = "probe-result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""
PROBE = """
<script>
window.addEventListener("load", function () {
  var out = {tables: {}, raw: {}, images: [], sorted: null, filtered: {}, counts: {}};
  document.querySelectorAll("table.board").forEach(function (t) {   // ranked rows and left-out rows, per board
    var id = t.id.replace(/-left$/, "");
    out.raw[t.id] = t.tBodies[0].rows.length;
    out.tables[id] = (out.tables[id] || 0) + t.tBodies[0].rows.length;
  });
  document.querySelectorAll("img").forEach(function (img) {
    out.images.push([img.getAttribute("src"), img.complete && img.naturalWidth > 0]);
  });
  var table = document.getElementById("board-0");
  var th = Array.prototype.find.call(table.tHead.rows[0].cells, function (c) { return c.textContent === "top-1 (%)"; });
  var col = Array.prototype.indexOf.call(table.tHead.rows[0].cells, th);
  th.click(); th.click();    // second click: descending
  out.sortDir = th.getAttribute("aria-sort");
  out.sorted = Array.prototype.map.call(table.tBodies[0].rows, function (r) {
    return parseFloat(r.cells[col].getAttribute("data-sort"));
  });
  var method = document.getElementById("filter-method");
  method.value = "l1-channel";
  method.dispatchEvent(new Event("change"));
  document.querySelectorAll("table.board").forEach(function (t) {
    out.filtered[t.id] = Array.prototype.filter.call(t.tBodies[0].rows, function (r) { return !r.hidden; })
      .map(function (r) { return r.getAttribute("data-method") + " " + r.getAttribute("data-target"); });
    out.counts[t.id] = document.getElementById(t.id + "-count").textContent;
  });
  var target = document.getElementById("filter-target");
  target.value = "flops=0.25";
  target.dispatchEvent(new Event("change"));
  out.both = Array.prototype.filter.call(table.tBodies[0].rows, function (r) { return !r.hidden; }).length;
  var status = document.getElementById("filter-status");
  method.value = ""; target.value = ""; status.value = "ok";
  status.dispatchEvent(new Event("change"));
  out.statusOk = Array.prototype.filter.call(table.tBodies[0].rows, function (r) { return !r.hidden; }).length;
""" + PROBE_REPORT
CATCH = ('<script>window.__errors = []; window.addEventListener("error", function (e) {'
         ' window.__errors.push(e.message || ("failed to load " + (e.target && (e.target.src || e.target.href)))); },'
         ' true);</script>')


def dump_dom(exe: str, page: Path):
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    return proc.stdout, proc.stderr


def test_front_page_in_chromium_sorts_filters_and_loads_plots(site):
    exe = chromium()
    html = (site / "index.html").read_text()
    probe = site / "probe.html"
    probe.write_text(html.replace("<head>", "<head>" + CATCH, 1).replace("</body>", PROBE + "</body>", 1))
    try:
        dom, log = dump_dom(exe, probe)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert found, f"probe did not run; chromium said:\n{log[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))

    expected = expected_rows()
    assert sorted(result["tables"].values()) == sorted(expected.values()) and len(expected) == 2
    assert result["images"] and all(ok for _, ok in result["images"]), result["images"]
    assert result["sortDir"] == "descending"
    values = [v for v in result["sorted"] if v is not None]
    first = result["raw"]["board-0"]                    # the ranked rows; left-out ones are in "board-0-left"
    assert values == sorted(values, reverse=True) and len(values) == first
    for tid, rows in result["filtered"].items():
        assert (rows or tid.endswith("-left")) and all(r.startswith("l1-channel ") for r in rows), rows
        assert result["counts"][tid] == f"{len(rows)} of {result['raw'][tid]} rows"
    assert result["both"] == 1
    ok_rows = sum(1 for p in (QUICK / "records").glob("*.json") if json.loads(p.read_text())["status"] == "ok")
    assert ok_rows == len(list((QUICK / "records").glob("*.json")))      # every committed run met its target
    assert result["statusOk"] == first
    assert result["errors"] == []
    console = [line for line in log.splitlines() if "CONSOLE" in line]
    assert not console, console


def test_every_link_and_image_resolves(site):
    pages = list(site.rglob("*.html"))
    assert len(pages) == 3 + len(list((QUICK / "records").glob("*.json")))
    for page in pages:
        text = page.read_text()
        for ref in re.findall(r'(?:href|src)="([^"]+)"', text):
            url = urlparse(ref)
            assert not url.scheme and not url.netloc, f"{page.name}: external reference {ref}"   # no CDN
            if not url.path:
                continue
            target = (page.parent / unquote(url.path)).resolve()
            assert target.is_file(), f"{page.relative_to(site)} -> {ref}"
            if url.fragment:
                assert f'id="{url.fragment}"' in target.read_text(), f"{page.name} -> {ref}"


def test_run_pages_give_the_command_that_reproduces_the_spec(site):
    from sparsebench.cli import _spec_from_args, build_parser
    from sparsebench.runners.pipeline import resolve
    from sparsebench.store import load_records

    import html as htmllib

    for record in load_records(QUICK):
        page = (site / "runs" / f"{record.run_id}.html").read_text()
        command = htmllib.unescape(re.search(r'<pre id="command">(.*?)</pre>', page, re.S).group(1))
        argv = shlex.split(command)
        assert argv[:2] == ["sparsebench", "run"]
        spec = resolve(_spec_from_args(build_parser().parse_args(argv[1:])))
        assert spec.hash == record.spec_hash, command


def test_protocol_page_says_what_the_numbers_mean(site):
    text = (site / "protocol.html").read_text()
    for words in ("Budgets", "Splits and selection", "Seeds", "Prunable set", "Measurement", "not realizable",
                  "Mechanism verdict and null controls", "Δ control",
                  "first conv (input layer) and classifier dense", "1211"):
        assert words in text, words


def test_site_of_an_empty_directory_says_so(tmp_path):
    from sparsebench.report.site import build_site

    files = build_site([], tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'id="empty"' in index and (tmp_path / "site" / "protocol.html") in files


def test_a_rebuilt_site_drops_the_pages_of_runs_no_longer_recorded(tmp_path):
    from sparsebench.report.site import build_site
    from sparsebench.store.record import RunRecord

    records = [RunRecord.from_json(p.read_text()) for p in sorted((QUICK / "records").glob("dense__*.json"))]
    site = tmp_path / "site"
    build_site(records, site, svg=False)
    first = sorted(p.name for p in (site / "runs").glob("*.html"))
    assert len(first) == len(records) == 2
    (site / "notes.txt").write_text("a file the site did not write, outside runs/ and plots/")
    build_site(records[:1], site, svg=False)
    assert sorted(p.name for p in (site / "runs").glob("*.html")) == [f"{records[0].run_id}.html"]
    assert (site / "notes.txt").exists()


def test_report_command_writes_the_site_and_lists_every_file(tmp_path, capsys):
    from sparsebench.cli import main

    records = tmp_path / "res" / "records"
    records.mkdir(parents=True)
    for path in sorted((QUICK / "records").glob("dense__*.json")):
        shutil.copy(path, records / path.name)
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    written = [p for p in (tmp_path / "site").rglob("*") if p.is_file()]
    assert out.startswith(f"wrote {len(written)} files")
    for p in written:
        assert p.name in out


# --- mechanism and curves, on made-up records (fast; no Chromium) --------------------------------
def _curve(points=40, events=5, values=False):
    c = {"step": list(range(0, 3 * points, 3)), "loss": [2.3 * 0.97 ** i for i in range(points)],
         "lr": [0.1 * (1 - i / points) for i in range(points)], "steps_per_point": 3,
         "val": [[30, 0.81], [60, 0.9], [117, 0.93]],
         "events": [[i * 20, "topology_update", {"swapped": 120 - i}] for i in range(events)]}
    if values:
        c["values"] = {"masked_val_top1": [[s, 0.5 + s / 300] for s in range(0, 120, 15)]}
    return c


def _mechanism(**kw):
    from sparsebench.store import Mechanism

    return Mechanism(**{"declared": True, "acted": True, "reason": "acted: swapped_fraction = 0.1235 (>= 0.01)",
                        **kw})


def test_run_page_shows_the_verdict_the_metrics_beside_their_thresholds_and_the_curves(tmp_path):
    import xml.etree.ElementTree as ET

    from sparsebench.report.site import build_site
    from conftest import make_record

    mechanism = _mechanism(
        metrics={"swapped_fraction": 0.1234567, "per_phase": [0.31234, 0.2, 0.1], "per_layer": {"conv1": 10, "fc": 2},
                 "long": list(range(40))},
        thresholds={"swapped_fraction": [">=", 0.01], "score_change": ["<=", 0.5]})
    record = make_record("rigl", mechanism=mechanism,
                         curves={"method": _curve(values=True), "finetune": _curve(points=10, events=0)})
    written = build_site([record], tmp_path)
    page = (tmp_path / "runs" / f"{record.run_id}.html").read_text()
    mech = page[page.index('id="mechanism"'):page.index('id="curves"')]
    assert '<b>acted</b>' in mech and "acted: swapped_fraction = 0.1235 (&gt;= 0.01)" in mech
    row = re.search(r"<tr><td[^>]*>swapped_fraction</td>(.*?)</tr>", mech).group(1)
    assert "0.1235" in row and "≥ 0.01" in row and "meets" in row                  # threshold beside its metric
    assert re.search(r"score_change</td><td[^>]*>–</td><td[^>]*>≤ 0.5</td><td[^>]*>not measured", mech)
    assert "0.3123, 0.2, 0.1" in mech                                               # a per-phase list, compact
    assert re.search(r">conv1</td><td[^>]*>10<", mech) and re.search(r">fc</td><td[^>]*>2<", mech)   # sub-rows
    assert "0, 1, 2" in mech and "…, 37, 38, 39, (40 values)" in mech
    for stage, events, series in (("method", 5, True), ("finetune", 0, False)):
        svg = tmp_path / "runs" / f"{record.run_id}__curve_{stage}.svg"
        assert svg in written and f'src="{svg.name}"' in page
        root = ET.parse(svg).getroot()                                              # well-formed, standalone SVG
        texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
        assert ("topology_update (5)" in texts) == bool(events)
        assert ("masked_val_top1" in texts) == series and "validation top-1" in texts and "learning rate" in texts


def test_a_schema_2_record_without_mechanism_or_curves_still_renders(tmp_path):
    from sparsebench.report.site import build_site
    from sparsebench.store.record import RunRecord
    from conftest import make_record

    d = make_record("magnitude-global").to_dict()
    for key in ("mechanism", "curves"):
        d.pop(key, None)
    record = RunRecord.from_dict({**d, "schema": 2})
    assert record.mechanism is None and record.curves is None
    build_site([record], tmp_path)
    page = (tmp_path / "runs" / f"{record.run_id}.html").read_text()
    assert "<b>not recorded</b>" in page and 'id="no-curve"' in page and "No curve recorded" in page
    assert not list((tmp_path / "runs").glob("*.svg"))
    assert ">not recorded<" in (tmp_path / "index.html").read_text()               # the table's mechanism column


def test_a_run_whose_mechanism_did_not_act_is_listed_apart_never_ranked(tmp_path, monkeypatch):
    from sparsebench.methods import METHODS
    from sparsebench.report.leaderboard import ranked, records_frame
    from sparsebench.report.runs import runs_frame, summarize
    from sparsebench.report.site import build_site
    from conftest import make_record

    monkeypatch.setattr(METHODS.get("rigl").factory, "null_control", {"update_topology": False})
    idle = _mechanism(acted=False, reason="did not act: swapped = 0 (needs >= 1)")
    control = _mechanism(acted=False, reason="null control", control=True)
    records = [make_record("rigl", s, t, mechanism=_mechanism()) for s, t in enumerate([0.80, 0.84, 0.82])]
    records += [make_record("rigl", 3, 0.95, mechanism=idle)]
    records += [make_record("rigl", s, t, mechanism=control, spec={"method_args": {"update_topology": False}},
                            run_id=f"ctl-{s}") for s, t in enumerate([0.78, 0.80, 0.80])]

    summary = summarize(runs_frame(records))      # the site's means take the runs the leaderboard ranks
    ok = summary[summary["status"] == "ok"]
    assert sorted(rid for ids in ok["run_ids"] for rid in ids) == sorted(ranked(records_frame(records))["run_id"])
    rigl = ok.set_index("method").loc["rigl"]
    assert rigl["top1"] == pytest.approx(82.0) and rigl["control_pairs"] == 3
    assert rigl["control_delta"] == pytest.approx(8 / 3)

    build_site(records, tmp_path)
    index = (tmp_path / "index.html").read_text()
    board = re.search(r'<table class="board" id="board-0".*?</table>', index, re.S).group(0)
    left = re.search(r'<table class="board left-out" id="board-0-left".*?</table>', index, re.S).group(0)
    assert "rigl-3-0.5-cpu.html" not in board and "rigl-3-0.5-cpu.html" in left
    assert "left out of the means: its mechanism did not act" in (tmp_path / "runs" / "rigl-3-0.5-cpu.html").read_text()
    assert 'data-status="did_not_act"' in left and "swapped = 0 (needs &gt;= 1)" in left and ">did not act<" in left
    assert len(re.findall(r"<tr ", board)) == 2 and 'data-status="did_not_act"' not in board
    rigl_row = re.search(r'<tr data-method="rigl" .*?</tr>', board, re.S).group(0)
    assert ">acted<" in rigl_row and "+2.67 ± " in rigl_row and "(n=3; p " in rigl_row
    assert '<option value="did_not_act">' in index                                   # the status filter offers it


COMPARE_PROBE = """
<script>
window.addEventListener("load", function () {
  var out = {};
  function rows() {
    return Array.prototype.map.call(document.getElementById("compare-table").tBodies[0].rows, function (r) {
      return Array.prototype.map.call(r.cells, function (c) { return c.textContent; });
    });
  }
  var a = document.getElementById("compare-a"), b = document.getElementById("compare-b");
  a.value = "rigl"; b.value = "gap"; b.dispatchEvent(new Event("change"));
  out.reversed = rows();
  a.value = "gap"; b.value = "rigl"; b.dispatchEvent(new Event("change"));
  out.forward = rows();
""" + PROBE_REPORT


def test_compare_page_pairs_two_methods_and_tables_show_ranks(tmp_path):
    """Three seeds of two methods: the comparison page shows the paired difference both ways round,
    with the t-interval scipy gives; the front page ranks them; the protocol lists the seeds needed."""
    import numpy as np
    from scipy import stats

    from conftest import make_record
    from sparsebench.report.site import build_site

    tops = {"gap": [0.90, 0.93, 0.91], "rigl": [0.85, 0.86, 0.88]}
    records = [make_record(m, s, t, run_id=f"{m}-{s}") for m, ts in tops.items() for s, t in enumerate(ts)]
    build_site(records, tmp_path, svg=False)
    index = (tmp_path / "index.html").read_text()
    assert re.search(r'data-method="gap".*?<td class="text" data-sort="[\d.]+"><span title="best">1</span>', index)
    assert re.search(r'data-method="rigl".*?<span title="paired t over 3 seeds; Holm-adjusted p against the best-mean '
                     r'row = 0.0[\d]+">2</span>', index)
    assert "seeds needed (median)" in (tmp_path / "protocol.html").read_text()

    exe = chromium()
    html = (tmp_path / "compare.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("<head>", "<head>" + CATCH, 1).replace("</body>", COMPARE_PROBE + "</body>", 1))
    dom, log = dump_dom(exe, probe)
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert found, f"probe did not run; chromium said:\n{log[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    d = 100 * (np.array(tops["gap"]) - np.array(tops["rigl"]))
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    (forward,), (reversed_,) = result["forward"], result["reversed"]
    assert forward[4] == "3" and forward[7] == f"+{d.mean():.2f}"
    assert forward[8] == f"[+{ci.low:.2f}, +{ci.high:.2f}]"
    assert reversed_[7] == f"-{d.mean():.2f}" and reversed_[8] == f"[-{ci.high:.2f}, -{ci.low:.2f}]"
    assert reversed_[5] == forward[6] and result["errors"] == []


RESOURCES = {"stages": {     # finetune first, as a JSON record with sorted keys has it
    "finetune": {"samples": 20, "steps": 200, "wall_seconds": 40.0, "loader_wait_fraction": 0.02,
                 "cpu_percent_mean": 95.0, "cpu_percent_peak": 120.0, "rss_mb_mean": 2000.0, "rss_mb_peak": 2050.0,
                 "shm_mb_peak": 256.0, "gpu_util_percent_mean": 93.0, "gpu_mem_used_mb_peak": 8800.0,
                 "gpu_peak_allocated_mb": 7000.0},
    "method": {"samples": 40, "steps": 300, "wall_seconds": 80.0, "loader_wait_fraction": 0.35,
               "cpu_percent_mean": 180.0, "cpu_percent_peak": 199.0, "rss_mb_mean": 2100.0, "rss_mb_peak": 2400.0,
               "shm_mb_peak": 512.0, "gpu_util_percent_mean": 41.0, "gpu_mem_used_mb_peak": 9000.0,
               "gpu_peak_allocated_mb": 7000.0}},
    "sample_seconds": 2.0, "source": "psutil", "gpu_source": "nvml"}


def test_run_page_shows_each_stages_resource_use_beside_the_curves_and_names_a_starved_stage(tmp_path):
    from sparsebench.report.site import build_site
    from conftest import make_record

    record = make_record("rigl", curves={"method": _curve(), "finetune": _curve(points=10, events=0)},
                         resources=RESOURCES)
    build_site([record], tmp_path, svg=False)
    page = (tmp_path / "runs" / f"{record.run_id}.html").read_text()
    both = page[page.index('class="curves-resources"'):page.index("Kept structure")]
    assert 'class="curves"' in both and 'id="resources"' in both          # one row: the curves, then resources
    assert re.search(r"<th>method</th><th>finetune</th>", both)          # training order
    assert re.search(r">loader wait <small>of step time</small></td><td>35\.0%</td><td>2\.0%</td>", both)
    assert re.search(r">GPU utilisation, mean <small>%</small></td><td>41</td><td>93</td>", both)
    assert "Starved: the method steps" in both and "finetune steps" not in both
    assert "sampled every 2.0 s (psutil, GPU: nvml)" in both
    assert "No resource use recorded" not in page

    old = make_record("magnitude-global")              # a record from before the field
    build_site([old], tmp_path / "old", svg=False)
    assert 'id="no-resources"' in (tmp_path / "old" / "runs" / f"{old.run_id}.html").read_text()


def test_the_report_pairs_a_seed_method_with_its_signal_control(tmp_path):
    """The report's summary (runs.summarize) and front page carry Δ signal and the controls verdict."""
    from conftest import make_record
    from sparsebench.report.runs import runs_frame, summarize
    from sparsebench.report.site import build_site
    from sparsebench.store import Mechanism

    acted = Mechanism(declared=True, acted=True, reason="acted")
    signal = Mechanism(declared=True, acted=True, reason="signal control", signal_control="shuffled labels")
    records = [make_record("pass", s, 0.8 + 0.01 * s, mechanism=acted, kind="flops") for s in range(3)]
    records += [make_record("pass", s, 0.7 + 0.01 * s + 0.002 * (s % 2), mechanism=signal, kind="flops",
                            run_id=f"sig-{s}", spec={"method_args": {"labels": "shuffled"}}) for s in range(3)]
    summary = summarize(runs_frame(records)).set_index("method")
    row = summary.loc["pass"]
    assert row["signal"] == "pass[labels=shuffled]" and row["signal_pairs"] == 3
    assert row["signal_delta"] == pytest.approx(10 - 0.2 / 3, abs=1e-6)
    assert summary.loc["pass[labels=shuffled]", "mechanism"] == "signal control"
    build_site(records, tmp_path / "site", svg=False)
    page = (tmp_path / "site" / "index.html").read_text()
    assert "Δ signal" in page and "vs pass[labels=shuffled] (n=3" in page and "beats signal control" in page
