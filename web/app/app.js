// The CloudBot desktop page: log in, pick a running machine, watch and drive its desktop.
// The access token lives in this page's memory only; the desktop connection uses a
// single-use ticket from the API, so no long-lived credential is ever put in a URL.
import RFB from "./novnc/core/rfb.js";

const $ = (selector) => document.querySelector(selector);
let accessToken = null;
let rfb = null;

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: {
      ...(body ? { "Content-Type": "application/json" } : {}),
      ...(accessToken ? { Authorization: `Bearer ${accessToken}` } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = response.status === 204 ? null : await response.json();
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
    const tokens = await api("POST", "/api/auth/login", {
      email: form.get("email"),
      password: form.get("password"),
    });
    accessToken = tokens.access_token;
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

$("#logout").addEventListener("click", async () => {
  closeDesktop();
  await api("POST", "/api/auth/logout").catch(() => {});
  accessToken = null;
  $("#who").textContent = "";
  show("#login");
});
