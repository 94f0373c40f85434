// The console's only way to the service: the JSON admin API, with the bearer token kept in
// sessionStorage (gone when the tab closes; never in a URL after the first load).
const TOKEN_KEY = "mcb.token";

// The API lives where the page does: `<base>/console` → `<base>/integrations/…`.
export const base = location.pathname.replace(/\/console\/?$/, "");

export function token() { return sessionStorage.getItem(TOKEN_KEY); }
export function setToken(value) { sessionStorage.setItem(TOKEN_KEY, value); }
export function clearToken() { sessionStorage.removeItem(TOKEN_KEY); }

// A console link's token names its integration: `cl1.<integration id>.<link id>.<secret>`.
export function linkIntegration(value = token()) {
  const parts = (value || "").split(".");
  return parts.length === 4 && parts[0] === "cl1" ? parts[1] : null;
}

// A link in the fragment (`#link=<token>`, never sent to a server) moves into sessionStorage, and
// the URL loses it before anything else runs. Returns the integration it opens, or null.
// Any `#link=…` leaves the URL, even one a messenger or tracker changed (`&utm_…` appended, escaped, a
// trailing space): a token kept in the address bar would stay in history, bookmarks and screenshares.
export function takeLinkFromFragment() {
  if (!location.hash.startsWith("#link=")) return null;
  let value;
  try { value = decodeURIComponent(location.hash.slice(6).split("&")[0]).trim(); } catch { value = ""; }
  const integration = /^[A-Za-z0-9._-]+$/.test(value) ? linkIntegration(value) : null;
  if (integration) setToken(value);
  history.replaceState(null, "", location.pathname + location.search + (integration ? `#/i/${integration}/mapping` : ""));
  return integration;
}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${token() || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(base + path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    });
  } catch (error) {
    throw new ApiError(0, { error: "network", message: String(error) });
  }
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const enc = encodeURIComponent;
