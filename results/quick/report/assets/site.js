// sparsebench static report: sort any column, filter by method, target and status; compare two methods.
// Vanilla JS, no network; the tables are plain HTML, so the page reads without JS too.
(function () {
  "use strict";

  function cellValue(row, index, type) {
    var cell = row.cells[index];
    var raw = cell ? cell.getAttribute("data-sort") : null;
    if (raw === null) raw = cell ? cell.textContent.trim() : "";
    if (type === "num") {
      var v = parseFloat(raw);
      return isNaN(v) ? null : v;
    }
    return raw.toLowerCase();
  }

  function sortTable(table, th) {
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var type = th.getAttribute("data-type") || "text";
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "ascending" ? 1 : -1;
    rows.sort(function (a, b) {
      var x = cellValue(a, index, type), y = cellValue(b, index, type);
      if (x === null && y === null) return 0;
      if (x === null) return 1;            // empty cells last, either direction
      if (y === null) return -1;
      return x < y ? -sign : x > y ? sign : 0;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }

  function applyFilters() {
    var want = {};
    document.querySelectorAll("select[data-filter]").forEach(function (s) {
      want[s.getAttribute("data-filter")] = s.value;
    });
    document.querySelectorAll("table.board").forEach(function (table) {
      var shown = 0, rows = table.tBodies[0].rows;
      Array.prototype.forEach.call(rows, function (r) {
        var ok = Object.keys(want).every(function (k) {
          return !want[k] || r.getAttribute("data-" + k) === want[k];
        });
        r.hidden = !ok;
        if (ok) shown += 1;
      });
      var count = document.getElementById(table.id + "-count");
      if (count) count.textContent = shown + " of " + rows.length + " rows";
    });
  }

  // The comparison page: every pair's numbers are computed by `sparsebench report` and embedded;
  // choosing B − A instead of A − B only flips signs and swaps the interval's ends.
  function fmt(v, digits, signed) {
    if (v === null || v === undefined) return "–";
    var s = v.toFixed(digits);
    return signed && v >= 0 ? "+" + s : s;
  }

  function fmtP(p) {
    if (p === null || p === undefined) return "–";
    return p < 0.001 ? p.toExponential(1) : p.toFixed(3);
  }

  function renderComparison(data) {
    var a = document.getElementById("compare-a").value, b = document.getElementById("compare-b").value;
    var body = document.getElementById("compare-table").tBodies[0];
    while (body.firstChild) body.removeChild(body.firstChild);
    var flip = a > b, rows = data.pairs[flip ? b + "\t" + a : a + "\t" + b] || [];
    document.getElementById("compare-empty").hidden = rows.length > 0 || a === b;
    rows.forEach(function (r) {
      var s = data.settings[r[0]], sign = flip ? -1 : 1;
      var mean = r[2] === null ? null : sign * r[2];
      var low = r[3] === null ? null : sign * (flip ? r[4] : r[3]);
      var high = r[4] === null ? null : sign * (flip ? r[3] : r[4]);
      var cells = [s.model, s.dataset, s.target, s.device, String(r[1]), fmt(flip ? r[9] : r[8], 2),
                   fmt(flip ? r[8] : r[9], 2), r[1] ? fmt(mean, 2, true) : "no common seed",
                   low === null ? "–" : "[" + fmt(low, 2, true) + ", " + fmt(high, 2, true) + "]",
                   fmtP(r[5]), fmtP(r[6]), r[7] === null ? "–" : String(r[7])];
      var tr = document.createElement("tr");
      cells.forEach(function (text, i) {
        var td = document.createElement("td");
        td.textContent = text;
        if (i < 4) td.className = "text";
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function setupComparison() {
    var holder = document.getElementById("comparisons");
    if (!holder) return;
    var data = JSON.parse(holder.textContent);
    var a = document.getElementById("compare-a"), b = document.getElementById("compare-b");
    if (data.methods.length > 1) b.selectedIndex = 1;
    [a, b].forEach(function (s) { s.addEventListener("change", function () { renderComparison(data); }); });
    renderComparison(data);
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupComparison();
    document.querySelectorAll("table.board th[data-type]").forEach(function (th) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortTable(th.closest("table"), th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortTable(th.closest("table"), th); }
      });
    });
    document.querySelectorAll("select[data-filter]").forEach(function (s) {
      s.addEventListener("change", applyFilters);
    });
    applyFilters();
  });
})();
