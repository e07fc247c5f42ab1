// imsrelay console: the property pages that change a site, as Exchange Administrator's did
// (KB Q196927): the Internet Mail Service's Connected Sites and E-Mail Domain table, the
// Directory Replication Connectors (New, Properties, Sites tab, Request Now), the
// Directory Service's Check Now, and the site's mailboxes.  Every change goes through
// the site's admin endpoint (the calls the CLI makes); the site's file keeps the
// person's own lines.  Same safety rule as console.js: data goes into the page as text.
"use strict";

(() => {
  const C = window.imsConsole;
  const { el, card, table, row, notice, badge, api, site, viewTitle, ago, size } = C;

  // ------------------------------------------------------------------ dialogs

  // A modal property sheet: tabs of fields, OK / Cancel.  ``submit`` gets the form's
  // values; an error it throws is shown in the dialog, which stays open.
  function dialog({ id, title, tabs, okLabel, submit, buttons }) {
    return new Promise((resolve) => {
      const error = el("p", { class: "error form-error", role: "alert", id: `${id}-error` });
      const form = el("form", { class: "dialog-form", id, novalidate: true });
      const heads = el("div", { class: "tabs", role: "tablist" });
      const bodies = [];
      tabs.forEach((tab, i) => {
        const body = el("div", { class: "tab-page", id: `${id}-tab-${tab.key}`, hidden: i !== 0 }, tab.fields);
        bodies.push(body);
        const head = el("button", { type: "button", class: i === 0 ? "tab current" : "tab", role: "tab", id: `${id}-tabhead-${tab.key}` }, tab.label);
        head.addEventListener("click", () => {
          bodies.forEach((b) => { b.hidden = b !== body; });
          heads.querySelectorAll(".tab").forEach((h) => h.classList.toggle("current", h === head));
        });
        heads.append(head);
      });
      const close = (value) => { overlay.remove(); resolve(value); };
      const ok = el("button", { type: "submit", class: "primary", id: `${id}-ok` }, okLabel || "OK");
      const cancel = el("button", { type: "button", id: `${id}-cancel` }, "Cancel");
      cancel.addEventListener("click", () => close(null));
      form.append(tabs.length > 1 ? heads : null, ...bodies, error,
        el("div", { class: "dialog-buttons" }, (buttons || []).map((b) => {
          const button = el("button", { type: "button", id: b.id, class: b.class || "" }, b.label);
          button.addEventListener("click", () => b.click(close));
          return button;
        }), ok, cancel));
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        ok.disabled = true;
        error.textContent = "";
        try {
          close(await submit(values(form)));
        } catch (err) {
          error.textContent = err.message;
        } finally {
          ok.disabled = false;
        }
      });
      const overlay = el("div", { class: "modal-overlay" },
        el("div", { class: "modal", role: "dialog", "aria-modal": "true", "aria-labelledby": `${id}-title` },
          el("h3", { id: `${id}-title`, text: title }), form));
      document.body.append(overlay);
      const first = form.querySelector("input:not([readonly]), select, textarea");
      if (first) first.focus();
    });
  }

  // A question with Yes / No (Exchange's message boxes).
  function question({ id, title, text }) {
    return new Promise((resolve) => {
      const close = (value) => { overlay.remove(); resolve(value); };
      const yes = el("button", { type: "button", class: "primary", id: `${id}-yes` }, "Yes");
      const no = el("button", { type: "button", id: `${id}-no` }, "No");
      yes.addEventListener("click", () => close(true));
      no.addEventListener("click", () => close(false));
      const overlay = el("div", { class: "modal-overlay" },
        el("div", { class: "modal question", role: "alertdialog", "aria-modal": "true", id },
          el("h3", { text: title }), el("p", { text }), el("div", { class: "dialog-buttons" }, yes, no)));
      document.body.append(overlay);
      yes.focus();
    });
  }

  function values(form) {
    const out = {};
    for (const input of form.querySelectorAll("input, select, textarea")) {
      if (!input.name) continue;
      if (input.type === "radio") { if (input.checked) out[input.name] = input.value; }
      else if (input.type === "checkbox") out[input.name] = input.checked;
      else out[input.name] = input.value;
    }
    return out;
  }

  function field(label, input) {
    return el("label", { class: "field" }, el("span", { text: label }), input);
  }

  function input(id, name, value, props) {
    return el("input", { id, name, value: value === undefined || value === null ? "" : String(value), spellcheck: "false", autocomplete: "off", ...(props || {}) });
  }

  // ------------------------------------------------------------------ the site's file and its restart

  async function fileState(name) {
    try { return await api("GET", site(name, "/config/file")); }
    catch (err) { if (err.status === 502) return null; throw err; }  // the site is restarting
  }

  function restartNote(name, file, saved) {
    if (!file) return notice(`${name} does not answer: its Internet Mail Service is restarting…`, "warn restarting");
    if (file.pending_restart) {
      const restart = C.actionButton("Restart the Internet Mail Service now", { id: "ims-restart" }, async () => {
        const r = await api("POST", site(name, "/ims/restart"));
        restart.replaceWith(el("span", { class: "muted", text: ` ${r.message}` }));
        C.refreshView();
      });
      return el("p", { class: "notice warn", id: "restart-note", role: "status" }, `Saved to ${file.file}. `, file.message, " ", restart);
    }
    if (saved) return el("p", { class: "notice ok", id: "restart-done", role: "status",
      text: `${name} runs with ${file.file} as it is now.` });
    return null;
  }

  // redraw a view every second while its site has a change to take, or is restarting
  function follow(view, generation, pending) {
    const tick = async () => {
      if (C.current() !== generation || !pending()) return;
      try { await view.refresh(); } catch (err) { /* the next tick tries again */ }
      setTimeout(tick, 1000);
    };
    setTimeout(tick, 1000);
  }

  async function saved(message, name) {
    C.refreshView();
    return message || `Saved at ${name}.`;
  }

  // ------------------------------------------------------------------ Internet Mail Service

  async function viewIms(root, name, params) {
    const tab = ["connections", "internet-mail"].includes(params.get("tab")) ? params.get("tab") : "connected";
    viewTitle(root, `${name} — Internet Mail Service Properties`,
      "Connected Sites: the other sites reached through this IMS (KB Q196927 steps 2–5). Connections: the E-Mail Domain table, domain-specific routing to a host (no DNS). Internet Mail: what may be sent to each domain, size limits, journaling.");
    const heads = el("div", { class: "tabs", role: "tablist" },
      C.link(`#/site/${encodeURIComponent(name)}/ims`, "Connected Sites", { class: tab === "connected" ? "tab current" : "tab", id: "ims-tab-connected" }),
      C.link(`#/site/${encodeURIComponent(name)}/ims?tab=connections`, "Connections", { class: tab === "connections" ? "tab current" : "tab", id: "ims-tab-connections" }),
      C.link(`#/site/${encodeURIComponent(name)}/ims?tab=internet-mail`, "Internet Mail", { class: tab === "internet-mail" ? "tab current" : "tab", id: "ims-tab-internet-mail" }));
    if (tab === "internet-mail") {
      root.append(heads);
      return C.withData(root, [`directory:${name}`], async () => internetMail(await api("GET", site(name, "/config"))));
    }
    const result = el("div", { class: "result", id: "ims-result" });
    root.append(heads, result);
    let file = null;
    let changed = false;
    const generation = C.current();
    const view = await C.withData(root, [`directory:${name}`, "sites"], async () => {
      const [f, status] = await Promise.all([fileState(name), api("GET", site(name, "/status")).catch(() => null)]);
      file = f;
      const note = restartNote(name, file, changed);
      if (!file) return note;
      if (tab === "connected") return [note, connectedSites(name, file, status, result)];
      return [note, connections(name, file, result)];
    });
    const again = () => { changed = true; follow(view, generation, () => !file || file.pending_restart); };
    result.addEventListener("saved", again);
    return view;
  }

  // The Internet Mail tab, read-only: [[internet_mail]] entries as they apply (Q262126, Q176161),
  // the inbound and outbound size limits (Q231303), Message Journaling (Q239427). Edited in the file.
  function internetMail(cfg) {
    const limit = (n) => (n ? size(n) : "no limit");
    return [
      card("Message size",
        el("dl", { class: "facts" },
          el("dt", { text: "Inbound (smtp.max_message_size)" }), el("dd", { id: "im-inbound", text: limit(cfg.ims.max_message_size) }),
          el("dt", { text: "Outbound (delivery.max_message_size)" }), el("dd", { id: "im-outbound", text: limit(cfg.ims.max_outbound_message_size) }))),
      card("Specify by E-Mail Domain",
        el("p", { class: "muted", text: "Set in the site's file ([[internet_mail]]); a key an entry leaves out comes from the * entry. Disabled automatic messages are discarded without an NDR." }),
        table(["Domain", "Out of office", "Automatic replies", "Automatic forwards", "Display names", "Largest message"],
          cfg.internet_mail.map((e) => row(e.entry === "*" ? "* (default)" : e.entry,
            ...["out_of_office", "auto_replies", "auto_forwards", "display_names"].map((k) => (e[k] ? "sent" : "disabled")),
            limit(e.max_message_size))), { class: "internet-mail" })),
      card("Message Journaling",
        el("p", { id: "im-journaling", text: cfg.journaling.recipient
          ? `A copy of every message accepted at this site goes to ${cfg.journaling.recipient}${cfg.journaling.reports ? ", reports included" : ", reports excepted"} (KB Q239427).`
          : "Off ([journaling] recipient is not set)." })),
    ];
  }

  function connectedSites(name, file, status, result) {
    const organisation = status ? status.organisation : C.state.title;
    const edit = async (entry) => {
      const sheet = await dialog({
        id: "cs-dialog", title: entry ? `${entry.name} Properties` : "New Connected Site",
        tabs: [
          { key: "general", label: "General", fields: [
            field("Organization", input("cs-org", "organisation", organisation, { readonly: true })),
            field("Site", input("cs-name", "name", entry ? entry.name : "", entry ? { readonly: true } : { required: true, placeholder: "the remote site's directory name, e.g. SiteB" }))] },
          { key: "routing", label: "Routing Address", fields: [
            field("Type", input("cs-type", "type", entry ? "SMTP" : "", { placeholder: "SMTP" })),
            field("Address", input("cs-address", "routing_address", entry ? entry.routing_address : "", { placeholder: "@SiteB.microsoft.com" })),
            field("Cost", input("cs-cost", "cost", entry && entry.cost !== undefined ? entry.cost : "", { placeholder: "1", inputmode: "numeric" }))] },
        ],
        submit: async (v) => {
          const body = { type: v.type.trim(), routing_address: v.routing_address.trim(), cost: v.cost.trim() || null };
          if (entry) return api("PUT", site(name, `/config/connected-sites/${encodeURIComponent(entry.name)}`), body);
          return api("POST", site(name, "/config/connected-sites"), { name: v.name.trim(), ...body });
        },
      });
      if (sheet) done(result, sheet);
    };
    const rows = file.connected_sites.map((c) => el("tr", { dataset: { connectedSite: c.name } },
      el("td", { text: c.name }), el("td", {}, el("span", { class: "ptype", text: "SMTP" }), " ", el("span", { class: "addr", text: c.routing_address })),
      el("td", { class: "num", text: c.cost === undefined ? "1" : String(c.cost) }),
      el("td", { class: "buttons" },
        C.actionButton("Properties…", { class: "cs-properties" }, () => edit(c)),
        C.actionButton("Remove", { class: "danger cs-remove" }, async () => {
          if (!await question({ id: "cs-remove-q", title: "Connected Sites", text: `Remove ${c.name} from the Connected Sites of ${name}?` })) return;
          done(result, await api("DELETE", site(name, `/config/connected-sites/${encodeURIComponent(c.name)}`)));
        }))));
    return card("Connected Sites",
      el("p", { class: "muted", text: `Sites in ${file.file} reached through this Internet Mail Service.` }),
      table(["Site", "Routing address", "Cost", ""], rows, { class: "connected-sites" }),
      el("div", { class: "actions" }, C.actionButton("New…", { id: "cs-new", class: "primary" }, () => edit(null))));
  }

  function connections(name, file, result) {
    const edit = async (entry) => {
      const sheet = await dialog({
        id: "ed-dialog", title: entry ? `Edit E-Mail Domain ${entry.domain}` : "Add E-Mail Domain",
        tabs: [{ key: "domain", label: "E-Mail Domain", fields: [
          field("E-Mail domain", input("ed-domain", "domain", entry ? entry.domain : "", entry ? { readonly: true } : { placeholder: "SiteB.microsoft.com" })),
          el("p", { class: "muted", text: "Forward all messages for this domain to host:" }),
          field("Host", input("ed-host", "host", entry ? entry.host : "", { placeholder: "10.10.10.15" })),
          field("Port", input("ed-port", "port", entry && entry.port !== undefined ? entry.port : "", { placeholder: "25", inputmode: "numeric" }))] }],
        submit: async (v) => {
          const body = { host: v.host.trim(), port: v.port.trim() || null };
          if (entry) return api("PUT", site(name, `/config/email-domains/${encodeURIComponent(entry.domain)}`), body);
          return api("POST", site(name, "/config/email-domains"), { domain: v.domain.trim(), ...body });
        },
      });
      if (sheet) done(result, sheet);
    };
    const rows = file.email_domains.map((d) => el("tr", { dataset: { domain: d.domain } },
      el("td", { text: d.domain }), el("td", { text: `Forward to ${d.host}` }), el("td", { class: "num", text: d.port === undefined ? "25" : String(d.port) }),
      el("td", { class: "buttons" },
        C.actionButton("Edit…", { class: "ed-edit" }, () => edit(d)),
        C.actionButton("Remove", { class: "danger ed-remove" }, async () => {
          if (!await question({ id: "ed-remove-q", title: "E-Mail Domain", text: `Remove ${d.domain} from the E-Mail Domain table of ${name}?` })) return;
          done(result, await api("DELETE", site(name, `/config/email-domains/${encodeURIComponent(d.domain)}`)));
        }))));
    const tableBox = el("div", { id: "email-domain-table", hidden: !file.email_domains.length && !connections.open },
      table(["E-Mail domain", "Delivery", "Port", ""], rows, { class: "email-domains" }),
      el("div", { class: "actions" }, C.actionButton("Add…", { id: "ed-add", class: "primary" }, () => edit(null))));
    const open = el("button", { type: "button", id: "ed-open" }, "E-Mail Domain…");
    open.addEventListener("click", () => { connections.open = true; tableBox.hidden = false; });
    return card("Message Delivery", el("p", { class: "muted", text: "Mail for a domain in this table goes to its host, not by DNS." }), open, tableBox);
  }

  function done(result, answer) {
    result.replaceChildren(notice(answer.message || "Saved.", "ok"));
    result.dispatchEvent(new Event("saved"));
    C.refreshView();
  }

  // ------------------------------------------------------------------ Directory Replication

  async function viewDirectoryReplication(root, name) {
    viewTitle(root, `${name} — Directory Replication`,
      "The Directory Replication container: one connector per remote site (KB Q196927). Do not set up connectors unless you are prepared to configure both sites: replication messages back up until the other site is configured.",
      C.actionButton("New Directory Replication Connector…", { id: "drc-new", class: "primary" }, () => newConnector(name)));
    const result = el("div", { class: "result", id: "drc-result" });
    root.append(result);
    let file = null;
    let changed = false;
    const generation = C.current();
    const view = await C.withData(root, [`replication:${name}`, `directory:${name}`, `queue:${name}`], async () => {
      const [f, repl] = await Promise.all([fileState(name), api("GET", site(name, "/replication/status")).catch(() => null)]);
      file = f;
      const note = restartNote(name, file, changed);
      if (!file) return note;
      const peers = {};
      for (const p of (repl && repl.peers) || []) peers[p.site] = p;
      const rows = file.replication_connectors.map((c) => {
        const p = peers[c.site] || {};
        return el("tr", { dataset: { connector: c.site } },
          el("td", { text: `Directory Replication Connector (${c.site})` }),
          el("td", { text: c.server || "–" }),
          el("td", { text: c.schedule === undefined ? "every 3 h (default)" : String(c.schedule) }),
          el("td", { class: "num hwm", text: p.high_water === undefined ? "–" : String(p.high_water) }),
          el("td", { class: "num backlog", text: p.backlog === undefined ? "–" : String(p.backlog) }),
          el("td", { class: "buttons" }, C.actionButton("Properties…", { class: "drc-properties" }, () => connectorProperties(name, c, p)),
            C.actionButton("Remove", { class: "danger drc-remove" }, async () => {
              if (!await question({ id: "drc-remove-q", title: "Directory Replication", text: `Remove the Directory Replication Connector (${c.site}) of ${name}?` })) return;
              done(result, await api("DELETE", site(name, `/config/replication-connectors/${encodeURIComponent(c.site)}`)));
            })));
      });
      return [note, backlogWarnings(name, Object.values(peers)),
        table(["Connector", "Remote server", "Schedule", "High-water", "Backlog", ""], rows, { class: "connectors" })];
    });
    result.addEventListener("saved", () => { changed = true; follow(view, generation, () => !file || file.pending_restart); });
    async function newConnector(siteName) {
      const f = await fileState(siteName);
      if (!f) throw new Error(`${siteName} is restarting: try again in a moment`);
      const taken = new Set(f.replication_connectors.map((c) => c.site));
      const offered = f.sites_offered.filter((s) => !taken.has(s));
      const answer = await dialog({
        id: "drc-dialog", title: "New Directory Replication Connector",
        tabs: [{ key: "new", label: "New", fields: [
          field("Remote site name", el("select", { id: "drc-site", name: "site" }, offered.map((s) => el("option", { value: s, text: s })))),
          offered.length ? null : el("p", { class: "muted", text: "No other site to offer: add it to Connected Sites first." }),
          field("Server in remote site", input("drc-server", "server", "", { placeholder: "ServerB (the NetBIOS name)" })),
          el("fieldset", {}, el("legend", { text: "Is the remote site available on this network?" }),
            el("label", { class: "check" }, el("input", { type: "radio", name: "on_network", value: "yes", id: "drc-on-network-yes" }), " Yes, the remote site is available on this network"),
            el("label", { class: "check" }, el("input", { type: "radio", name: "on_network", value: "no", id: "drc-on-network-no", checked: true }), " No, the remote site is not available on this network"))] }],
        submit: (v) => api("POST", site(siteName, "/config/replication-connectors"),
          { site: v.site || "", server: v.server.trim() || null, remote_on_network: v.on_network === "yes" }),
      });
      if (answer) done(result, answer);
    }
    async function connectorProperties(siteName, c, p) {
      const answer = await dialog({
        id: "drcp-dialog", title: `Directory Replication Connector (${c.site}) Properties`,
        tabs: [
          { key: "general", label: "General", fields: [
            field("Remote site", input("drcp-site", "site", c.site, { readonly: true })),
            field("Server in remote site", input("drcp-server", "server", c.server || "")),
            field("Schedule", el("select", { id: "drcp-schedule", name: "schedule" },
              [["", "Every 3 hours (the default)"], ["always", "Always (every 15 minutes)"], ["never", "Never (Request Now only)"], ["3h", "Every 3 hours"], ["1h", "Every hour"]]
                .map(([value, text]) => el("option", { value, text, selected: String(c.schedule || "") === value }))))] },
          { key: "sites", label: "Sites", fields: [
            el("p", { class: "muted", text: "Inbound sites: the sites whose directory this connector brings to this site." }),
            el("ul", { class: "sites-list" }, el("li", { class: "selected", text: c.site })),
            el("p", { class: "muted", text: `High-water ${p.high_water === undefined ? "–" : p.high_water}; last request ${ago(p.last_request)}; last reply ${ago(p.last_reply)}; backlog ${p.backlog === undefined ? "–" : p.backlog}.` })] },
        ],
        buttons: [{ id: "drcp-request-now", label: "Request Now…", click: async (close) => {
          const how = await dialog({
            id: "rn-dialog", title: "Request Now",
            tabs: [{ key: "how", label: "Request Now", fields: [
              el("label", { class: "check" }, el("input", { type: "radio", name: "how", value: "new", id: "rn-new", checked: true }), " Update only New and Modified Items"),
              el("label", { class: "check" }, el("input", { type: "radio", name: "how", value: "all", id: "rn-all" }), " Refresh all items")] }],
            submit: (v) => api("POST", site(siteName, "/replication/request-now"), { site: c.site, full: v.how === "all" }),
          });
          if (how) {
            close(null);
            result.replaceChildren(notice(`Request Now sent to ${c.site}: ${how.full ? "all items" : `new and modified items since USN ${how.since_usn}`} (queue id ${how.queue_id}).`, "ok"));
            C.refreshView();
          }
        } }],
        submit: (v) => api("PUT", site(siteName, `/config/replication-connectors/${encodeURIComponent(c.site)}`),
          { server: v.server.trim() || null, schedule: v.schedule || null }),
      });
      if (answer) done(result, answer);
    }
    return view;
  }

  function backlogWarnings(name, peers) {
    const waiting = peers.filter((p) => p.backlog > 0);
    if (!waiting.length) return el("p", { class: "muted", id: "backlog-clear", text: "No replication messages are waiting in this site's queue." });
    return el("div", { class: "notice warn backlog-warning", id: "backlog-warning", role: "alert" },
      waiting.map((p) => el("p", { dataset: { peer: p.site } },
        `${p.backlog} replication message${p.backlog === 1 ? "" : "s"} for ${p.site} wait${p.backlog === 1 ? "s" : ""} in the queue of ${name}: ${p.site} does not take them until it is configured too (a Directory Replication Connector back to ${name}). KB Q196927: do not set up Directory Replication connectors unless you are prepared to configure both sites. `,
        C.link(`#/site/${encodeURIComponent(name)}/queue`, "Queue"), " · ",
        C.link(`#/tracking?q=${encodeURIComponent(p.address || "")}`, "Message Tracking"))));
  }

  // ------------------------------------------------------------------ the server's Directory Service

  async function viewDirectoryService(root, name) {
    const result = el("div", { class: "result", id: "ds-result" });
    viewTitle(root, `${name} — Directory Service Properties`, "General: Check Now runs the knowledge consistency check; the new sites appear in the left window (KB Q196927, Speeding up Initial Directory Replication, step 3).",
      C.actionButton("Check Now", { id: "ds-check-now", class: "primary" }, async () => {
        const r = await api("POST", site(name, "/kcc/check-now"));
        result.replaceChildren(card("Check Now (knowledge consistency check)",
          el("p", { id: "ds-known", text: `Sites known: ${r.known_sites.join(", ") || "none"}.` }),
          r.awaiting_replication.length ? el("p", { class: "muted", text: `Site and Configuration objects only until replication completes: ${r.awaiting_replication.join(", ")} (Request Now on their Directory Replication Connectors).` }) : null,
          r.findings.length ? el("ul", { class: "findings" }, r.findings.map((f) => el("li", {}, badge(f.severity, f.severity === "info" ? "ok" : "warn"), ` ${f.site}: ${f.message}`))) : el("p", { class: "muted", text: "No inconsistencies found." })));
        await refreshKnown();
        C.refreshView();
      }));
    root.append(result);
    return C.withData(root, [`directory:${name}`], async () => {
      const k = await api("GET", site(name, "/kcc/known"));
      return card("Sites known to this directory", k.checked
        ? el("ul", { id: "ds-sites" }, k.known_sites.map((s) => el("li", { text: k.awaiting_replication.includes(s) ? `${s} (replication not complete)` : s })))
        : el("p", { class: "muted", text: "Check Now has not run at this site yet." }));
    });
  }

  // the left window: under each site, the sites its last Check Now made known
  async function refreshKnown() {
    for (const box of document.querySelectorAll("[data-known-sites]")) {
      const name = box.dataset.knownSites;
      try {
        const k = await api("GET", site(name, "/kcc/known"));
        box.replaceChildren(...k.known_sites.filter((s) => s !== name).map((s) =>
          el("li", { class: "known-site", dataset: { site: s } }, el("span", { class: "tree-label", text: s }),
            k.awaiting_replication.includes(s) ? el("span", { class: "muted small", text: " (Site, Configuration)" }) : null)));
      } catch (err) { /* the site is restarting: the next refresh fills it */ }
    }
  }

  // ------------------------------------------------------------------ mailboxes

  async function viewMailboxes(root, name) {
    const result = el("div", { class: "result", id: "mbx-result" });
    viewTitle(root, `${name} — Recipients`, "The site's mailboxes: New Mailbox, Properties (General, E-mail Addresses), Delete. Changes replicate to the other sites.",
      C.actionButton("New Mailbox…", { id: "mbx-new", class: "primary" }, async () => {
        const m = await dialog({
          id: "mbx-dialog", title: "New Mailbox",
          tabs: [{ key: "general", label: "General", fields: [
            field("Alias", input("mbx-alias", "alias", "", { placeholder: "User4" })),
            field("Display name", input("mbx-display", "display_name", "", { placeholder: "User Four" }))] }],
          submit: (v) => api("POST", site(name, "/directory/mailboxes"), { alias: v.alias.trim(), display_name: v.display_name.trim() || null }),
        });
        if (m) { result.replaceChildren(notice(`Mailbox ${m.alias} created: ${m.primary_address}.`, "ok")); C.refreshView(); }
      }));
    root.append(result);
    return C.withData(root, [`directory:${name}`], async () => {
      const dir = await api("GET", site(name, `/directory?site=${encodeURIComponent(name)}`));
      const rows = dir.mailboxes.filter((m) => m.home_site === name).map((m) => el("tr", { dataset: { alias: m.alias } },
        el("td", {}, el("strong", { text: m.display_name }), el("div", { class: "muted", text: m.alias })),
        el("td", { class: "addr primary-address", text: m.primary_address }),
        el("td", { class: "addr muted", text: m.proxy_addresses.filter((p) => !p.startsWith("SMTP:")).join(", ") }),
        el("td", { class: "buttons" },
          C.actionButton("Properties…", { class: "mbx-properties" }, async () => {
            const secondary = m.proxy_addresses.filter((p) => p.toLowerCase().startsWith("smtp:") && !p.startsWith("SMTP:")).map((p) => p.slice(5));
            const changed = await dialog({
              id: "mbxp-dialog", title: `${m.display_name} Properties`,
              tabs: [
                { key: "general", label: "General", fields: [
                  field("Alias", input("mbxp-alias", "alias", m.alias, { readonly: true })),
                  field("Display name", input("mbxp-display", "display_name", m.display_name))] },
                { key: "addresses", label: "E-mail Addresses", fields: [
                  field("Primary (SMTP, from Site Addressing)", input("mbxp-primary", "primary", m.primary_address, { readonly: true })),
                  field("Other SMTP addresses, one a line", el("textarea", { id: "mbxp-addresses", name: "addresses", rows: 4, spellcheck: "false", text: secondary.join("\n") }))] },
              ],
              submit: (v) => api("PUT", site(name, `/directory/mailboxes/${encodeURIComponent(m.alias)}`),
                { display_name: v.display_name, addresses: v.addresses.split(/[\n,]/).map((a) => a.trim()).filter(Boolean) }),
            });
            if (changed) { result.replaceChildren(notice(`${changed.alias} changed.`, "ok")); C.refreshView(); }
          }),
          C.actionButton("Delete", { class: "danger mbx-delete" }, async () => {
            if (!await question({ id: "mbx-delete-q", title: "Delete mailbox", text: `Delete the mailbox ${m.alias} of ${name}? Its deletion replicates to the other sites.` })) return;
            await api("DELETE", site(name, `/directory/mailboxes/${encodeURIComponent(m.alias)}`));
            result.replaceChildren(notice(`Mailbox ${m.alias} deleted.`, "ok"));
            C.refreshView();
          }))));
      return table(["Mailbox", "Primary address", "Other addresses", ""], rows, { class: "mailboxes-table" });
    });
  }

  // ------------------------------------------------------------------ registration

  C.addSitePage("ims", viewIms);
  C.addSitePage("dirrep", viewDirectoryReplication);
  C.addSitePage("ds", viewDirectoryService);
  C.addSitePage("mailboxes", viewMailboxes);
  C.questionBox = question;
  C.setTreeExtras((name) => {
    const n = encodeURIComponent(name);
    const known = el("ul", { class: "known-sites", dataset: { knownSites: name } });
    setTimeout(refreshKnown, 0);
    return [
      el("li", {}, C.link(`#/site/${n}/ims`, "Internet Mail Service")),
      el("li", {}, C.link(`#/site/${n}/dirrep`, "Directory Replication Connectors")),
      el("li", {}, C.link(`#/site/${n}/ds`, "Directory Service (Check Now)")),
      el("li", {}, C.link(`#/site/${n}/mailboxes`, "Recipients (mailboxes)")),
      el("li", { class: "known" }, el("span", { class: "tree-label muted small", text: "Sites known here" }), known),
    ];
  });
  window.addEventListener("hashchange", () => setTimeout(refreshKnown, 0));
})();
