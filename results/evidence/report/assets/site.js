// sparsebench static report: sort any column, filter by method, target and status.
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

  document.addEventListener("DOMContentLoaded", function () {
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
