// The console: sign-in, then pages by the fragment route (#/integrations, #/i/<id>/<page>).
// Everything is built with DOM calls (never innerHTML), so no CRM or API text is ever read as markup.
import { ApiError, base, call, clearToken, enc, linkIntegration, setToken, takeLinkFromFragment, token } from "./api.js";
import { lineChart } from "./chart.js";
import { formatTime, lang, percent, setLang, t } from "./i18n.js";

const TYPES = ["IN_PROGRESS", "PAID", "CANCELLED", "SPAM"];
const ATTRIBUTE_TYPES = ["text", "numeric", "date", "datetime", "email"];
const METRIKA_ID = /^[A-Za-z0-9_:-]{1,255}$/;
const PAGES = ["mapping", "delivery", "attributes", "links"];

// --- DOM helpers ---------------------------------------------------------------------------------------

function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const main = () => document.getElementById("main");
let uid = 0;
const nextId = (prefix) => `${prefix}-${++uid}`;

// The route a page was rendered for: a page whose data arrives after the user moved on (a slow list,
// then a click elsewhere) must not replace the page they moved to.
let shownFor = null;

function show(...nodes) {
  if (shownFor !== null && location.hash !== shownFor) return;
  main().replaceChildren(...nodes);
}

function message(kind, text) {
  // role=alert is read at once; role=status politely.
  return h("p", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

function errorText(error, integrationId) {
  if (!(error instanceof ApiError)) return t("errGeneric", { status: "?", message: String(error) });
  if (error.status === 0) return t("errNetwork");
  if (error.status === 401) return t("errUnauthorized");
  if (error.status === 403) {
    if (linkIntegration() && integrationId && integrationId !== linkIntegration()) {
      return t("errForbiddenIntegration", { id: integrationId });
    }
    // The link's own integration refused: the authorizer no longer knows the link.
    return linkIntegration() ? t("errLinkInvalid") : t("errForbidden");
  }
  if (error.status === 404 && integrationId) return t("errNotFound", { id: integrationId });
  // Metrika's or the CRM's refusal (422), a conflict (409), a service unavailable (502-504): the
  // service's message says it in words.
  if ([409, 422, 502, 503, 504].includes(error.status) && error.message) return error.message;
  return t("errGeneric", { status: error.status, message: error.message });
}

// --- frame: header, navigation, language -----------------------------------------------------------------

function route() {
  const match = /^#\/i\/([A-Za-z0-9_-]{1,64})\/(\w+)$/.exec(location.hash);
  if (match && PAGES.includes(match[2])) return { page: match[2], id: match[1] };
  if (location.hash === "#/integrations") return { page: "integrations" };
  const own = linkIntegration();
  return own ? { page: "mapping", id: own } : { page: "integrations" };
}

function renderFrame() {
  document.title = t("title");
  document.getElementById("brand").textContent = t("brand");
  const langLabel = document.getElementById("lang-label");
  langLabel.textContent = t("language");
  const select = document.getElementById("lang");
  select.value = lang();
  const signOut = document.getElementById("signout");
  signOut.textContent = t("signOut");
  signOut.hidden = !token();
  const nav = document.getElementById("nav");
  nav.setAttribute("aria-label", t("title"));
  const current = route();
  const items = [];
  if (token() && !linkIntegration()) items.push(["#/integrations", t("navIntegrations"), current.page === "integrations"]);
  const id = current.id || linkIntegration();
  if (token() && id) {
    const pages = linkIntegration() ? ["mapping", "delivery", "attributes"] : PAGES;
    const names = { mapping: "navMapping", delivery: "navDelivery", attributes: "navAttributes", links: "navLinks" };
    for (const page of pages) items.push([`#/i/${id}/${page}`, t(names[page]), current.page === page && current.id === id]);
  }
  nav.replaceChildren(h("ul", {}, items.map(([href, text, active]) =>
    h("li", {}, h("a", { href, "aria-current": active ? "page" : null }, text)))));
}

async function render() {
  shownFor = null;
  renderFrame();
  if (!token()) return renderSignIn();
  shownFor = location.hash;
  const current = route();
  show(h("p", { class: "muted", role: "status" }, t("loading")));
  const pages = { integrations: renderIntegrations, mapping: renderMapping, delivery: renderDelivery,
    attributes: renderAttributes, links: renderLinks };
  try {
    await pages[current.page](current.id);
  } catch (error) {
    // An admin token may call every route: a 403 means the token itself is wrong.
    const refused = error instanceof ApiError && (error.status === 401 || (error.status === 403 && !linkIntegration()));
    if (refused) {
      // An admin token the API does not take: back to the sign-in form, saying so.
      clearToken();
      renderFrame();
      renderSignIn(t("errTokenRefused"));
      return;
    }
    show(h("h1", {}, t("title")), message("error", errorText(error, current.id)));
  }
  const heading = main().querySelector("h1");
  if (heading && document.activeElement === document.body) heading.setAttribute("tabindex", "-1");
}

// --- sign-in -------------------------------------------------------------------------------------------------

function renderSignIn(problem = null) {
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const form = h("form", { class: "card narrow", onsubmit: (event) => {
    event.preventDefault();
    if (!input.value.trim()) return;
    setToken(input.value.trim());
    if (location.hash.startsWith("#/i/") || location.hash === "#/integrations") render();
    else location.hash = "#/integrations";  // the hashchange renders it
  } },
  h("h1", {}, t("signInTitle")),
  problem ? message("error", problem) : null,
  h("p", { class: "muted" }, t("signInHelp")),
  h("label", { for: "token" }, t("tokenLabel")), input,
  h("button", { type: "submit", class: "primary" }, t("signIn")));
  show(form);
}

// --- integrations ----------------------------------------------------------------------------------------------

function webhookText(webhook) {
  if (!webhook || webhook.error) return t("webhookUnknown");
  if (webhook.disabled) return t("webhookDisabled");
  return webhook.registered ? t("webhookOk") : t("webhookMissing");
}

async function renderIntegrations(after) {
  const data = await call("GET", `/integrations${after ? `?after=${enc(after)}` : ""}`);
  const heads = ["colIntegration", "colCrm", "colCounter", "colBacklog", "colRetrying", "colParked", "colLastUpload",
    "colWebhook", "colRequestsLeft"];
  const rows = data.integrations.map((item) => {
    const health = item.health || {};
    return h("tr", {},
      h("th", { scope: "row" }, h("a", { href: `#/i/${item.integration_id}/mapping` }, item.integration_id)),
      h("td", {}, item.crm), h("td", {}, item.counter_id),
      h("td", { class: "num" }, health.backlog, health.complete === false ? h("span", { class: "muted", title: t("partialCounts", { n: health.scanned }) }, "+") : null),
      h("td", { class: "num" }, health.retrying),
      h("td", { class: "num" }, health.parked),
      h("td", {}, formatTime(health.last_sent_at)),
      h("td", {}, webhookText(health.webhook)),
      h("td", { class: "num" }, health.metrika_requests_left_today ?? "—"));
  });
  show(h("h1", {}, t("integrationsTitle")),
    rows.length ? h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, heads.map((key) => h("th", { scope: "col" }, t(key))))),
      h("tbody", {}, rows))) : h("p", {}, t("noIntegrations")),
    data.next ? h("button", { type: "button", onclick: () => renderIntegrations(data.next) }, t("more")) : null);
}

// --- status mapping ----------------------------------------------------------------------------------------------

// `notice`: a message to show above the form after a reload (the answer to a save), focused so a
// keyboard or screen-reader user lands on it.
async function renderMapping(id, notice = null) {
  const data = await call("GET", `/integrations/${enc(id)}/stages`);
  const form = h("form", { class: "mapping", novalidate: true });
  const state = h("div", { id: "mapping-state" });
  const feedback = h("div", { id: "mapping-feedback", "aria-live": "polite" });
  const rows = data.stages.map((stage, index) => mappingRow(stage, index));
  const saveButton = h("button", { type: "submit", class: "primary", id: "save-mapping" }, t("save"));
  const propose = h("button", { type: "button", id: "propose", onclick: () => {
    for (const row of rows) row.propose();
    rows.find((row) => row.proposable)?.focus();
  } }, t("proposeDefaults"));
  const showState = (pushedAt) => state.replaceChildren(
    message("info", pushedAt ? t("savedAt", { time: formatTime(pushedAt) }) : t("neverSaved")));
  showState(data.pushed_at);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    feedback.replaceChildren();
    rows.forEach((row) => row.clearError());
    const entries = [], owners = [];
    let valid = true;
    for (const row of rows) {
      const entry = row.entry();
      if (entry === undefined) continue;
      if (entry === null) { valid = false; continue; }
      entries.push(entry);
      owners.push(row);
    }
    if (!valid) {
      feedback.replaceChildren(message("error", t("fixFields")));
      rows.find((row) => row.hasError())?.focusError();
      return;
    }
    saveButton.disabled = true;
    saveButton.textContent = t("saving");
    try {
      const saved = await call("PUT", `/integrations/${enc(id)}/status-mapping`, { entries });
      data.pushed_at = saved.pushed_at;
      showState(saved.pushed_at);
      // Read the stages again: what is mapped now, and the deals still held.
      await renderMapping(id, t("saved", { n: saved.counter_statuses, q: saved.requeued }));
      return;
    } catch (error) {
      const keep = data.pushed_at ? t("refusedKeep", { time: formatTime(data.pushed_at) }) : t("refusedKeepNone");
      if (error instanceof ApiError && error.status === 400 && error.body.details) {
        placeFieldErrors(error.body.details, owners);
        feedback.replaceChildren(message("error", t("fixFields")));
        rows.find((row) => row.hasError())?.focusError();
      } else {
        // Metrika's refusal (422), a conflict on a shared counter (409), Metrika unavailable (502/503):
        // its reason in words, and what Metrika holds now.
        feedback.replaceChildren(h("div", { class: "message error", role: "alert", id: "mapping-error" },
          h("p", {}, errorText(error, id)), h("p", {}, keep)));
      }
    } finally {
      saveButton.disabled = false;
      saveButton.textContent = t("save");
    }
  });
  const table = h("table", { class: "stack" },
    h("caption", { class: "visually-hidden" }, t("mappingTitle")),
    h("thead", {}, h("tr", {}, ["colStage", "colHeld", "colType", "colMetrikaId", "colLabel"].map(
      (key) => h("th", { scope: "col" }, t(key))))),
    h("tbody", {}, rows.map((row) => row.node)));
  form.append(h("div", { class: "table-wrap" }, table), h("div", { class: "actions" }, propose, saveButton), feedback);
  const refresh = h("button", { type: "button", id: "refresh-mapping", onclick: () => renderMapping(id) }, t("refresh"));
  show(h("h1", {}, t("mappingTitle"), h("span", { class: "subtitle" }, ` · ${id}`)),
    h("p", { class: "muted" }, t("mappingHelp")),
    state, refresh,
    data.held_total ? message("warning", t("heldTotal", { n: `${data.held_total}${data.complete === false ? "+" : ""}` })) : null,
    form);
  if (notice) {
    const saved = message("success", notice);
    saved.id = "mapping-saved";
    saved.tabIndex = -1;
    feedback.replaceChildren(saved);
    saved.focus();
  }
}

function mappingRow(stage, index) {
  const mapped = stage.mapped || {};
  const ids = { type: nextId("type"), metrika: nextId("mid"), label: nextId("label"), error: nextId("err") };
  const type = h("select", { id: ids.type, name: `type-${index}`, "data-stage": stage.crm_status },
    h("option", { value: "" }, t("typeNone")), TYPES.map((value) => h("option", { value }, `${t(`type_${value}`)} (${value})`)));
  type.value = mapped.type || "";
  const metrikaId = h("input", { id: ids.metrika, name: `metrika-${index}`, value: mapped.metrika_status_id || "",
    autocomplete: "off", spellcheck: "false", "data-stage": stage.crm_status });
  const label = h("input", { id: ids.label, name: `label-${index}`, value: mapped.humanized || "", autocomplete: "off",
    "data-stage": stage.crm_status });
  const error = h("span", { id: ids.error, class: "field-error" });
  const name = stage.name;
  const hidden = (forId, key) => h("label", { for: forId, class: "visually-hidden" }, t(key, { stage: name }));
  const node = h("tr", { "data-stage": stage.crm_status },
    h("th", { scope: "row", class: "stage" }, h("span", {}, name), h("span", { class: "code" }, stage.crm_status),
      stage.in_crm ? null : h("span", { class: "badge" }, t("notInCrm"))),
    h("td", { class: "num", "data-label": t("colHeld") }, stage.held ? h("strong", { class: "held" }, stage.held) : "0"),
    h("td", { "data-label": t("colType") }, hidden(ids.type, "typeFor"), type),
    h("td", { "data-label": t("colMetrikaId") }, hidden(ids.metrika, "idFor"), metrikaId, error),
    h("td", { "data-label": t("colLabel") }, hidden(ids.label, "labelFor"), label));
  const setError = (text, field = metrikaId) => {
    error.textContent = text;
    field.setAttribute("aria-invalid", "true");
    field.setAttribute("aria-describedby", ids.error);
    node.classList.add("has-error");
  };
  return {
    node,
    get proposable() { return !type.value && !!stage.proposed; },
    focus() { type.focus(); },
    propose() {
      if (type.value || !stage.proposed) return;
      type.value = stage.proposed.type;
      metrikaId.value = stage.proposed.metrika_status_id;
      label.value = stage.proposed.humanized || name;
    },
    // undefined: not mapped (left out); null: invalid (marked); else the entry.
    entry() {
      if (!type.value) return undefined;
      const value = metrikaId.value.trim();
      if (!value) { setError(t("errIdRequired")); return null; }
      if (!METRIKA_ID.test(value)) { setError(t("errIdPattern")); return null; }
      const entry = { crm_status: stage.crm_status, metrika_status_id: value, type: type.value };
      if (label.value.trim()) entry.humanized = label.value.trim();
      if (mapped.goal_action_ids && mapped.type) entry.goal_action_ids = mapped.goal_action_ids;
      return entry;
    },
    setError,
    clearError() {
      error.textContent = "";
      node.classList.remove("has-error");
      for (const field of [type, metrikaId, label]) { field.removeAttribute("aria-invalid"); field.removeAttribute("aria-describedby"); }
    },
    hasError() { return node.classList.contains("has-error"); },
    focusError() { (node.querySelector("[aria-invalid]") || type).focus(); },
    fields: { type, metrika_status_id: metrikaId, humanized: label, crm_status: type },
  };
}

// Marshmallow's details: {"entries": {"3": {"metrika_status_id": ["…"]}}} → next to the field of that row.
function placeFieldErrors(details, owners) {
  const entries = (details && details.entries) || {};
  if (Array.isArray(entries) || typeof entries !== "object") return;
  for (const [index, fields] of Object.entries(entries)) {
    const row = owners[Number(index)];
    if (!row || typeof fields !== "object") continue;
    for (const [field, messages] of Object.entries(fields)) {
      const text = Array.isArray(messages) ? messages.join(" ") : String(messages);
      row.setError(text, row.fields[field] || row.fields.metrika_status_id);
    }
  }
}

// --- delivery ----------------------------------------------------------------------------------------------------

async function renderDelivery(id) {
  const [status, series] = await Promise.all([
    call("GET", `/integrations/${enc(id)}/status`), call("GET", `/integrations/${enc(id)}/delivery`)]);
  const feedback = h("div", { "aria-live": "polite", id: "delivery-feedback" });
  const days = series.days;
  const share = (day, key) => (day.orders ? day[key] / day.orders : null);
  const chart = days.length ? h("figure", { class: "chart-box" },
    lineChart({ title: t("sharesTitle"), points: days.map((d) => d.day), series: [
      { className: "s-client", values: days.map((d) => share(d, "with_client_id")) },
      { className: "s-phone", values: days.map((d) => share(d, "with_phone")) },
      { className: "s-email", values: days.map((d) => share(d, "with_email")) },
      { className: "s-late", values: days.map((d) => share(d, "late")) },
    ] }),
    h("figcaption", {}, t("chartCaption")),
    h("ul", { class: "legend" }, [["s-client", "shareClientId"], ["s-phone", "sharePhone"], ["s-email", "shareEmail"],
      ["s-late", "late"]].map(([cls, key]) => h("li", {}, h("span", { class: `swatch ${cls}`, "aria-hidden": "true" }), t(key))))) : h("p", {}, t("noDays"));
  const dayTable = days.length ? h("div", { class: "table-wrap" }, h("table", { id: "days" },
    h("caption", {}, t("sharesTitle")),
    h("thead", {}, h("tr", {}, ["colDay", "colOrders", "shareClientId", "sharePhone", "shareEmail", "late"].map(
      (key) => h("th", { scope: "col" }, t(key))))),
    h("tbody", {}, days.map((d) => h("tr", {}, h("th", { scope: "row" }, d.day), h("td", { class: "num" }, d.orders),
      ["with_client_id", "with_phone", "with_email", "late"].map((key) => h("td", { class: "num" }, percent(share(d, key))))))))) : null;
  const figures = [
    ["backlog", status.backlog], ["retrying", status.retrying], ["parked", status.failed_count],
    ["ordersSent", status.orders_sent], ["shareClientId", percent(status.share_with_client_id)],
    ["sharePhone", percent(status.share_with_phone)], ["shareEmail", percent(status.share_with_email)],
    ["late", status.orders_older_than_21_days], ["lastUpload", formatTime(status.last_successful_upload)],
    ["requestsToday", status.metrika_requests_today ?? "—"]];
  const replayButton = (body, text) => h("button", { type: "button", onclick: async (event) => {
    event.currentTarget.disabled = true;
    try {
      const answer = await call("POST", `/integrations/${enc(id)}/replay`, body);
      feedback.replaceChildren(message("success", t("replayed", { n: answer.queued })));
    } catch (error) {
      feedback.replaceChildren(message("error", errorText(error, id)));
    }
  } }, text);
  const parked = status.failed.length ? h("div", { class: "table-wrap" }, h("table", { id: "parked" },
    h("thead", {}, h("tr", {}, ["colEntity", "colReason", "colActions"].map((key) => h("th", { scope: "col" }, t(key))))),
    h("tbody", {}, status.failed.map((item) => h("tr", {},
      h("th", { scope: "row" }, `${item.kind} ${item.crm_id}`),
      h("td", {}, (item.error && item.error.message) || ""),
      h("td", {}, replayButton({ kind: item.kind, crm_id: item.crm_id }, t("replay")))))))) : h("p", {}, t("noParked"));
  const since = h("input", { id: "import-since", type: "date", required: true });
  const job = status.backfill;
  const importForm = h("form", { class: "inline", onsubmit: async (event) => {
    event.preventDefault();
    if (!since.value) { since.focus(); return; }
    try {
      await call("POST", `/integrations/${enc(id)}/backfill`, { since: since.value });
      await renderDelivery(id);
    } catch (error) {
      feedback.replaceChildren(message("error", errorText(error, id)));
    }
  } }, h("label", { for: "import-since" }, t("importSince")), since, h("button", { type: "submit" }, t("importStart")));
  show(h("h1", {}, t("deliveryTitle"), h("span", { class: "subtitle" }, ` · ${id}`)),
    h("button", { type: "button", onclick: () => renderDelivery(id) }, t("refresh")),
    feedback,
    h("section", { "aria-labelledby": "figures-h" }, h("h2", { id: "figures-h" }, t("figuresTitle")),
      h("dl", { class: "figures", id: "figures" }, figures.map(([key, value]) =>
        h("div", {}, h("dt", {}, t(key)), h("dd", {}, value))))),
    h("section", { "aria-labelledby": "shares-h" }, h("h2", { id: "shares-h" }, t("sharesTitle")), chart, dayTable),
    h("section", { "aria-labelledby": "uploads-h" }, h("h2", { id: "uploads-h" }, t("uploadsTitle")),
      h("dl", { class: "figures", id: "uploads" }, Object.entries(status.uploads).map(([key, value]) =>
        h("div", {}, h("dt", {}, key), h("dd", {}, value))))),
    h("section", { "aria-labelledby": "parked-h" }, h("h2", { id: "parked-h" }, t("parkedTitle")), parked,
      status.failed.length || status.dead_lettered.count ? replayButton({}, t("replayAll")) : null),
    h("section", { "aria-labelledby": "import-h" }, h("h2", { id: "import-h" }, t("importTitle")),
      job ? h("dl", { class: "figures", id: "import" }, Object.entries(job).filter(([, v]) => typeof v !== "object").map(
        ([key, value]) => h("div", {}, h("dt", {}, key), h("dd", {}, String(value))))) : h("p", {}, t("importNone")),
      importForm));
}

// --- attributes --------------------------------------------------------------------------------------------------

async function renderAttributes(id) {
  const [current, listing] = await Promise.all([
    call("GET", `/integrations/${enc(id)}/attributes`), call("GET", `/integrations/${enc(id)}/fields`)]);
  const fields = listing.fields || [];
  const body = h("tbody");
  const feedback = h("div", { "aria-live": "polite", id: "attributes-feedback" });
  const rows = [];
  const addRow = (entry = {}) => {
    const n = rows.length + 1;
    const ids = { field: nextId("f"), entity: nextId("e"), name: nextId("n"), type: nextId("t"), multi: nextId("m"), error: nextId("err") };
    const field = fields.length
      ? h("select", { id: ids.field }, h("option", { value: "" }, t("chooseField")),
        fields.map((f) => h("option", { value: f.id }, `${f.name} (${f.entity}, ${f.id})`)))
      : h("input", { id: ids.field, autocomplete: "off", spellcheck: "false" });
    if (entry.crm_field && fields.length && !fields.some((f) => f.id === entry.crm_field)) {
      field.append(h("option", { value: entry.crm_field }, entry.crm_field));
    }
    field.value = entry.crm_field || "";
    const entity = h("select", { id: ids.entity }, h("option", { value: "contact" }, t("entityContact")),
      h("option", { value: "order" }, t("entityOrder")));
    entity.value = entry.entity || "order";
    const name = h("input", { id: ids.name, value: entry.name || "", autocomplete: "off", spellcheck: "false" });
    const type = h("select", { id: ids.type }, ATTRIBUTE_TYPES.map((value) => h("option", { value }, value)));
    type.value = entry.type || "text";
    const multi = h("input", { id: ids.multi, type: "checkbox" });
    multi.checked = !!entry.multivalued;
    const error = h("span", { id: ids.error, class: "field-error" });
    const label = (forId, key) => h("label", { for: forId, class: "visually-hidden" }, t(key, { n }));
    const row = { entry, field, entity, name, type, multi, error, node: null };
    row.node = h("tr", {},
      h("td", { "data-label": t("colField") }, label(ids.field, "fieldFor"), field),
      h("td", { "data-label": t("colEntityType") }, label(ids.entity, "entityFor"), entity),
      h("td", { "data-label": t("colName") }, label(ids.name, "nameFor"), name, error),
      h("td", { "data-label": t("colAttrType") }, label(ids.type, "attrTypeFor"), type),
      h("td", { "data-label": t("colMulti") }, label(ids.multi, "multiFor"), multi),
      h("td", {}, h("button", { type: "button", onclick: () => { rows.splice(rows.indexOf(row), 1); row.node.remove(); } }, t("removeRow"))));
    rows.push(row);
    body.append(row.node);
    return row;
  };
  (current.entries || []).forEach((entry) => addRow(entry));
  const form = h("form", { novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    feedback.replaceChildren();
    rows.forEach((row) => { row.error.textContent = ""; row.name.removeAttribute("aria-invalid"); });
    const entries = rows.map((row) => ({ crm_field: row.field.value.trim(), entity: row.entity.value, name: row.name.value.trim(),
      type: row.type.value, multivalued: row.multi.checked, ...(row.entry.humanized ? { humanized: row.entry.humanized } : {}) }));
    try {
      const saved = await call("PUT", `/integrations/${enc(id)}/attributes`, { entries });
      feedback.replaceChildren(message("success", t("savedAttributes", { n: (saved.entries || entries).length })));
    } catch (error) {
      const details = error instanceof ApiError && error.status === 400 ? (error.body.details || {}).entries : null;
      if (details && typeof details === "object" && !Array.isArray(details)) {
        for (const [index, problems] of Object.entries(details)) {
          const row = rows[Number(index)];
          if (!row) continue;
          row.error.textContent = Object.entries(problems).map(([k, v]) => `${k}: ${[].concat(v).join(" ")}`).join("; ");
          row.name.setAttribute("aria-invalid", "true");
          row.name.setAttribute("aria-describedby", row.error.id);
        }
      }
      feedback.replaceChildren(message("error", errorText(error, id)));
    }
  } },
  h("div", { class: "table-wrap" }, h("table", { class: "stack" },
    h("thead", {}, h("tr", {}, ["colField", "colEntityType", "colName", "colAttrType", "colMulti", "colActions"].map(
      (key) => h("th", { scope: "col" }, t(key))))), body)),
  h("div", { class: "actions" },
    h("button", { type: "button", onclick: () => addRow().field.focus() }, t("addRow")),
    h("button", { type: "submit", class: "primary" }, t("save"))),
  feedback);
  show(h("h1", {}, t("attributesTitle"), h("span", { class: "subtitle" }, ` · ${id}`)),
    h("p", { class: "muted" }, t("attributesHelp")), form);
}

// --- console links (admin) -----------------------------------------------------------------------------------------

async function renderLinks(id) {
  const data = await call("GET", `/integrations/${enc(id)}/console-links`);
  const feedback = h("div", { "aria-live": "polite", id: "links-feedback" });
  const label = h("input", { id: "link-label", maxlength: "100", autocomplete: "off" });
  const form = h("form", { class: "inline", onsubmit: async (event) => {
    event.preventDefault();
    try {
      const made = await call("POST", `/integrations/${enc(id)}/console-links`, { label: label.value });
      await renderLinks(id);
      const out = h("input", { id: "new-link", readonly: true, value: made.link, class: "wide" });
      document.getElementById("links-feedback").replaceChildren(
        h("label", { for: "new-link" }, t("newLink")), out);
      out.focus();
      out.select();
    } catch (error) {
      feedback.replaceChildren(message("error", errorText(error, id)));
    }
  } }, h("label", { for: "link-label" }, t("linkLabel")), label, h("button", { type: "submit", class: "primary" }, t("createLink")));
  show(h("h1", {}, t("linksTitle"), h("span", { class: "subtitle" }, ` · ${id}`)),
    h("p", { class: "muted" }, t("linksHelp")), form, feedback,
    data.links.length ? h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["linkLabel", "colCreated", "colActions"].map((key) => h("th", { scope: "col" }, t(key))))),
      h("tbody", {}, data.links.map((link) => h("tr", {}, h("th", { scope: "row" }, link.label || link.link_id),
        h("td", {}, formatTime(link.created_at)),
        h("td", {}, h("button", { type: "button", onclick: async () => {
          await call("DELETE", `/integrations/${enc(id)}/console-links/${enc(link.link_id)}`);
          await renderLinks(id);
        } }, t("revoke")))))))) : h("p", {}, t("noLinks")));
}

// --- start ---------------------------------------------------------------------------------------------------------

function start() {
  takeLinkFromFragment();
  setLang(lang());
  document.getElementById("lang").addEventListener("change", (event) => { setLang(event.target.value); render(); });
  document.getElementById("signout").addEventListener("click", () => {
    clearToken();
    history.replaceState(null, "", location.pathname);
    render();
  });
  window.addEventListener("hashchange", () => { takeLinkFromFragment(); render(); });
  document.body.dataset.api = base;
  render();
}

start();
