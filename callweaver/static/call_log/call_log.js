/* Call log and call timeline pages. Only measured figures are shown; anything unmeasured is "—".
   All text goes in through textContent: a caller's words or a node name are never parsed as markup. */
(function () {
  "use strict";
  var DASH = "\u2014";
  var PAGE_SIZE = 25;
  var OUTCOME_LABELS = { end_node: "end node", transfer: "transfer", hang_up: "hang-up", error: "error",
                         busy: "busy", no_answer: "no answer", canceled: "canceled", silence: "silence",
                         ended_by_api: "ended by end-call", in_progress: "in progress", unknown: "unknown" };

  function $(id) { return document.getElementById(id); }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function fmtMs(v) { return isNum(v) ? (Math.round(v * 10) / 10) + " ms" : DASH; }
  function fmtDuration(s) {
    if (!isNum(s)) return DASH;
    var m = Math.floor(s / 60), r = Math.round(s - m * 60);
    return m ? m + " min " + r + " s" : (Math.round(s * 10) / 10) + " s";
  }
  function fmtTime(epoch) {
    var d = new Date(epoch * 1000);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
      two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }
  function pathLabel(p) { return p === "traditional" ? "<Gather>" : (p || DASH); }
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function pill(value, label) { return el("span", "pill " + String(value || ""), label || value || DASH); }
  function fail(message) {
    var b = $("banner");
    b.textContent = message;
    b.classList.add("show");
    document.body.setAttribute("data-state", "error");
  }
  function getJson(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok || !body.success) throw new Error(body.error || ("HTTP " + r.status));
        return body;
      });
    });
  }

  // ---------------------------------------------------------------- call log
  function currentQuery() {
    var q = new URLSearchParams(location.search);
    return { status: q.get("status") || "", path: q.get("path") || "", language: q.get("language") || "",
             offset: Math.max(0, parseInt(q.get("offset") || "0", 10) || 0) };
  }
  function go(query) {
    var q = new URLSearchParams();
    ["status", "path", "language"].forEach(function (k) { if (query[k]) q.set(k, query[k]); });
    if (query.offset) q.set("offset", String(query.offset));
    var windowS = new URLSearchParams(location.search).get("window");
    if (windowS) q.set("window", windowS);
    location.search = q.toString();
  }

  function renderRows(page) {
    var body = $("call-rows");
    while (body.firstChild) body.removeChild(body.firstChild);
    if (!page.calls.length) {
      var tr = el("tr"), td = el("td", "empty", "no calls match");
      td.colSpan = 12;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    page.calls.forEach(function (c) {
      var tr = el("tr");
      tr.setAttribute("data-tracking-id", c.trackingId);
      var link = el("a", "call-link", c.trackingId);
      link.href = "/dashboard/calls/" + encodeURIComponent(c.trackingId);
      var first = el("td");
      first.appendChild(link);
      tr.appendChild(first);
      tr.appendChild(el("td", "num", fmtTime(c.startedAt)));
      var status = el("td"); status.appendChild(pill(c.status)); tr.appendChild(status);
      var path = el("td"); path.appendChild(pill(c.path, pathLabel(c.path))); tr.appendChild(path);
      tr.appendChild(el("td", null, c.language));
      var duration = el("td", "r num", fmtDuration(c.durationS));
      if (c.reasons && c.reasons.durationS) duration.title = c.reasons.durationS;
      tr.appendChild(duration);
      tr.appendChild(el("td", "r num cell-turns", c.turns));
      var p50 = el("td", "r num cell-p50", fmtMs(c.firstTokenP50Ms));
      if (c.reasons && c.reasons.firstTokenP50Ms) p50.title = c.reasons.firstTokenP50Ms;
      tr.appendChild(p50);
      tr.appendChild(el("td", "r num cell-failovers", c.failovers));
      tr.appendChild(el("td", "r num cell-cache", c.cacheHits));
      var outcome = el("td", "cell-outcome"); outcome.appendChild(pill(c.outcome, OUTCOME_LABELS[c.outcome]));
      tr.appendChild(outcome);
      tr.appendChild(el("td", "num", c.to || DASH));
      body.appendChild(tr);
    });
    var last = page.offset + page.calls.length;
    $("call-count").textContent = page.total + " call" + (page.total === 1 ? "" : "s");
    $("page-label").textContent = page.total ? (page.offset + 1) + "\u2013" + last + " of " + page.total : "";
    $("prev").disabled = page.offset <= 0;
    $("next").disabled = last >= page.total;
  }

  function renderLatency(data) {
    var host = $("latency-plot");
    var points = data.points.filter(function (p) { return isNum(p.p50); });
    host.setAttribute("data-points", String(points.length));
    $("latency-caption").textContent = "p50 and p95 of every turn's first token, per " +
      (data.bucketSeconds < 60 ? data.bucketSeconds + " s" : Math.round(data.bucketSeconds / 60) + " min");
    if (!points.length) {
      $("latency-reason").textContent = DASH + " " + (data.reason || "no measured turns in this window");
      host.setAttribute("data-rendered", "true");
      return;
    }
    var xs = points.map(function (p) { return p.at + data.bucketSeconds / 2; });
    var p50 = points.map(function (p) { return p.p50; });
    var p95 = points.map(function (p) { return p.p95; });
    var width = Math.max(320, host.clientWidth || 900);
    var now = Date.now() / 1000;
    new uPlot({
      width: width, height: 240,
      scales: {
        x: { time: true, range: function () { return [now - data.windowSeconds, now]; } },
        y: { range: function (u, min, max) { return [0, Math.max(100, max * 1.15)]; } }
      },
      axes: [{}, { label: "ms", values: function (u, ticks) { return ticks.map(function (t) { return t + ""; }); } }],
      series: [
        {},
        { label: "p50", stroke: "#2563eb", width: 2, points: { show: true, size: 5 } },
        { label: "p95", stroke: "#db2777", width: 2, dash: [6, 4], points: { show: true, size: 5 } }
      ]
    }, [xs, p50, p95], host);
    host.setAttribute("data-rendered", "true");
  }

  function initCallLog() {
    var query = currentQuery();
    var form = $("filters");
    form.status.value = query.status;
    form.path.value = query.path;
    form.language.value = query.language;
    form.addEventListener("change", function () {
      go({ status: form.status.value, path: form.path.value, language: form.language.value.trim(), offset: 0 });
    });
    form.addEventListener("submit", function (e) { e.preventDefault(); });
    $("prev").addEventListener("click", function () { go(Object.assign(query, { offset: Math.max(0, query.offset - PAGE_SIZE) })); });
    $("next").addEventListener("click", function () { go(Object.assign(query, { offset: query.offset + PAGE_SIZE })); });
    var params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(query.offset) });
    ["status", "path", "language"].forEach(function (k) { if (query[k]) params.set(k, query[k]); });
    var windowSelect = $("window-select");
    var windowS = parseInt(new URLSearchParams(location.search).get("window") || "3600", 10) || 3600;
    windowSelect.value = String(windowS);
    windowSelect.addEventListener("change", function () {
      var q = new URLSearchParams(location.search);
      q.set("window", windowSelect.value);
      location.search = q.toString();
    });
    Promise.all([getJson("/api/call-log?" + params.toString()),
                 getJson("/api/call-latency?window=" + windowS)]).then(function (res) {
      renderRows(res[0]);
      renderLatency(res[1]);
      document.body.setAttribute("data-state", "ready");
    }).catch(function (e) { fail("Could not load the call log: " + e.message); });
  }

  // ---------------------------------------------------------------- one call
  function fact(dl, label, value) {
    dl.appendChild(el("dt", null, label));
    dl.appendChild(el("dd", null, value));
  }

  function renderTurn(t) {
    var li = el("li", "turn");
    li.setAttribute("data-index", String(t.index));
    li.appendChild(el("div", "no", "#" + (t.index + 1)));
    var talk = el("div");
    if (t.said !== null && t.said !== undefined) {
      var said = el("p", "said");
      said.appendChild(el("span", "who", "caller said"));
      said.appendChild(document.createTextNode(t.said));
      talk.appendChild(said);
      var heard = el("p", "heard");
      heard.appendChild(el("span", "who", t.interrupted ? "caller heard (interrupted)" : "caller heard"));
      heard.appendChild(el("span", "heard-text", t.heard || ""));
      var spoken = t.spoken || "";
      if (t.interrupted && spoken.length > (t.heard || "").length) {
        heard.appendChild(el("span", "unheard", " " + spoken.slice((t.heard || "").length).trim()));
      }
      talk.appendChild(heard);
    } else {
      talk.appendChild(el("p", "reason", "caller said " + t.callerTextChars + " characters (no transcript kept)"));
    }
    if (t.toolCalls && t.toolCalls.length) {
      t.toolCalls.forEach(function (c) {
        talk.appendChild(el("div", "tools", (c.name || "tool call") + " " + (c.error ? "(" + c.error + ")" : JSON.stringify(c.arguments))));
      });
    } else if (t.toolNames && t.toolNames.length) {
      talk.appendChild(el("div", "tools", t.toolNames.join(", ")));
    }
    li.appendChild(talk);
    var dl = el("dl", "facts");
    fact(dl, "first token", fmtMs(t.firstTokenMs));
    fact(dl, "last token", fmtMs(t.lastTokenMs));
    fact(dl, "source", t.source || DASH);
    fact(dl, "provider", t.provider ? t.provider + " (TTFT " + fmtMs(t.providerTtftMs) + ")" : DASH);
    fact(dl, "cache hit", t.cacheHit ? "yes" : "no");
    fact(dl, "node", (t.nodeId || DASH) + " \u2192 " + (t.nextNodeId || DASH));
    if (t.failovers && t.failovers.length) {
      // Each failed provider as the engine records it ({provider, reason}), then the one that answered.
      fact(dl, "failover", t.failovers.map(function (f) { return (f.provider || "unknown") + " (" + (f.reason || "unknown") + ")"; })
        .join(" \u2192 ") + " \u2192 " + (t.provider || "no provider"));
    }
    if (t.action) fact(dl, "action", t.action);
    li.appendChild(dl);
    return li;
  }

  function initCallDetail() {
    var id = document.body.getAttribute("data-tracking-id");
    getJson("/api/call-log/" + encodeURIComponent(id)).then(function (d) {
      var c = d.call;
      $("d-status").textContent = "";
      $("d-status").appendChild(pill(c.status));
      $("d-outcome").textContent = "";
      $("d-outcome").appendChild(pill(c.outcome, OUTCOME_LABELS[c.outcome]));
      $("d-path").textContent = pathLabel(c.path);
      $("d-language").textContent = c.language || DASH;
      $("d-duration").textContent = fmtDuration(c.durationS);
      $("d-duration").title = (c.reasons && c.reasons.durationS) || "";
      $("d-turns").textContent = String(c.turns);
      $("d-p50").textContent = fmtMs(c.firstTokenP50Ms);
      $("d-failovers").textContent = String(c.failovers);
      $("d-cache").textContent = String(c.cacheHits);
      $("d-to").textContent = c.to || DASH;
      $("d-workflow").textContent = d.workflowName || c.workflowId || DASH;
      $("transcript-reason").textContent = d.transcript.reason || "";
      var list = $("timeline");
      d.turns.forEach(function (t) { list.appendChild(renderTurn(t)); });
      if (!d.turns.length) list.appendChild(el("li", "empty", "no caller turns"));
      document.body.setAttribute("data-state", "ready");
    }).catch(function (e) { fail("Could not load the call: " + e.message); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var page = document.body.getAttribute("data-page");
    if (page === "call-log") initCallLog();
    if (page === "call-detail") initCallDetail();
  });
})();
