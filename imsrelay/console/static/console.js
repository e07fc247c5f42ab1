// imsrelay console: the Exchange Administrator of the organisation, in plain JavaScript.
//
// Safety rule of this file: data from mail, the directory or the sites is only ever
// put into the page as text (el() and text nodes); never innerHTML, never a URL
// built from data without encodeURIComponent. A message's HTML is shown only in a
// sandboxed iframe served by the console with a strict Content-Security-Policy.
"use strict";

(() => {
  const state = { csrf: null, title: "imsrelay", sites: [], outside: [], stage: false, view: null, events: null,
                  refreshing: false, again: false, routes: 0 };
  const PAGE = 50;

  // ------------------------------------------------------------------ DOM helpers

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(node, ...children) {
    node.replaceChildren();
    return append(node, children);
  }

  function link(href, text, props) {
    return el("a", { href, ...(props || {}) }, text);
  }

  function when(ts) {
    if (!ts) return "–";
    const d = new Date(ts * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function ago(ts) {
    if (!ts) return "never";
    const s = Math.round(Date.now() / 1000 - ts);
    if (s < 0) return `in ${-s}s`;
    if (s < 90) return `${s}s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    return when(ts);
  }

  function size(n) {
    if (n === undefined || n === null) return "–";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function badge(text, kind) {
    return el("span", { class: `badge ${kind || ""}`, text });
  }

  function table(headers, rows, props) {
    return el("table", props || {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: headers.length, class: "empty", text: "none" }))));
  }

  function row(...cells) {
    return el("tr", {}, cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))));
  }

  function card(title, ...body) {
    return el("section", { class: "card" }, el("h3", { text: title }), body);
  }

  function notice(text, kind) {
    return el("p", { class: `notice ${kind || ""}`, role: kind === "error" ? "alert" : "status", text });
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = state.csrf || "";
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, { method, headers, credentials: "same-origin", cache: "no-store",
                                     body: body === undefined ? undefined : JSON.stringify(body) });
    const type = resp.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await resp.json() : await resp.text();
    if (resp.status === 401 && path !== "/login") {
      showLogin();
      throw new ApiError(401, (data && data.error) || "log in first");
    }
    if (!resp.ok) throw new ApiError(resp.status, (data && data.error) || `HTTP ${resp.status}`);
    return data;
  }

  const site = (name, path) => `/api/site/${encodeURIComponent(name)}${path}`;

  // ------------------------------------------------------------------ log-in

  function showLogin(message) {
    closeEvents();
    state.csrf = null;
    document.getElementById("shell").hidden = true;
    document.getElementById("logout").hidden = true;
    document.getElementById("stage").hidden = true;
    document.getElementById("login").hidden = false;
    document.getElementById("login-error").textContent = message || "";
    document.getElementById("token").focus();
  }

  async function logIn(event) {
    event.preventDefault();
    const input = document.getElementById("token");
    try {
      const session = await api("POST", "/login", { token: input.value });
      input.value = "";
      start(session);
    } catch (err) {
      document.getElementById("login-error").textContent = err.message;
    }
  }

  async function logOut() {
    try { await api("POST", "/logout"); } catch (err) { /* the session is gone either way */ }
    showLogin("Logged out.");
  }

  function start(session) {
    state.csrf = session.csrf;
    state.sites = session.sites;
    state.outside = session.outside || [];
    state.stage = session.stage;
    state.title = session.title;
    document.getElementById("brand-title").textContent = session.title;
    document.title = `${session.title} — imsrelay console`;
    document.getElementById("login").hidden = true;
    document.getElementById("shell").hidden = false;
    document.getElementById("logout").hidden = false;
    buildTree();
    openEvents();
    if (state.stage) refreshStage();
    route();
  }

  // ------------------------------------------------------------------ live updates (SSE)

  function openEvents() {
    closeEvents();
    const live = document.getElementById("live");
    const source = new EventSource("/api/events");
    state.events = source;
    let opened = false;
    source.onopen = () => {
      live.className = "live on";
      live.textContent = "live";
      if (opened) {  // reconnected: what changed meanwhile was not told
        if (state.stage) refreshStage();
        refreshView();
      }
      opened = true;
    };
    source.onerror = () => { live.className = "live off"; live.textContent = "reconnecting"; };
    source.addEventListener("change", (ev) => {
      const topics = JSON.parse(ev.data).topics || [];
      document.body.dataset.lastChange = topics.join(" ");
      if (topics.includes("stage") && state.stage) refreshStage();
      if (topics.some((t) => t.startsWith("queue:"))) refreshTreeCounts();
      if (state.view && wants(state.view.topics, topics)) refreshView();
    });
  }

  function closeEvents() {
    if (state.events) state.events.close();
    state.events = null;
  }

  function wants(patterns, topics) {
    return topics.some((t) => patterns.some((p) => (p.endsWith("*") ? t.startsWith(p.slice(0, -1)) : t === p)));
  }

  async function refreshView() {
    if (state.refreshing) { state.again = true; return; }
    state.refreshing = true;
    try {
      do {
        state.again = false;
        const view = state.view;
        if (view && view.refresh) await view.refresh();
      } while (state.again);
    } catch (err) {
      if (err.status !== 401) console.warn(err);
    } finally {
      state.refreshing = false;
    }
  }

  // ------------------------------------------------------------------ the lab's stage

  async function refreshStage() {
    const box = document.getElementById("stage");
    let s;
    try { s = await api("GET", "/api/stage"); } catch (err) { box.hidden = true; return; }
    box.hidden = false;
    const next = el("button", { type: "button", id: "next-step", class: "primary", disabled: !s.next || s.busy,
                                title: s.next ? s.next.text : "the article's last step is done" },
                    s.busy ? "Working…" : s.next ? `Next step: ${s.next.name}` : "Last step done");
    next.addEventListener("click", async () => {
      next.disabled = true;
      next.textContent = "Working…";
      try {
        const r = await api("POST", "/api/stage/next");
        if (r.refused) alertBox(r.refused);
      } catch (err) { alertBox(err.message); }
      refreshStage();
      refreshView();
    });
    box.replaceChildren(
      el("span", { class: "stage-label", text: `Article step ${s.index + 1}/${s.total}` }),
      el("span", { class: "stage-name", id: "stage-name", text: s.name, title: s.text }),
      el("span", { class: "stage-text", text: s.text }),
      next);
  }

  function alertBox(message) {
    const view = document.getElementById("view");
    view.prepend(notice(message, "error"));
  }

  // ------------------------------------------------------------------ the tree (left pane)

  async function buildTree() {
    const nav = document.getElementById("tree");
    const siteNode = (name, inside) => el("li", { class: "node site" },
      el("details", { open: inside },
        el("summary", {}, link(`#/site/${encodeURIComponent(name)}`, name, { class: "tree-site" })),
        el("ul", {},
          el("li", {}, link(`#/site/${encodeURIComponent(name)}/config`, "Configuration")),
          el("li", {}, link(`#/site/${encodeURIComponent(name)}/queue`, "Queue"),
             el("span", { class: "count", dataset: { queue: name } })),
          inside ? el("li", {}, link(`#/site/${encodeURIComponent(name)}/replication`, "Directory Replication")) : null,
          inside ? el("li", {}, link(`#/site/${encodeURIComponent(name)}/addressing`, "Site Addressing")) : null,
          inside ? el("li", {}, link(`#/site/${encodeURIComponent(name)}/link-monitors`, "Link Monitors")) : null,
          inside ? treeExtras(name) : null,
          el("li", {}, link(`#/mail?site=${encodeURIComponent(name)}`, "Mailboxes")))));
    const inside = state.sites.filter((n) => !state.outside.includes(n));
    nav.replaceChildren(el("ul", { class: "tree" },
      el("li", { class: "node org" }, link("#/", state.title, { class: "tree-org" }),
        el("ul", {}, inside.map((n) => siteNode(n, true)))),
      state.outside.length ? el("li", { class: "node outside" }, el("span", { class: "tree-label", text: "Outside the organisation" }),
        el("ul", {}, state.outside.map((n) => siteNode(n, false)))) : null,
      el("li", { class: "node" }, link("#/recipients", "Recipients")),
      el("li", { class: "node" }, link("#/mail", "Mail")),
      el("li", { class: "node" }, link("#/tracking", "Message Tracking"))));
    refreshTreeCounts();
  }

  async function refreshTreeCounts() {
    for (const name of state.sites) {
      const span = document.querySelector(`[data-queue="${CSS.escape(name)}"]`);
      if (!span) continue;
      try {
        const q = await api("GET", site(name, "/queue"));
        span.textContent = q.messages.length ? String(q.messages.length) : "";
      } catch (err) { span.textContent = "?"; }
    }
  }

  function markTree() {
    const here = location.hash || "#/";
    for (const a of document.querySelectorAll("#tree a")) {
      const current = a.getAttribute("href") === here;
      a.classList.toggle("current", current);
      const details = current && a.closest("details");
      if (details) details.open = true;
    }
  }

  // ------------------------------------------------------------------ routing

  function parseHash() {
    const raw = (location.hash || "#/").slice(1);
    const [path, query] = raw.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    return { parts, params: new URLSearchParams(query || "") };
  }

  async function route() {
    if (!state.csrf) return;
    // Each route owns the page until the next one starts: an earlier route still
    // waiting on its data must not take state.view back when it finally resolves.
    const generation = ++state.routes;
    state.view = null;
    const { parts, params } = parseHash();
    const view = document.getElementById("view");
    const root = el("div", { class: "view" });
    view.replaceChildren(root);
    markTree();
    let built;
    try {
      if (parts[0] === "site" && parts[1]) {
        const page = { config: viewConfig, queue: viewQueue, replication: viewReplication,
                       addressing: viewAddressing, "link-monitors": viewLinkMonitors, ...sitePages }[parts[2] || "config"] || viewConfig;
        built = await page(root, parts[1], params);
      } else if (parts[0] === "recipients") built = await viewRecipients(root, params);
      else if (parts[0] === "mail") built = await viewMail(root, params);
      else if (parts[0] === "message" && parts[1]) built = await viewMessage(root, parts[1], params);
      else if (parts[0] === "tracking") built = await viewTracking(root, params);
      else built = await viewOrganisation(root, params);
    } catch (err) {
      if (err.status === 401) return;
      root.append(notice(err.message, "error"));
    }
    if (generation !== state.routes) return;  // a newer route replaced this page meanwhile
    state.view = built || null;
    document.body.dataset.view = parts.join("/") || "organisation";
  }

  function viewTitle(root, title, subtitle, ...actions) {
    root.append(el("div", { class: "view-head" },
      el("div", {}, el("h2", { text: title }), subtitle ? el("p", { class: "sub", text: subtitle }) : null),
      el("div", { class: "actions" }, actions)));
  }

  // a view = static controls built once + refresh() that redraws its data
  async function withData(root, topics, draw) {
    const data = el("div", { class: "data" });
    root.append(data);
    const refresh = async () => {
      const nodes = await draw();
      fill(data, nodes);
    };
    await refresh();
    return { topics, refresh };
  }

  function actionButton(label, props, action) {
    const button = el("button", { type: "button", ...props }, label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try { await action(button); } catch (err) { if (err.status !== 401) alertBox(err.message); }
      finally { button.disabled = false; }
    });
    return button;
  }

  // ------------------------------------------------------------------ organisation

  async function viewOrganisation(root) {
    viewTitle(root, state.title, "The organisation: its sites, how they reach each other and the Internet.");
    return withData(root, ["queue:*", "replication:*", "directory:*", "sites"], async () => {
      const org = await api("GET", "/api/organisation");
      const internet = org.sites.find((s) => state.outside.includes(s.site));
      const sites = org.sites.filter((s) => !state.outside.includes(s.site));
      const boxes = sites.map((s) => siteCard(s));
      const nodes = [];
      nodes.push(el("div", { class: "internet-bar" },
        el("span", { class: "cloud", text: "Internet" }),
        internet && internet.config ? link(`#/site/${encodeURIComponent(internet.site)}/config`, `${internet.config.hostname} · ${internet.config.site_domain}`) : null,
        el("span", { class: "muted", text: sites.map((s) => (s.config && s.config.smart_host ? `${s.site} → smart host ${s.config.smart_host}` : null)).filter(Boolean).join(" · ") })));
      nodes.push(el("div", { class: "sites" }, boxes));
      if (org.unreachable.length) nodes.push(notice(`Not answering: ${org.unreachable.join(", ")}`, "error"));
      return nodes;
    });
  }

  function siteCard(s) {
    const n = encodeURIComponent(s.site);
    if (!s.reachable) return el("article", { class: "site-card down" }, el("h3", { text: s.site }), notice(s.error, "error"));
    const st = s.status, cfg = s.config || {};
    const peers = (s.replication && s.replication.peers) || [];
    return el("article", { class: "site-card", dataset: { site: s.site } },
      el("h3", {}, link(`#/site/${n}`, s.site)),
      el("dl", { class: "facts" },
        el("dt", { text: "Server" }), el("dd", {}, st.server, el("div", { class: "muted small", text: st.hostname })),
        el("dt", { text: "IMS" }), el("dd", { text: `SMTP ${st.smtp.listen}:${st.smtp.port}` }),
        el("dt", { text: "Site Addressing" }), el("dd", { class: "addr", text: st.site_addressing || `@${st.site_domain}` }),
        el("dt", { text: "Mailboxes" }), el("dd", {}, link(`#/mail?site=${n}`, `${st.local_mailboxes} here`)),
        el("dt", { text: "Queue" }), el("dd", {}, link(`#/site/${n}/queue`, `${st.queue.messages} message${st.queue.messages === 1 ? "" : "s"}`)),
        el("dt", { text: "Directory" }), el("dd", { text: `USN ${st.directory.highest_usn}` })),
      el("h4", { text: "Connections" }),
      el("ul", { class: "links" },
        (cfg.connected_sites || []).map((c) => el("li", {}, badge("Connected Site"), ` ${c.name} `, el("span", { class: "addr", text: c.routing_address }))),
        (cfg.email_domains || []).map((d) => el("li", {}, badge("E-Mail Domain", "alt"), ` ${d.domain} → ${d.hosts || `${d.host}:${d.port}`}`)),
        cfg.smart_host ? el("li", {}, badge("Smart host", "alt2"), ` ${cfg.smart_host}`) : null,
        peers.map((p) => el("li", {}, badge("Dir. Replication", "repl"), ` ${p.site} · high-water ${p.high_water}`,
          p.last_error ? el("span", { class: "error", text: ` · ${p.last_error}` }) : null))));
  }

  // ------------------------------------------------------------------ a site: configuration

  async function viewConfig(root, name) {
    viewTitle(root, `${name} — Configuration`, "Property pages of the site: Internet Mail Service, Connected Sites, E-Mail Domain table, smart host, Directory Replication Connectors.");
    return withData(root, [`directory:${name}`], async () => {
      const [cfg, st, dir] = await Promise.all([api("GET", site(name, "/config")), api("GET", site(name, "/status")),
        api("GET", site(name, `/directory?site=${encodeURIComponent(name)}`))]);
      return [
        card("General",
          el("dl", { class: "facts" },
            el("dt", { text: "Organisation" }), el("dd", { text: cfg.organisation }),
            el("dt", { text: "Site" }), el("dd", { text: cfg.site }),
            el("dt", { text: "Server" }), el("dd", { text: `${cfg.server} — ${cfg.hostname}` }),
            el("dt", { text: "Site Addressing" }), el("dd", { class: "addr", text: st.site_addressing || `@${cfg.site_domain}` }),
            el("dt", { text: "Routing address" }), el("dd", { class: "addr", text: st.routing_address || "–" }),
            el("dt", { text: "Company domain" }), el("dd", { text: cfg.company_domain }))),
        card("Internet Mail Service",
          el("dl", { class: "facts" },
            el("dt", { text: "Listens on" }), el("dd", { text: `${cfg.ims.listen}:${cfg.ims.port} (bound ${st.smtp.port})` }),
            el("dt", { text: "Relay networks" }), el("dd", { text: cfg.ims.relay_networks.join(", ") || "none" }),
            el("dt", { text: "Largest message in" }), el("dd", { text: size(cfg.ims.max_message_size) }),
            el("dt", { text: "Largest message out" }), el("dd", { text: cfg.ims.max_outbound_message_size ? size(cfg.ims.max_outbound_message_size) : "no limit" }),
            el("dt", { text: "Message journaling" }), el("dd", { text: cfg.journaling.recipient ? `a copy of every message to ${cfg.journaling.recipient}${cfg.journaling.reports ? " (reports too)" : ""}` : "off" }),
            el("dt", { text: "Retry intervals" }), el("dd", { text: cfg.ims.retry_intervals.map((s) => `${s}s`).join(", ") }),
            el("dt", { text: "Message lifetime" }), el("dd", { text: `${cfg.ims.lifetime / 3600} h` }))),
        card("Connected Sites",
          table(["Site", "Routing address (SMTP)", "Cost", "Servers"],
            cfg.connected_sites.map((c) => row(c.name, el("span", { class: "addr", text: c.routing_address }), String(c.cost), c.hosts || "")))),
        cfg.least_cost_only ? el("p", { class: "muted", text: "Least-cost routes only: no failover to a dearer route (KB Q233081)" }) : null,
        card("E-Mail Domain table",
          table(["Domain", "Forward to hosts (in turn)", "AUTH as"], cfg.email_domains.map((d) => row(d.domain, d.hosts || `${d.host}:${d.port}`, d.auth_user || "—")))),
        card("Smart host", el("p", { text: cfg.smart_host ? cfg.smart_host + (cfg.smart_host_auth_user ? ` (AUTH as ${cfg.smart_host_auth_user})` : "") : "none: mail for other domains goes by DNS MX" })),
        card("Directory Replication Connectors",
          table(["To site", "Schedule"], cfg.replication_connectors.map((c) => row(c.site, c.schedule_text)))),
        protocolsCard(cfg, st, dir),
      ];
    });
  }

  // The Protocols property page (Exchange 5.5: IMAP4 and POP3 at site, server and mailbox level).
  function protocolsCard(cfg, st, dir) {
    const a = cfg.access;
    const own = (dir.sites || []).find((x) => x.name === cfg.site) || {};
    const siteDefaults = own.protocols || {};
    const setting = (v) => (v === true ? "enabled" : v === false ? "disabled" : "default");
    const running = st.access;
    const listeners = !a.enabled ? "not served by this server ([access] enabled = false)"
      : running && running.unavailable ? `not running: ${running.unavailable}`
      : running ? ["imap", "imaps", "pop3", "pop3s"].filter((k) => running[k]).map((k) => `${k} ${running.host}:${running[k]}`).join(", ")
      : "starting";
    return card("Protocols (IMAP4, POP3)",
      el("dl", { class: "facts", id: "protocols" },
        el("dt", { text: "Listeners" }), el("dd", { text: listeners }),
        el("dt", { text: "IMAP4" }), el("dd", { text: `site ${setting(siteDefaults.imap4)}, server ${a.imap4 === null ? "uses the site's defaults" : setting(a.imap4)}` }),
        el("dt", { text: "POP3" }), el("dd", { text: `site ${setting(siteDefaults.pop3)}, server ${a.pop3 === null ? "uses the site's defaults" : setting(a.pop3)}` })),
      el("p", { class: "muted", text: "Per mailbox: the Recipients page; imsrelay directory protocols ALIAS --imap4 on|off|default." }));
  }

  // ------------------------------------------------------------------ a site: queue

  async function viewQueue(root, name) {
    viewTitle(root, `${name} — Queue`, "Messages waiting at this site, with each recipient's state.",
      actionButton("Retry all now", { id: "retry-all" }, async () => {
        await api("POST", site(name, "/queue/retry"), {});
        state.view && state.view.refresh();
      }));
    const result = el("div", { class: "result" });
    root.append(result);
    return withData(root, [`queue:${name}`], async () => {
      const q = await api("GET", site(name, "/queue"));
      const servers = Boolean(q.servers);  // a site of several servers: every server's queue, each message's server
      const rows = q.messages.map((m) => el("tr", { dataset: { queueId: m.queue_id, server: m.server || "" } },
        el("td", { class: "mono", text: m.queue_id }),
        servers ? el("td", { class: "server", text: m.server || "" }) : null,
        el("td", { class: "addr", text: m.sender }),
        el("td", { text: `${when(m.received_at)} (${m.origin})` }),
        el("td", { text: size(m.size) }),
        el("td", {}, el("ul", { class: "rcpts" }, m.recipients.map((r) => el("li", {},
          el("span", { class: "addr", text: r.address }), " ", badge(r.state, r.state),
          ` attempts ${r.attempts}`, r.state === "held" ? ` · ${r.held} (no attempt while held)` : (r.next_attempt ? ` · next ${ago(r.next_attempt)}` : ""),
          r.diagnostic ? el("div", { class: "diag", text: `${r.status || ""} ${r.diagnostic}` }) : null)))),
        el("td", { class: "buttons" },
          actionButton("Retry", { class: "retry" }, async () => {
            const r = await api("POST", site(name, "/queue/retry"), { queue_id: m.queue_id });
            result.replaceChildren(notice(`Retrying ${m.queue_id} (${r.retried} message${r.retried === 1 ? "" : "s"} due now).`));
          }),
          actionButton("Delete", { class: "danger delete" }, async () => {
            if (!window.confirm(`Delete ${m.queue_id} from the queue of ${name}? No NDR is sent.`)) return;
            await api("DELETE", site(name, `/queue/${encodeURIComponent(m.queue_id)}`));
            result.replaceChildren(notice(`Deleted ${m.queue_id} from the queue.`));
            await state.view.refresh();
          }))));
      return [table(["Queue id", ...(servers ? ["Server"] : []), "Sender", "Received", "Size", "Recipients", ""], rows, { class: "queue" }),
              silentServers(q.servers)];
    });
  }

  // ------------------------------------------------------------------ a site: directory replication

  async function viewReplication(root, name) {
    const kcc = el("div", { class: "result", id: "kcc-result" });
    viewTitle(root, `${name} — Directory Replication`, "Each peer site: what this site has applied of its directory (high-water USN), what is on the way, and when it last asked and heard.",
      actionButton("Check Now", { id: "check-now" }, async () => {
        const r = await api("POST", site(name, "/kcc/check-now"));
        kcc.replaceChildren(card("Check Now (knowledge consistency check)",
          el("p", { text: `Sites in the directory: ${r.known_sites.join(", ") || "none"}. Learned by replication: ${r.learned.map((x) => x[0]).join(", ") || "none"}.` }),
          r.findings.length ? el("ul", {}, r.findings.map((f) => el("li", { text: Object.values(f).join(" — ") }))) : el("p", { class: "muted", text: "No findings." })));
      }));
    root.append(kcc);
    const result = el("div", { class: "result", id: "request-result" });
    root.append(result);
    return withData(root, [`replication:${name}`, `directory:${name}`], async () => {
      let st;
      try { st = await api("GET", site(name, "/replication/status")); } catch (err) { return notice(err.message, "error"); }
      const rows = st.peers.map((p) => el("tr", { dataset: { peer: p.site } },
        el("td", {}, el("strong", { text: p.site }), el("div", { class: "muted", text: p.routing_domain || "no routing address" })),
        el("td", { text: !p.connector ? "no connector" : p.schedule_text }),
        el("td", { class: "num hwm", text: String(p.high_water) }),
        el("td", { class: "num", text: String(p.backlog) }),
        el("td", { text: ago(p.last_request) }),
        el("td", { text: ago(p.last_reply) }),
        el("td", { class: "num", text: String(p.applied) }),
        el("td", { class: p.last_error ? "error" : "muted", text: p.last_error || "none" }),
        el("td", { class: "buttons" },
          actionButton("Request Now", { class: "request-new", title: "Update only new and modified items" }, async () => {
            const r = await api("POST", site(name, "/replication/request-now"), { site: p.site, full: false });
            result.replaceChildren(notice(`Asked ${p.site} for new and modified items since USN ${r.since_usn} (queue id ${r.queue_id}).`));
          }),
          actionButton("Request all", { class: "request-all", title: "Request Now: all items" }, async () => {
            const r = await api("POST", site(name, "/replication/request-now"), { site: p.site, full: true });
            result.replaceChildren(notice(`Asked ${p.site} for all items (queue id ${r.queue_id}).`));
          }))));
      return [
        el("p", { class: "muted", text: `This site: invocation ${st.invocation}, highest USN ${st.highest_usn}.` }),
        table(["Peer", "Schedule", "High-water", "Backlog", "Last request", "Last reply", "Applied", "Errors", ""], rows, { class: "replication" }),
        Object.keys(st.rejected || {}).length ? notice(`Rejected updates: ${JSON.stringify(st.rejected)}`, "error") : null,
      ];
    });
  }

  // ------------------------------------------------------------------ a site: Link Monitors (KB Q246674)

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 120) return `${seconds.toFixed(1)} s`;
    return `${(seconds / 60).toFixed(1)} min`;
  }

  async function viewLinkMonitors(root, name) {
    viewTitle(root, `${name} — Link Monitors`, "Exchange's monitor window: each target of each monitor, its state (up, warning, alert), since when, and the last ping's round trip. A ping goes to the remote site's system attendant, which returns it; a foreign address answers with its NDR.");
    return withData(root, [`linkmon:${name}`], async () => {
      let lm;
      try { lm = await api("GET", site(name, "/link-monitors")); } catch (err) { return notice(err.message, "error"); }
      if (!lm.monitors.length) return el("p", { class: "muted", id: "no-monitors", text: "No Link Monitor is defined at this site ([[link_monitors]] in its configuration file)." });
      return lm.monitors.map((m) => card(`${m.name}`,
        el("p", { class: "muted", text: `State ${m.state}. A ping every ${duration(m.interval)}; warning after ${duration(m.warning_after)}, alert after ${duration(m.alert_after)}; alert mail to ${m.notify || "the administrator (notifications.administrator)"}.` }),
        table(["Target", "State", "Since", "Last round trip", "Last answer", "Waiting", "Pings / answers", "Comment"],
          m.targets.map((t) => el("tr", { dataset: { target: t.target, state: t.state } },
            el("td", { class: "addr", text: t.target }),
            el("td", {}, badge(t.state, t.state)),
            el("td", { text: when(t.since) }),
            el("td", { class: "num rtt", text: duration(t.last_rtt) }),
            el("td", { text: ago(t.last_answer) }),
            el("td", { text: t.waiting ? `${t.waiting} ping${t.waiting === 1 ? "" : "s"}, oldest ${duration(t.oldest_wait)}` : "none" }),
            el("td", { class: "num", text: `${t.pings} / ${t.answers}` }),
            el("td", { class: t.problem ? "error" : "muted", text: t.problem || "" }))),
          { class: "link-monitors" })));
    });
  }

  // ------------------------------------------------------------------ a site: Site Addressing

  async function viewAddressing(root, name) {
    viewTitle(root, `${name} — Site Addressing`, "The site's SMTP address; 'update all' re-addresses every mailbox of the site (Exchange's bulk update, events 2043, 2053, 2044).");
    const current = el("div", { class: "current" });
    const address = el("input", { id: "sa-address", name: "address", required: true, placeholder: "@microsoft.com", spellcheck: "false" });
    const keep = el("input", { id: "sa-keep", type: "checkbox", checked: true });
    const result = el("div", { class: "result", id: "sa-result" });
    const form = el("form", { class: "inline-form", id: "sa-form" },
      el("label", { for: "sa-address", text: "SMTP address" }), address,
      el("label", { class: "check" }, keep, " Keep the old address as a secondary proxy"),
      el("button", { type: "submit", class: "primary", id: "sa-apply" }, "OK"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const button = form.querySelector("button");
      button.disabled = true;
      try {
        // Exchange's question after the site's SMTP address changed (KB Q196927 step 4: Yes)
        const ask = window.imsConsole.questionBox;
        const update = ask ? await ask({ id: "sa-question", title: "Site Addressing",
          text: `The SMTP address for the site has been changed to ${address.value.trim()}. Do you want to update all recipient e-mail addresses of ${name} to match the new site address?` }) : true;
        result.replaceChildren(notice("Working…"));
        const r = await api("POST", site(name, "/site-addressing"), { address: address.value.trim(), update_mailboxes: update, keep_old: keep.checked });
        result.replaceChildren(bulkReport(name, r));
        // the site's answer is the truth now; the refresh below redraws the mailboxes
        const shown = current.querySelector("#sa-current");
        if (shown && r.address) shown.textContent = r.address;
        if (view) await view.refresh();  // this page's own mailboxes, whatever else is refreshing
      } catch (err) {
        result.replaceChildren(notice(err.message, "error"));
      } finally {
        button.disabled = false;
      }
    });
    root.append(current, card("Change Site Addressing", form), result);
    let view = null;
    let filled = false;
    view = await withData(root, [`directory:${name}`], async () => {
      const [sa, dir] = await Promise.all([api("GET", site(name, "/site-addressing")), api("GET", site(name, `/directory?site=${encodeURIComponent(name)}`))]);
      if (!filled && !address.value) address.value = sa.smtp_address || "";  // once: never while a person types
      filled = true;
      current.replaceChildren(card("Current", el("dl", { class: "facts" },
        el("dt", { text: "SMTP" }), el("dd", { class: "addr", id: "sa-current", text: sa.smtp_address || `@${sa.site_domain}` }),
        el("dt", { text: "Routing address" }), el("dd", { class: "addr", text: sa.routing_address || "–" }))));
      return card(`Mailboxes of ${name}`, table(["Mailbox", "Primary address", "Other proxy addresses"],
        dir.mailboxes.filter((m) => m.home_site === name).map((m) => row(m.alias, el("span", { class: "addr", text: m.primary_address }),
          el("span", { class: "addr muted", text: m.proxy_addresses.filter((p) => !p.startsWith("SMTP:")).join(", ") })))));
    });
    return view;
  }

  function bulkReport(name, r) {
    const events = [
      [2043, "info", `Site Addressing of ${name} set to ${r.address}; bulk update of recipient e-mail addresses ${r.update_mailboxes ? "started" : "not asked for"} (keep old: ${r.keep_old ? "yes" : "no"}).`],
      ...r.substitutes.map((s) => [2053, "warn", `The address for ${s.alias} was not unique; the substitute ${s.address} was generated.`]),
      [2044, "info", `Bulk update finished: ${r.scanned} scanned, ${r.updated} updated, ${r.failed} failed, ${r.substitutes.length} substitute${r.substitutes.length === 1 ? "" : "s"}.`],
    ];
    return card("Result", table(["Event", "", "Description"],
      events.map(([id, kind, text]) => el("tr", { class: `event-${id}` }, el("td", { class: "mono", text: String(id) }), el("td", {}, badge(kind === "warn" ? "warning" : "information", kind)), el("td", { text })))),
      r.substitutes.length ? el("ul", { class: "substitutes" }, r.substitutes.map((s) => el("li", {}, el("strong", { text: s.alias }), " → ", el("span", { class: "addr", text: s.address })))) : null);
  }

  // ------------------------------------------------------------------ recipients

  async function viewRecipients(root, params) {
    const filter = el("input", { type: "search", id: "recipient-filter", placeholder: "Filter by name or address", value: params.get("q") || "" });
    viewTitle(root, "Recipients", "Every mailbox, custom recipient and distribution list of the organisation: its proxy addresses (primary first), its home site, and the sites whose directory knows it.", filter);
    let last = null;
    const view = await withData(root, ["directory:*", "replication:*"], async () => {
      last = await api("GET", "/api/recipients");
      return draw();
    });
    function draw() {
      const needle = filter.value.trim().toLowerCase();
      const kindText = (r) => r.kind === "custom" ? `custom recipient → ${r.target}`
        : r.kind === "dl" ? `distribution list: ${(r.members || []).length} member(s)${r.owner ? `, owner ${r.owner}` : ""}${r.expansion_site ? `, expanded at ${r.expansion_site}` : ""}` : "";
      const rows = last.recipients.filter((r) => !needle || [r.alias, r.display_name, r.target || "", ...(r.members || []), ...r.proxy_addresses.map((a) => a.address)].some((x) => String(x).toLowerCase().includes(needle)))
        .map((r) => el("tr", { dataset: { alias: r.alias, home: r.home_site, kind: r.kind || "mailbox" } },
          el("td", {}, el("strong", { text: r.display_name }), el("div", { class: "muted", text: r.alias }),
            r.kind && r.kind !== "mailbox" ? el("div", { class: "kind", text: kindText(r) }) : null),
          el("td", {}, el("ul", { class: "proxies" }, r.proxy_addresses.map((a) => el("li", { class: a.primary ? "primary" : "" },
            el("span", { class: "ptype", text: a.type }), " ", el("span", { class: "addr", text: a.address }), a.primary ? badge("primary", "ok") : null)))),
          el("td", { text: r.home_site }),
          el("td", {}, last.sites.map((s) => badge(s, r.known_at.includes(s) ? (r.differs_at.includes(s) ? "warn" : "ok") : "absent")),
            r.differs_at.length ? el("div", { class: "muted", text: `older copy at ${r.differs_at.join(", ")}` }) : null),
          el("td", { class: "protocols" }, r.kind && r.kind !== "mailbox" ? [] : ["imap4", "pop3"].map((p) => {
            const v = (r.protocols || {})[p];
            return badge(`${p === "imap4" ? "IMAP4" : "POP3"} ${v === true ? "on" : v === false ? "off" : "default"}`, v === false ? "warn" : "ok");
          }))));
      return [table(["Mailbox", "Proxy addresses", "Home site", "Known at", "Protocols"], rows, { class: "recipients" }),
              Object.keys(last.errors).length ? notice(`Not answering: ${Object.keys(last.errors).join(", ")}`, "error") : null];
    }
    filter.addEventListener("input", () => { if (last) fill(root.querySelector(".data"), draw()); });
    return view;
  }

  // ------------------------------------------------------------------ mail

  async function viewMail(root, params) {
    const siteName = params.get("site") || "";
    const mailbox = params.get("mailbox") || "";
    const query = params.get("query") || "";
    const page = Math.max(0, parseInt(params.get("page") || "0", 10) || 0);
    const search = el("input", { type: "search", id: "mail-search", name: "query", value: query, spellcheck: "false",
                                 placeholder: "from:alice subject:hello to:user2 message-id:… after:2026-01-01 words" });
    const form = el("form", { class: "search-form", id: "mail-search-form" }, search, el("button", { type: "submit" }, "Search"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      location.hash = mailHash({ site: siteName, mailbox, query: search.value.trim(), page: 0 });
    });
    const where = mailbox ? `${mailbox} at ${siteName}` : siteName ? `every mailbox at ${siteName}` : "every mailbox of the organisation";
    viewTitle(root, "Mail", `Messages in ${where}, newest first.`, form);
    const layout = el("div", { class: "mail-layout" });
    const boxes = el("aside", { class: "mailboxes" });
    const list = el("div", { class: "messages" });
    layout.append(boxes, list);
    root.append(layout);
    async function drawBoxes() {
      const r = await api("GET", `/api/mailboxes${siteName ? `?site=${encodeURIComponent(siteName)}` : ""}`);
      const bySite = {};
      for (const b of r.mailboxes) (bySite[b.site] = bySite[b.site] || []).push(b);
      fill(boxes, link(mailHash({}), "All mail", { class: !siteName ? "current" : "" }),
        Object.entries(bySite).map(([s, list]) => el("div", { class: "box-site" },
          link(mailHash({ site: s }), s, { class: siteName === s && !mailbox ? "current site-link" : "site-link" }),
          el("ul", {}, list.map((b) => el("li", {}, link(mailHash({ site: s, mailbox: b.mailbox }), b.mailbox, { class: siteName === s && mailbox === b.mailbox ? "current" : "" }),
            el("span", { class: "count", text: b.unread ? `${b.unread}/${b.messages}` : String(b.messages) })))))),
        Object.keys(r.errors || {}).length ? notice(`Not answering: ${Object.keys(r.errors).join(", ")}`, "error") : null);
    }
    const view = await withData(list, [siteName ? `mail:${siteName}` : "mail:*"], async () => {
      const qs = new URLSearchParams({ start: String(page * PAGE), limit: String(PAGE) });
      if (siteName) qs.set("site", siteName);
      if (mailbox) qs.set("mailbox", mailbox);
      if (query) qs.set("query", query);
      const [r] = await Promise.all([api("GET", `/api/messages?${qs}`), drawBoxes()]);
      const rows = r.messages.map((m) => el("tr", { class: m.read ? "read" : "unread", dataset: { id: m.id } },
        el("td", {}, link(`#/message/${encodeURIComponent(m.id)}`, m.subject || "(no subject)", { class: "subject" })),
        el("td", { class: "from", text: m.from || m.envelope_sender || "" }),
        el("td", { class: "to", text: m.to || m.envelope_recipient || "" }),
        el("td", {}, badge(m.site), m.server ? [" ", badge(m.server, "server")] : null, " ", el("span", { class: "muted", text: m.mailbox })),
        el("td", { class: "nowrap", text: when(m.received) }),
        el("td", { class: "num", text: size(m.size) })));
      const first = r.total ? r.start + 1 : 0, last = r.start + r.count;
      const pager = el("div", { class: "pager" },
        page > 0 ? link(mailHash({ site: siteName, mailbox, query, page: page - 1 }), "‹ Newer", { class: "button", id: "newer" }) : null,
        el("span", { id: "page-info", text: `${first}–${last} of ${r.total}${r.partial ? "+" : ""}` }),
        last < r.total && !(r.partial && r.count < PAGE) ? link(mailHash({ site: siteName, mailbox, query, page: page + 1 }), "Older ›", { class: "button", id: "older" }) : null);
      return [pager, r.partial ? notice("The organisation-wide list pages through the newest 1,000 messages of each site: choose a site or a mailbox on the left, or search, to go further.") : null,
              table(["Subject", "From", "To", "Where", "Received", "Size"], rows, { class: "message-list" }),
              r.errors && Object.keys(r.errors).length ? notice(`Not answering: ${Object.entries(r.errors).map(([k, v]) => `${k} (${v})`).join(", ")}`, "error") : null];
    });
    return view;
  }

  // A site of several servers answers for all of them; one that did not answer is named.
  function silentServers(servers) {
    const silent = Object.entries(servers || {}).filter(([, v]) => !v.ok);
    return silent.length ? notice(`Servers not answering: ${silent.map(([k, v]) => `${k} (${v.error})`).join(", ")}`, "error") : null;
  }

  function mailHash({ site: s, mailbox, query, page }) {
    const qs = new URLSearchParams();
    if (s) qs.set("site", s);
    if (mailbox) qs.set("mailbox", mailbox);
    if (query) qs.set("query", query);
    if (page) qs.set("page", String(page));
    const q = qs.toString();
    return `#/mail${q ? `?${q}` : ""}`;
  }

  async function viewMessage(root, id, params) {
    const siteName = id.split(":")[0];
    const m = await api("GET", site(siteName, `/api/v1/messages/${encodeURIComponent(id)}`));
    if (!m.read) {  // mark it read first: the file moves to cur/, and the parts are read after that
      try { await api("PATCH", site(siteName, `/api/v1/messages/${encodeURIComponent(id)}`), { read: true }); } catch (err) { /* shown unread */ }
    }
    const tabs = ["text", "html", "headers", "attachments", "raw"];
    const tab = tabs.includes(params.get("tab")) ? params.get("tab") : (m.text !== null ? "text" : m.html !== null ? "html" : "headers");
    const back = mailHash({ site: m.site, mailbox: m.mailbox });
    viewTitle(root, m.subject || "(no subject)", null,
      link(back, "‹ Back to the mailbox", { class: "button" }),
      m.message_id ? link(`#/tracking?q=${encodeURIComponent(m.message_id)}`, "Track this message", { class: "button", id: "track-this" }) : null,
      actionButton("Delete", { class: "danger", id: "delete-message" }, async () => {
        if (!window.confirm("Delete this message from the mailbox?")) return;
        await api("DELETE", site(siteName, `/api/v1/messages/${encodeURIComponent(id)}`));
        location.hash = back;
      }));
    root.querySelector("h2").id = "message-subject";
    root.append(el("dl", { class: "facts message-facts" },
      el("dt", { text: "From" }), el("dd", { id: "message-from", text: m.from || "" }),
      el("dt", { text: "To" }), el("dd", { text: m.to || "" }),
      m.cc ? [el("dt", { text: "Cc" }), el("dd", { text: m.cc })] : null,
      el("dt", { text: "Date" }), el("dd", { text: m.date || "" }),
      el("dt", { text: "Envelope" }), el("dd", { class: "addr", text: `${m.envelope_sender || "<>"} → ${m.envelope_recipient || ""}` }),
      el("dt", { text: "Mailbox" }), el("dd", { text: `${m.mailbox} at ${m.site}${m.server ? ` (server ${m.server})` : ""} · received ${when(m.received)} · ${size(m.size)}` }),
      el("dt", { text: "Message-ID" }), el("dd", { class: "addr", text: m.message_id || "(none)" })));
    const nav = el("div", { class: "tabs", role: "tablist" }, tabs.map((t) => link(`#/message/${encodeURIComponent(id)}?tab=${t}`,
      { text: "Text", html: "HTML", headers: "Headers", raw: "Raw", attachments: `Attachments (${m.attachments.length})` }[t],
      { class: t === tab ? "tab current" : "tab", role: "tab", id: `tab-${t}` })));
    const body = el("div", { class: "tab-body", id: "message-body" });
    root.append(nav, body);
    if (tab === "text") body.append(el("pre", { class: "text-part", text: m.text === null ? "(this message has no text part)" : m.text }));
    if (tab === "html") {
      if (m.html === null) body.append(el("p", { class: "muted", text: "(this message has no HTML part)" }));
      else {
        const frame = document.createElement("iframe");
        frame.setAttribute("sandbox", "");  // no scripts, no same origin, no forms, no navigation of the console
        frame.setAttribute("referrerpolicy", "no-referrer");
        frame.setAttribute("title", "the message's HTML part (sandboxed)");
        frame.id = "html-frame";
        frame.className = "html-part";
        frame.src = site(siteName, `/message-html/${encodeURIComponent(id)}`);
        body.append(frame);
      }
    }
    if (tab === "headers") body.append(table(["Header", "Value"], m.headers.map((h) => row(el("span", { class: "mono", text: h.name }), el("span", { class: "hval", text: h.value }))), { class: "headers" }));
    if (tab === "attachments") body.append(table(["Name", "Type", "Size", "Disposition"], m.attachments.map((a) => el("tr", { class: "attachment" }, el("td", { class: "att-name", text: a.filename || "(no name)" }), el("td", { text: a.content_type }), el("td", { text: size(a.size) }), el("td", { text: a.disposition || "" })))));
    if (tab === "raw") {
      const pre = el("pre", { class: "raw", id: "raw", text: "loading…" });
      body.append(pre);
      pre.textContent = await api("GET", site(siteName, `/api/v1/messages/${encodeURIComponent(id)}/raw`));
    }
    return { topics: [] };
  }

  // ------------------------------------------------------------------ message tracking

  async function viewTracking(root, params) {
    const q = params.get("q") || "";
    const input = el("input", { type: "search", id: "track-query", value: q, spellcheck: "false", placeholder: "Message-ID <…@…> or an address" });
    const form = el("form", { class: "search-form", id: "track-form" }, input, el("button", { type: "submit", class: "primary" }, "Track"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      location.hash = `#/tracking?q=${encodeURIComponent(input.value.trim())}`;
    });
    viewTitle(root, "Message Tracking", "Follow a message through the organisation: every site it passed, what each did and why.", form);
    if (!q) {
      root.append(el("p", { class: "muted", text: "Give a Message-ID (from a message's page: Track this message) or a sender or recipient address." }));
      return { topics: [] };
    }
    return withData(root, ["tracking:*", "queue:*", "mail:*"], async () => {
      const r = await api("GET", `/api/tracking?q=${encodeURIComponent(q)}`);
      if (!r.messages.length) return notice(`No message found for ${q}.`);
      return r.messages.map((story) => drawStory(story));
    });
  }

  // The message's way as a tree (story.tree): one branch per site it was sent to from
  // each site, ending at the recipients whose way ended there (a fan-out has branches).
  function drawBranch(node) {
    const ends = (node.recipients || []).map((r) => el("li", { class: `hop-node ${r.state === "delivered" ? "mailbox" : "end"}` },
      el("span", { class: "arrow", "aria-hidden": "true", text: "→" }),
      el("span", { class: "node-label", text: (r.left_to ? `${r.left_to} (the rest of the Internet)` : (r.state === "delivered" && r.mailbox ? `mailbox ${r.mailbox}` : `${r.recipient} ${r.state}`)) + (r.report ? ` (DSN: ${r.report})` : "") })));
    const next = (node.next || []).map((child) => el("li", { class: "branch" }, el("span", { class: "arrow", "aria-hidden": "true", text: "→" }), drawBranch(child)));
    return el("div", { class: "hop-branch", dataset: { site: node.site } },
      el("span", { class: "hop-node site" }, el("span", { class: "node-label", text: node.site })),
      next.length + ends.length ? el("ul", { class: next.length + ends.length > 1 ? "branches fan-out" : "branches" }, next, ends) : null);
  }

  function drawStory(story) {
    const first = story.hops[0];
    const origin = first && first.origin === "smtp" ? (first.client_site || `SMTP client ${first.client || ""}`.trim()) : (first ? `${first.site} (${first.origin || "generated"})` : "?");
    const path = el("div", { class: "path tree", "aria-label": story.path || "" },
      first && origin !== first.site ? el("span", { class: "hop-node origin" }, el("span", { class: "node-label", text: origin })) : null,
      first && origin !== first.site ? el("span", { class: "arrow", "aria-hidden": "true", text: "→" }) : null,
      story.tree ? drawBranch(story.tree) : null);
    return el("article", { class: "story card" },
      el("h3", {}, "Message ", el("span", { class: "addr", text: story.message_id || "(no Message-ID)" })),
      el("p", { class: "muted", text: `from ${story.sender || "<>"}` }),
      path,
      el("ol", { class: "hops" }, story.hops.map((h) => el("li", { class: "hop", dataset: { site: h.site } },
        el("h4", {}, h.server ? `${h.site} · server ${h.server}` : h.site, " ", el("span", { class: "muted mono", text: `queue id ${h.queue_id}` })),
        el("table", { class: "events" }, el("tbody", {}, h.events.map((e) => el("tr", { class: `ev ev-${e.event}` },
          el("td", { class: "nowrap mono", text: when(e.time) }), el("td", {}, badge(e.event, e.event)), el("td", { class: "reason", text: e.description || e.event })))))))),
      el("h4", { text: "Recipients" }),
      el("ul", { class: "outcomes" }, story.recipients.map((r) => el("li", {}, el("span", { class: "addr", text: r.recipient }), " ", badge(r.state, r.state), " ", el("span", { text: r.detail })))));
  }

  // ------------------------------------------------------------------ property pages (properties.js)

  // properties.js adds the pages that change a site (#/site/NAME/PAGE) and the tree's
  // entries for them; it gets the helpers above through window.imsConsole.
  const sitePages = {};
  let treeExtras = () => null;
  window.imsConsole = {
    el, append, fill, link, when, ago, badge, table, row, card, notice, api, site, actionButton, viewTitle, size,
    withData, alertBox, state, refreshView, refreshTreeCounts,
    addSitePage(name, view) { sitePages[name] = view; },
    setTreeExtras(make) { treeExtras = make; if (state.csrf) buildTree(); },
    current() { return state.routes; },
  };

  // ------------------------------------------------------------------ start

  document.getElementById("login-form").addEventListener("submit", logIn);
  document.getElementById("logout").addEventListener("click", logOut);
  window.addEventListener("hashchange", route);
  // properties.js (loaded after this file) registers its pages first
  window.addEventListener("DOMContentLoaded", () => {
    api("GET", "/api/session").then(start).catch((err) => { if (err.status !== 401) showLogin(err.message); });
  });
})();
