// The console's client of the public API.
//
// The access token lives in this module's memory only. The refresh token is an HttpOnly
// cookie the page cannot read; POST /api/auth/web/refresh trades it for a new access token
// (on load, and when the API answers 401), with the X-CloudBot-CSRF header the API asks
// of every request that spends the cookie.

const CSRF = { "X-CloudBot-CSRF": "1" };
let access = null;
let refreshing = null;
let onEnded = () => {};

export class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super(describe(status, problem, retryAfter));
    this.status = status;
    this.code = problem?.code;
    this.state = problem?.state;
    this.retryAfter = retryAfter;
  }
}

function describe(status, problem, retryAfter) {
  if (status === 429) {
    const wait = Number(retryAfter);
    return wait > 0
      ? `Too many requests: try again in ${wait} second${wait === 1 ? "" : "s"}.`
      : "Too many requests: try again in a moment.";
  }
  if (problem?.errors?.length) {
    const { loc, msg } = problem.errors[0];
    return `${loc.filter((part) => part !== "body").join(".")}: ${msg}`;
  }
  return problem?.detail || problem?.title || `The server answered ${status}.`;
}

/** Called with a message when the login session ends under the page. */
export function whenSessionEnds(callback) {
  onEnded = callback;
}

async function send(method, path, body, headers = {}) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: {
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
      ...(access ? { Authorization: `Bearer ${access}` } : {}),
      ...headers,
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  return { response, data };
}

function raise({ response, data }) {
  throw new ApiError(response.status, data, response.headers.get("Retry-After"));
}

async function refreshNow() {
  const { response, data } = await send("POST", "/api/auth/web/refresh", undefined, CSRF);
  access = response.ok ? data.access_token : null;
  return access !== null;
}

/** A new access token from the cookie. One refresh at a time, in this tab and across the
 * browser's tabs (Web Locks): the cookie rotates on each use, and using one twice would
 * end the login session. */
export function refresh() {
  refreshing ??= (navigator.locks
    ? navigator.locks.request("cloudbot-refresh", refreshNow)
    : refreshNow()
  )
    .catch(() => false)
    .finally(() => {
      refreshing = null;
    });
  return refreshing;
}

async function authorised(attempt) {
  const used = access;
  let result = await attempt();
  if (result.response.status === 401 && used) {
    if (access === used && !(await refresh())) {
      onEnded("Your session has ended: sign in again.");
      raise(result);
    }
    result = await attempt();
  }
  return result;
}

/** Call the API as the signed-in person; throws ApiError with the problem's detail. */
export async function api(method, path, body) {
  const result = await authorised(() => send(method, path, body));
  if (!result.response.ok) raise(result);
  return result.data;
}

export const signedIn = () => access !== null;

export async function signIn(email, password) {
  const result = await send("POST", "/api/auth/web/login", { email, password }, CSRF);
  if (!result.response.ok) raise(result);
  access = result.data.access_token;
}

export async function signUp(email, password) {
  const result = await send("POST", "/api/auth/signup", { email, password });
  if (!result.response.ok) raise(result);
  await signIn(email, password);
}

export async function signOut() {
  access = null;
  await send("POST", "/api/auth/web/logout", undefined, CSRF);
}

export async function signOutEverywhere() {
  await api("POST", "/api/auth/logout-all");
  access = null;
}

/**
 * Read a Server-Sent Events stream of the API (EventSource cannot send the access token).
 * Calls onEvent(name, data) for each event; resolves when the server ends the stream,
 * rejects on a network error or an error answer. `signal` aborts it.
 */
export async function readEvents(path, onEvent, signal) {
  const { response } = await authorised(async () => {
    const r = await fetch(path, {
      headers: { Accept: "text/event-stream", Authorization: `Bearer ${access}` },
      signal,
    });
    return { response: r, data: null };
  });
  if (!response.ok) raise({ response, data: await response.json().catch(() => null) });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (let end = buffer.search(/\r?\n/); end >= 0; end = buffer.search(/\r?\n/)) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + (buffer[end] === "\r" ? 2 : 1));
      if (line === "") {
        if (event.data !== undefined) onEvent(event.event || "message", event.data);
        event = {};
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        event[field] = field === "data" && event.data !== undefined ? `${event.data}\n${text}` : text;
      }
    }
  }
}
