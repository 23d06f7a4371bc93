// The CloudBot desktop page: log in, pick a running machine, watch and drive its desktop.
// The tokens live in this page's memory only; the desktop connection uses a single-use
// ticket from the API, so no long-lived credential is ever put in a URL. An expired
// access token is traded for a new pair with the refresh token, once, when the API
// answers 401.
import RFB from "./novnc/core/rfb.js";

const $ = (selector) => document.querySelector(selector);
let tokens = null; // { access_token, refresh_token } while logged in
let refreshing = null; // the refresh under way, shared by every request that needs it
let rfb = null;

async function request(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: {
      ...(body ? { "Content-Type": "application/json" } : {}),
      ...(tokens ? { Authorization: `Bearer ${tokens.access_token}` } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = response.status === 204 ? null : await response.json();
  return { response, data };
}

function refresh(used) {
  refreshing ??= request("POST", "/api/auth/refresh", { refresh_token: used.refresh_token })
    .then(({ response, data }) => {
      // A refresh token works once: a second try with it would end the login session.
      tokens = response.ok && tokens === used ? data : null;
      return tokens !== null;
    })
    .catch(() => false)
    .finally(() => {
      refreshing = null;
    });
  return refreshing;
}

async function api(method, path, body) {
  const used = tokens;
  let { response, data } = await request(method, path, body);
  if (response.status === 401 && used && !path.startsWith("/api/auth/")) {
    if (!(await refresh(used))) {
      loggedOut("Your session has ended: log in again.");
      throw new Error("Your session has ended: log in again.");
    }
    ({ response, data } = await request(method, path, body));
  }
  if (!response.ok) {
    // Every error is a problem document (RFC 9457): say its detail, or its title.
    throw new Error(data?.detail || data?.title || `HTTP ${response.status}`);
  }
  return data;
}

function show(id) {
  for (const section of ["#login", "#instances", "#desktop"]) {
    $(section).hidden = section !== id;
  }
  $("#logout").hidden = id === "#login";
}

async function listInstances() {
  show("#instances");
  const list = $("#instances ul");
  list.replaceChildren();
  const { items } = await api("GET", "/api/instances");
  if (!items.length) {
    list.append(Object.assign(document.createElement("li"), { textContent: "No machines yet." }));
  }
  for (const instance of items) {
    const item = document.createElement("li");
    item.textContent = `${instance.name} (${instance.state}) `;
    if (instance.state === "running") {
      const open = Object.assign(document.createElement("button"), {
        textContent: "Open desktop",
      });
      open.dataset.instance = instance.id;
      open.addEventListener("click", () => openDesktop(instance).catch(fail("#instances")));
      item.append(open);
    }
    list.append(item);
  }
}

async function openDesktop(instance) {
  const { url } = await api("POST", `/api/instances/${instance.id}/tickets`, { channel: "vnc" });
  show("#desktop");
  const status = $("#desktop .status");
  status.textContent = `Connecting to ${instance.name}...`;
  rfb = new RFB($("#screen"), url, { wsProtocols: ["binary"] });
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => {
    status.textContent = `${instance.name}: connected`;
    document.body.dataset.desktop = "connected";
  });
  rfb.addEventListener("disconnect", (event) => {
    status.textContent = `${instance.name}: ${event.detail.clean ? "closed" : "connection lost"}`;
    document.body.dataset.desktop = "closed";
  });
}

function closeDesktop() {
  if (rfb) {
    rfb.disconnect();
    rfb = null;
  }
}

function fail(section) {
  return (error) => {
    $(`${section} .error`).textContent = error.message;
  };
}

$("#login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    tokens = await api("POST", "/api/auth/login", {
      email: form.get("email"),
      password: form.get("password"),
    });
    event.target.reset();
    $("#login .error").textContent = "";
    $("#who").textContent = (await api("GET", "/api/auth/me")).email;
    await listInstances();
  } catch (error) {
    fail("#login")(error);
  }
});

$("#back").addEventListener("click", () => {
  closeDesktop();
  listInstances().catch(fail("#instances"));
});

function loggedOut(message) {
  closeDesktop();
  tokens = null;
  $("#who").textContent = "";
  $("#login .error").textContent = message;
  show("#login");
}

$("#logout").addEventListener("click", async () => {
  await api("POST", "/api/auth/logout").catch(() => {});
  loggedOut("");
});
