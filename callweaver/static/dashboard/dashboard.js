"use strict";
(function () {
  // Everything the server sends is inserted with textContent, never as HTML.
  var POLL_MS = 2000;
  var DATA_URL = "api/dashboard-data";
  var SVG_NS = "http://www.w3.org/2000/svg";
  var DASH = "\u2014";
  var lastData = null;
  var pollTimer = null;

  function $(id) { return document.getElementById(id); }

  function dataUrl() {
    // Relative to the page, so the dashboard works behind a path prefix too.
    return DATA_URL + "?window=" + encodeURIComponent($("window-select").value);
  }

  function isNum(v) { return typeof v === "number" && isFinite(v); }

  function fmtNumber(v) {
    var r = Math.round(v * 10) / 10;
    return Number.isInteger(r) ? String(r) : r.toFixed(1);
  }

  function fmtMs(v) { return isNum(v) ? fmtNumber(v) + " ms" : DASH; }

  function fmtPct(ratio) { return isNum(ratio) ? fmtNumber(ratio * 100) + "%" : DASH; }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function setText(id, text) { $(id).textContent = text; }

  // A figure or "—" with the server's reason next to it (never a made-up number).
  function setFigure(id, value, reason, format) {
    var node = $(id);
    clear(node);
    if (isNum(value)) {
      node.textContent = (format || fmtMs)(value);
      node.removeAttribute("title");
    } else {
      node.appendChild(document.createTextNode(DASH));
      if (reason) node.title = reason;
    }
  }

  function ago(seconds) {
    if (!isNum(seconds)) return DASH;
    var s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
  }

  function clock(epoch) {
    var d = new Date(epoch * 1000);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return two(d.getHours()) + ":" + two(d.getMinutes());
  }

  function windowLabel(seconds) {
    if (!isNum(seconds)) return "";
    if (seconds % 3600 === 0) return "last " + (seconds === 3600 ? "hour" : seconds / 3600 + " h");
    if (seconds % 60 === 0) return "last " + seconds / 60 + " min";
    return "last " + seconds + " s";
  }

  function dist(obj) { return obj && typeof obj === "object" ? obj : {}; }

  // ---------------------------------------------------------------- cards

  function renderLiveCalls(data) {
    var agg = data.aggregated || {};
    var live = Array.isArray(data.liveCalls) ? data.liveCalls : [];
    var traditional = live.filter(function (c) { return c.path === "traditional"; }).length;
    setText("live-count", String(live.length));
    setText("live-caption", live.length === 0 ? "No call in progress" : "in progress now");
    setText("live-optimized", String(live.length - traditional));
    setText("live-traditional", String(traditional));
    setFigure("calls-started", agg.calls, null, fmtNumber);
    setText("live-table-aside", live.length + " in progress");

    var body = $("live-rows");
    clear(body);
    if (!live.length) {
      var tr = el("tr", "empty-row");
      var td = el("td", null, "No call in progress");
      td.colSpan = 6;
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    live.forEach(function (call) {
      var row = el("tr");
      row.appendChild(el("td", "mono", call.trackingId));
      row.appendChild(el("td", null, call.status || DASH));
      var pathCell = el("td");
      pathCell.appendChild(el("span", "pill " + (call.path === "traditional" ? "traditional" : "optimized"), call.path || DASH));
      row.appendChild(pathCell);
      row.appendChild(el("td", null, call.language || DASH));
      row.appendChild(el("td", null, call.currentNode || DASH));
      var started = el("td", "r num", isNum(call.startedAt) ? ago(data.generatedAt - call.startedAt) : DASH);
      if (isNum(call.startedAt)) started.title = new Date(call.startedAt * 1000).toLocaleString();
      row.appendChild(started);
      body.appendChild(row);
    });
  }

  function renderCache(data) {
    var agg = data.aggregated || {};
    var cache = agg.cache || {};
    var health = data.cache || {};
    var rate = isNum(agg.cacheHitRate) ? agg.cacheHitRate : null;
    setText("cache-window", windowLabel(agg.windowSeconds));
    setFigure("cache-rate", rate, "no turns in this window", fmtPct);
    $("cache-meter").style.width = rate === null ? "0" : Math.max(0, Math.min(100, rate * 100)) + "%";
    setText("cache-caption", isNum(cache.turns) && cache.turns > 0
      ? cache.hits + " of " + cache.turns + " turns answered from the cache"
      : "No turns in the " + windowLabel(agg.windowSeconds) + ", so no hit rate");
    var hit = dist(cache.hitFirstTokenMs), miss = dist(cache.missFirstTokenMs);
    setFigure("cache-hit-p50", hit.p50, hit.reason);
    setFigure("cache-miss-p50", miss.p50, miss.reason);

    var badge = $("cache-backend");
    badge.className = "badge " + (health.ok === true ? "closed" : health.ok === false ? "open" : "unknown");
    badge.textContent = (health.backend || "cache") + (health.ok === true ? " · ok" : health.ok === false ? " · down" : "");
    badge.title = health.error ? String(health.error) : "";
  }

  function renderFailures(data) {
    var agg = data.aggregated || {};
    setText("fail-window", windowLabel(agg.windowSeconds));
    setFigure("failover-count", agg.failovers, null, fmtNumber);
    setFigure("error-count", agg.errors, null, fmtNumber);
    setFigure("error-rate", agg.errorRate, "no turns in this window", fmtPct);
    setFigure("turn-count", agg.turns, null, fmtNumber);
    setText("fail-reason", isNum(agg.errorRate) ? "" : "No turns in the " + windowLabel(agg.windowSeconds) + ", so no error rate");
  }

  function renderPreemption(data) {
    var agg = data.aggregated || {};
    var pre = agg.preemption || {};
    setText("pre-window", windowLabel(agg.windowSeconds));
    setFigure("pre-adoption", pre.adoptionRate, "no speculation in this window", fmtPct);
    setText("pre-caption", isNum(pre.turnsSpeculated) && pre.turnsSpeculated > 0
      ? pre.adopted + " of " + pre.turnsSpeculated + " speculated turns adopted"
      : "No turn was speculated on in the " + windowLabel(agg.windowSeconds));
    setFigure("pre-extra", pre.extraLlmRequestsPerTurn, pre.reason, fmtNumber);
    var saved = dist(pre.savedMs), ftl = dist(pre.finalToFirstTokenMs);
    setText("pre-saved", fmtMs(saved.p50) + " / " + fmtMs(saved.p95));
    setText("pre-final-ftl", fmtMs(dist(ftl.adopted).p50) + " / " + fmtMs(dist(ftl.notAdopted).p50));
    setFigure("pre-requests", pre.llmRequestsPerTurn, pre.reason, fmtNumber);
    setFigure("pre-tokens", pre.extraTokensPerTurn, pre.reason, fmtNumber);
    setFigure("pre-hedged", pre.hedgedRequests, null, fmtNumber);
    var unanswered = pre.unanswered || {};
    setText("pre-unanswered", isNum(unanswered.speculations)
      ? unanswered.speculations + " speculations (" + unanswered.llmRequests + " LLM requests) of caller turns " +
        "that never got a final transcript, since the store began"
      : "");
    var signals = pre.bySignal || {};
    var started = Object.keys(signals).sort().map(function (name) {
      return (SIGNAL_LABEL[name] || name) + ": " + signals[name].adopted + " adopted of " + signals[name].started;
    });
    setText("pre-signals", started.length ? "Started by " + started.join("; ") : "");
    setText("pre-reason", pre.reason || "");
  }

  var SIGNAL_LABEL = { end_of_speech: "caller stopped speaking", sentence_end: "sentence mark",
                       stable_window: "unchanged transcript" };

  var STATE_LABEL = { closed: "Healthy", half_open: "Probing", open: "Circuit open" };

  function renderProviders(data) {
    var list = $("provider-list");
    clear(list);
    var providers = Array.isArray(data.providers) ? data.providers : [];
    var measured = (data.aggregated && data.aggregated.providers) || {};
    if (!providers.length) {
      list.appendChild(el("div", "reason", "No LLM provider is configured"));
      return;
    }
    providers.forEach(function (p) {
      var row = el("div", "provider");
      var line = el("div", "line");
      line.appendChild(el("span", "name", p.name));
      var state = STATE_LABEL.hasOwnProperty(p.state) ? p.state : "unknown";
      var badge = el("span", "badge " + state, STATE_LABEL[state] || String(p.state || "unknown"));
      var tip = "circuit " + String(p.state);
      if (isNum(p.consecutiveFailures)) tip += ", " + p.consecutiveFailures + " consecutive failures";
      if (isNum(p.openedAt)) tip += ", opened " + new Date(p.openedAt * 1000).toLocaleTimeString();
      badge.title = tip;
      line.appendChild(badge);
      row.appendChild(line);

      var stats = measured[p.name];
      var ttft = stats && stats.ttftMs ? stats.ttftMs : null;
      var parts = [p.model || p.kind];
      parts.push(ttft && isNum(ttft.p50)
        ? "TTFT p50 " + fmtMs(ttft.p50) + " (" + stats.turns + " turns)"
        : "no turns measured");
      if (isNum(p.consecutiveFailures) && p.consecutiveFailures > 0) {
        parts.push(p.consecutiveFailures + " failing in a row");
      }
      row.appendChild(el("div", "detail", parts.filter(Boolean).join(" · ")));
      list.appendChild(row);
    });
  }

  function renderLatency(data) {
    var ftl = (data.aggregated && data.aggregated.firstTokenMs) || {};
    var reasons = [];
    ["optimized", "traditional"].forEach(function (path) {
      var d = dist(ftl[path]);
      ["p50", "p95", "p99", "mean"].forEach(function (k) {
        setFigure("ftl-" + path + "-" + k, d[k], d.reason);
      });
      setText("ftl-" + path + "-samples", isNum(d.samples) ? String(d.samples) : "0");
      if (!isNum(d.p50)) reasons.push(path[0].toUpperCase() + path.slice(1) + ": " + (d.reason || "not measured"));
    });
    var caption = $("ftl-reasons");
    clear(caption);
    reasons.forEach(function (r) { caption.appendChild(el("div", "reason", DASH + " " + r)); });

    var added = dist(data.aggregated && data.aggregated.addedLatencyMs);
    var addedNode = $("added-latency");
    if (isNum(added.p50)) {
      addedNode.textContent = fmtMs(added.p50) + " / " + fmtMs(added.p95);
      addedNode.title = added.samples + " LLM turns";
    } else {
      addedNode.textContent = DASH;
      addedNode.title = added.reason || "not measured";
    }
  }

  // ---------------------------------------------------------------- chart

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  // Round the y-axis top up to a 1/2/2.5/5 × 10^n step so tick labels stay readable.
  function niceStep(maxValue, ticks) {
    var raw = maxValue / ticks;
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * mag >= raw) return steps[i] * mag;
    return 10 * mag;
  }

  function renderChart(data) {
    var host = $("latency-chart");
    var timeline = Array.isArray(data.timeline) ? data.timeline : [];
    var bucketS = 60;
    var width = Math.max(320, Math.round(host.clientWidth || 640));
    var height = Math.max(180, Math.round(host.clientHeight || 260));
    var pad = { left: 56, right: 16, top: 14, bottom: 40 };
    var plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;

    var points = timeline.filter(function (b) { return b && isNum(b.at) && (isNum(b.optimizedP50) || isNum(b.traditionalP50)); });
    var now = isNum(data.generatedAt) ? data.generatedAt : Date.now() / 1000;
    // x spans the measured buckets (at least ten minutes), ending at the current minute.
    var xMax = Math.floor(now / bucketS) * bucketS + bucketS;
    var xMin = points.length ? Math.min(points[0].at, xMax - 10 * bucketS) : xMax - 10 * bucketS;
    var yMaxData = 0;
    points.forEach(function (b) {
      if (isNum(b.optimizedP50)) yMaxData = Math.max(yMaxData, b.optimizedP50);
      if (isNum(b.traditionalP50)) yMaxData = Math.max(yMaxData, b.traditionalP50);
    });
    var step = niceStep(Math.max(yMaxData * 1.1, 100), 4);
    var yMax = Math.ceil(Math.max(yMaxData * 1.1, 100) / step) * step;

    function x(at) { return pad.left + ((at + bucketS / 2 - xMin) / (xMax - xMin)) * plotW; }
    function y(ms) { return pad.top + plotH - (ms / yMax) * plotH; }

    var root = svg("svg", { viewBox: "0 0 " + width + " " + height, width: width, height: height,
                            preserveAspectRatio: "none" });

    // y grid, ticks and title
    for (var v = 0; v <= yMax + 1e-9; v += step) {
      var yy = y(v);
      root.appendChild(svg("line", { "class": v === 0 ? "axis" : "grid", x1: pad.left, x2: width - pad.right, y1: yy, y2: yy }));
      root.appendChild(svg("text", { x: pad.left - 8, y: yy + 4, "text-anchor": "end" }, fmtNumber(v)));
    }
    root.appendChild(svg("text", { "class": "title", x: 12, y: pad.top + plotH / 2,
                                   transform: "rotate(-90 12 " + (pad.top + plotH / 2) + ")", "text-anchor": "middle" },
                         "first token p50 (ms)"));

    // x axis ticks on whole minutes, spaced so labels never overlap
    root.appendChild(svg("line", { "class": "axis", x1: pad.left, x2: pad.left, y1: pad.top, y2: pad.top + plotH }));
    var spanMin = (xMax - xMin) / 60;
    var tickEveryMin = [1, 2, 5, 10, 15, 30, 60, 120, 180, 360].filter(function (m) { return spanMin / m <= Math.max(3, plotW / 80); })[0] || 360;
    var firstTick = Math.ceil(xMin / (tickEveryMin * 60)) * tickEveryMin * 60;
    for (var t = firstTick; t <= xMax; t += tickEveryMin * 60) {
      var xx = pad.left + ((t - xMin) / (xMax - xMin)) * plotW;
      root.appendChild(svg("line", { "class": "axis", x1: xx, x2: xx, y1: pad.top + plotH, y2: pad.top + plotH + 4 }));
      root.appendChild(svg("text", { x: xx, y: pad.top + plotH + 17, "text-anchor": "middle" }, clock(t)));
    }
    root.appendChild(svg("text", { "class": "title", x: pad.left + plotW / 2, y: height - 4, "text-anchor": "middle" },
                         "local time, 1-minute buckets"));

    function series(key, color) {
      var path = "", prevAt = null;
      points.forEach(function (b) {
        if (!isNum(b[key])) return;
        // Break the line across a gap of more than five minutes with no measured turn of this path.
        var move = prevAt === null || b.at - prevAt > 5 * bucketS;
        path += (move ? "M" : "L") + x(b.at).toFixed(1) + "," + y(b[key]).toFixed(1);
        prevAt = b.at;
      });
      if (path) root.appendChild(svg("path", { d: path, fill: "none", stroke: color, "stroke-width": 2,
                                               "stroke-linejoin": "round", "stroke-linecap": "round" }));
      points.forEach(function (b) {
        if (!isNum(b[key])) return;
        var dot = svg("circle", { cx: x(b.at).toFixed(1), cy: y(b[key]).toFixed(1), r: 3, fill: "#fff",
                                  stroke: color, "stroke-width": 2 });
        dot.appendChild(svg("title", {}, clock(b.at) + " · " + fmtMs(b[key]) + " p50 · " + b.turns + " turns"));
        root.appendChild(dot);
      });
    }
    var styles = getComputedStyle(document.documentElement);
    series("traditionalP50", styles.getPropertyValue("--traditional").trim() || "#ea8a0c");
    series("optimizedP50", styles.getPropertyValue("--optimized").trim() || "#2563eb");

    if (!points.length) {
      root.appendChild(svg("text", { "class": "empty", x: pad.left + plotW / 2, y: pad.top + plotH / 2, "text-anchor": "middle" },
                           "No measured turns in the " + windowLabel(data.aggregated && data.aggregated.windowSeconds)));
    }

    clear(host);
    host.appendChild(root);
    host.setAttribute("data-points", String(points.length));
    host.setAttribute("data-rendered", "true");
  }

  // ---------------------------------------------------------------- polling

  function render(data) {
    renderLiveCalls(data);
    renderCache(data);
    renderFailures(data);
    renderPreemption(data);
    renderProviders(data);
    renderLatency(data);
    renderChart(data);
    document.body.setAttribute("data-state", "ready");
  }

  function setConnection(state, text) {
    $("conn").setAttribute("data-conn", state);
    setText("conn-text", text);
  }

  function showError(message) {
    var banner = $("error-banner");
    banner.textContent = message;
    banner.classList.toggle("show", !!message);
  }

  function schedule() {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(poll, POLL_MS);
  }

  function poll() {
    // The next poll is scheduled only after this one settles, so slow answers never pile up.
    fetch(dataUrl(), { headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (response) {
        return response.json().catch(function () { return null; }).then(function (body) {
          if (!response.ok || !body || body.success !== true) {
            throw new Error((body && body.error) || ("HTTP " + response.status));
          }
          return body;
        });
      })
      .then(function (data) {
        lastData = data;
        render(data);
        showError("");
        setConnection("live", "Live · updated " + new Date().toLocaleTimeString());
      })
      .catch(function (err) {
        setConnection("error", "Disconnected");
        showError("Could not load /api/dashboard-data: " + (err && err.message ? err.message : String(err)) +
                  (lastData ? ". Showing the last figures received." : "."));
      })
      .then(schedule);
  }

  $("window-select").addEventListener("change", function () { clearTimeout(pollTimer); poll(); });
  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () { if (lastData) renderChart(lastData); }, 150);
  });
  poll();
})();
