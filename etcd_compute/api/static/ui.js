// etcd-compute dashboard: live updates over server-sent events, list filters, in-page actions.
// Every page works without this file; it only keeps pages current without reloading them.
"use strict";
(function () {
  const main = document.querySelector("main");
  const $ = (sel, root) => (root || document).querySelector(sel);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const c of children) node.append(c === null || c === undefined ? "" : c);
    return node;  // text goes in as text nodes: nothing from the server is parsed as HTML
  }

  function age(stamp) {
    const t = Date.parse(stamp || "");
    if (isNaN(t)) return "";
    const s = Math.max(0, Math.floor((Date.now() - t) / 1000));
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (s >= size) return Math.floor(s / size) + unit;
    }
    return s + "s";
  }

  function stateBadge(state, reason) {
    return el("span", {class: "state state-" + String(state).toLowerCase(), title: reason || ""}, state);
  }

  // -- the list page ---------------------------------------------------------------------------
  function applyFilters() {
    const table = $("#instances");
    if (!table) return;
    const state = $("#filter-state").value;
    const text = $("#filter-text").value.trim().toLowerCase();
    let shown = 0;
    const rows = table.tBodies[0].rows;
    for (const row of rows) {
      const ok = (!state || row.dataset.state === state) &&
                 (!text || (row.dataset.search || "").includes(text));
      row.hidden = !ok;
      if (ok) shown++;
    }
    $("#shown").textContent = rows.length ? shown + " of " + rows.length + " shown" : "";
    $("#empty").hidden = rows.length > 0;
  }

  function renderList(data) {
    const table = $("#instances");
    const admin = table.dataset.admin === "yes";
    const rows = data.instances.map(v => {
      const host = [v.host_name || ""];
      if (v.host_state === "DOWN") host.push(" ", el("span", {class: "down"}, "DOWN"));
      const label = [el("code", {class: "id", title: v.uuid}, String(v.uuid).slice(0, 8))];
      if (v.name) label.unshift(el("strong", {class: "name"}, v.name), " ");
      const cells = [el("td", {}, el("a", {href: "/ui/instances/" + encodeURIComponent(v.uuid)}, ...label))];
      if (admin) cells.push(el("td", {}, v.project_id || ""));
      const state = [stateBadge(v.state, v.reason)];
      if (v.transition) state.push(" ", el("span", {class: "transition"}, v.transition + "…"));
      cells.push(el("td", {}, ...state), el("td", {}, v.ip || ""),
                 el("td", {class: "wide", title: v.host || ""}, ...host), el("td", {class: "wide"}, v.flavor || ""),
                 el("td", {class: "wide"}, el("time", {datetime: v.created_at || ""}, age(v.created_at))));
      const search = [v.name, v.uuid, v.ip, v.host, v.host_name].filter(Boolean).join(" ").toLowerCase();
      return el("tr", {"data-uuid": v.uuid, "data-state": v.state, "data-search": search}, ...cells);
    });
    table.tBodies[0].replaceChildren(...rows);
    if (data.usage) renderUsage(data.usage);
    applyFilters();
  }

  function renderUsage(usage) {
    $("#usage-project").textContent = usage.project;
    const bars = usage.items.map(item => {
      const parts = [el("span", {class: "bar-name"}, item.name)];
      if (item.limit === null) {
        parts.push(el("span", {class: "bar-num"}, item.used + " (no limit)"));
      } else {
        parts.push(el("meter", {min: 0, max: item.limit, value: item.used, high: Math.ceil(item.limit * 0.8),
                                "aria-label": item.name + " used of quota"}, item.used + "/" + item.limit),
                   el("span", {class: "bar-num"}, item.used + " / " + item.limit));
      }
      return el("div", {class: "bar"}, ...parts);
    });
    $("#usage").replaceChildren(...(bars.length ? bars : [el("p", {class: "hint"}, "Nothing in use, no limits.")]));
  }

  // -- the instance page ------------------------------------------------------------------------
  function renderDetail(data) {
    const v = data.view;
    for (const node of document.querySelectorAll("[data-field]")) {
      const name = node.dataset.field;
      let value = v[name];
      if (name === "resources") value = Object.entries(value || {}).map(([k, n]) => k + ":" + n).join(", ");
      if (name === "image") value = value || "(none)";
      if (name === "transition") value = value ? value + "…" : "";
      if (name === "state") node.className = "state state-" + String(value).toLowerCase();
      node.textContent = value === null || value === undefined ? "" : value;
    }
    const events = (v.events || []).slice().reverse().map(e =>
      el("li", {}, el("time", {datetime: e.at}, e.at), " ", e.event));
    $("#events").replaceChildren(...(events.length ? events : [el("li", {class: "hint"}, "None yet.")]));
    const pre = $("#console");
    if (!pre.dataset.boot) {  // an earlier boot's page shows that boot, not the live tail
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = data.console === null ? "(no console output yet)" : data.console;
      if (atEnd) pre.scrollTop = pre.scrollHeight;  // follow the tail unless the reader scrolled up
    }
    for (const button of document.querySelectorAll("button[name=action]")) {
      const why = data.actions[button.value];
      button.disabled = Boolean(why);
      button.title = why || "";
    }
    if (data.graphs) renderGraphs(data.graphs, data.graphs_note);
    if (data.volumes) renderVolumes(data.volumes);
    const destroy = $("button[name=destroy]");
    destroy.disabled = v.desired === "deleted";
    destroy.title = destroy.disabled ? "it is being deleted" : "";
  }

  // The instance's volumes: their state moves as its host attaches and detaches them.
  function renderVolumes(volumes) {
    const table = $("#instance-volumes");
    if (!table) return;
    const uuid = table.dataset.uuid;
    const rows = volumes.map(v => {
      const label = [el("code", {class: "id", title: v.id}, String(v.id).slice(0, 8))];
      if (v.name) label.unshift(el("strong", {class: "name"}, v.name), " ");
      const act = el("td", {});
      if (v.state !== "detaching") {
        act.append(el("form", {method: "post", action: "/ui/instances/" + encodeURIComponent(uuid) + "/detach"},
                      el("input", {type: "hidden", name: "volume", value: v.id}),
                      el("button", {type: "submit", name: "detach", value: "1"}, "Detach")));
      }
      return el("tr", {"data-volume": v.id, "data-state": v.state}, el("td", {}, ...label),
                el("td", {}, v.size_gb + " GiB"), el("td", {}, el("span", {class: "state state-" + v.state}, v.state)),
                act);
    });
    table.tBodies[0].replaceChildren(...rows);
    $("#volumes-empty").hidden = rows.length > 0;
  }

  // The graphs are drawn by the server (graphs.py); a new reading moves their lines and labels.
  function renderGraphs(graphs, note) {
    for (const g of graphs) {
      const svg = $('svg[data-graph="' + g.id + '"]');
      if (!svg) continue;
      for (const line of g.lines) {
        const shape = $('polyline[data-line="' + line.name + '"]', svg);
        if (shape) shape.setAttribute("points", line.points);
      }
      $("text.empty", svg).setAttribute("visibility", g.empty ? "visible" : "hidden");
      $('[data-graph-last="' + g.id + '"]').textContent = g.last;
      $('[data-graph-top="' + g.id + '"]').textContent = g.top;
      $('[data-graph-span="' + g.id + '"]').textContent = g.span;
    }
    $("#graphs-note").textContent = note || "";
    $("#graphs-note").hidden = !note;
  }

  function gone() {
    $("#gone").hidden = false;
    for (const button of document.querySelectorAll(".actions button")) button.disabled = true;
    $("[data-field=state]").textContent = "DELETED";
  }

  // Actions post with fetch and stay on the page: the stream shows what the host makes of them.
  function actAsync(event) {
    const form = event.target.closest("form[data-async]");
    if (!form) return;
    event.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    const body = new URLSearchParams(new FormData(form, event.submitter));
    const notice = $("#notice");
    // Said at once, before the host has acted; the stream replaces it with what the host reports.
    const doing = {start: "starting", stop: "stopping", suspend: "suspending", resume: "resuming",
                   reboot: "rebooting"}[body.get("action")] || (body.get("destroy") ? "deleting" : null);
    const shown = $("[data-field=transition]");
    if (doing && shown) shown.textContent = doing + "…";
    // form.getAttribute, not form.action: the button named "action" shadows that property.
    fetch(form.getAttribute("action"),
          {method: "POST", body, headers: {"X-Requested-With": "ui.js"}, credentials: "same-origin"})
      .then(r => r.json().then(answer => {
        if (r.status === 401) { window.location.assign("/ui/login"); return; }
        notice.textContent = r.ok ? "" : answer.error || ("failed: HTTP " + r.status);
        notice.className = "error";  // not a snapshot's "made" any more
        notice.setAttribute("role", "alert");
        notice.hidden = r.ok;
        if (!r.ok && shown) shown.textContent = "";  // refused: nothing is under way
      }))
      .catch(err => {
        notice.textContent = "request failed: " + err;
        notice.className = "error";
        notice.setAttribute("role", "alert");
        notice.hidden = false;
      });
  }

  // -- the stream ---------------------------------------------------------------------------------
  function connect(url, render) {
    const status = $("#live");
    const source = new EventSource(url);
    const say = (text, off) => { status.textContent = text; status.classList.toggle("off", off); };
    source.addEventListener("update", e => {
      const data = JSON.parse(e.data);
      if (data.error) { say("Not current: " + data.error, true); return; }
      render(data);
      say("Live · updated " + new Date().toLocaleTimeString(), false);
    });
    source.addEventListener("gone", () => { source.close(); say("Gone.", true); gone(); });
    source.addEventListener("denied", () => { source.close(); window.location.assign("/ui/login"); });
    source.onerror = () => {
      say("Disconnected; reconnecting…", true);
      if (source.readyState === EventSource.CLOSED) {  // refused (e.g. 503): the browser gives up; we do not
        window.setTimeout(() => connect(url, render), 5000);
      }
    };
  }

  // A form that destroys something asks first (in-page actions ask in actAsync).
  document.addEventListener("submit", event => {
    const form = event.target.closest("form[data-confirm]:not([data-async])");
    if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
  });

  if (main && main.dataset.page === "list") {
    $("#filter-state").addEventListener("change", applyFilters);
    $("#filter-text").addEventListener("input", applyFilters);
    applyFilters();
    connect(main.dataset.live, renderList);
    window.setInterval(() => {  // ages move on between updates
      for (const t of document.querySelectorAll("#instances time")) t.textContent = age(t.getAttribute("datetime"));
    }, 15000);
  } else if (main && main.dataset.page === "detail") {
    document.addEventListener("submit", actAsync);
    connect(main.dataset.live, renderDetail);
  }
})();
