// The CloudBot console: sign in, provider keys, machines with their live state, and each
// machine's desktop with its agent beside it. Views follow the address's fragment:
// `#/` the machines, `#/desktop/<id>` one machine's desktop (so a reload stays there).
import * as auth from "./api.js";
import { api } from "./api.js";
import { Agent } from "./agent.js";
import { Desktop } from "./desktop.js";
import { Keys } from "./keys.js";
import { Machines } from "./machines.js";
import { showError } from "./ui.js";

const $ = (selector) => document.querySelector(selector);
const machines = new Machines($("#machines"), {
  onOpen: (machine) => { location.hash = `#/desktop/${machine.id}`; },
});
const keys = new Keys($("#keys"));
const desktop = new Desktop($("#desktop"));
const agent = new Agent($("#agent"));

function show(view) {
  for (const id of ["loading", "auth", "home", "desktop"]) $(`#${id}`).hidden = id !== view;
  $(".account").hidden = view === "auth" || view === "loading";
  document.body.dataset.view = view;
  if (view !== "desktop") {
    desktop.close();
    agent.close();
  }
}

function focusHeading(selector) {
  // Where a screen reader and the keyboard start on each new view.
  $(selector).focus({ preventScroll: false });
}

function signedOut(message = "") {
  machines.stop();
  keys.clear();
  $("#who").textContent = "";
  $("#signed-out-note").textContent = message;
  if (location.hash.startsWith("#/desktop/")) history.replaceState(null, "", "#/");
  show("auth");
  focusHeading("#auth-title");
}

auth.whenSessionEnds(signedOut);

async function signedIn() {
  const me = await api("GET", "/api/auth/me");
  $("#who").textContent = me.email;
  $("#signed-out-note").textContent = "";
  machines.start();
  keys.load().catch(showError($("#add-key")));
  await route();
}

async function route() {
  if (!auth.signedIn()) return;
  const match = location.hash.match(/^#\/desktop\/([0-9a-f-]{36})$/);
  if (!match) {
    show("home");
    focusHeading("#machines-title");
    return;
  }
  const machine = machines.get(match[1]) ?? (await api("GET", `/api/instances/${match[1]}`)
    .catch(() => null));
  if (!machine) {
    location.hash = "#/";
    return;
  }
  show("desktop");
  $("#desktop-title").textContent = machine.name;
  document.title = `${machine.name} · CloudBot`;
  desktop.open(machine);
  agent.open(machine);
  focusHeading("#desktop-title");
}

window.addEventListener("hashchange", () => {
  document.title = "CloudBot";
  route().catch(() => {});
});

$("#machines").addEventListener("machines", (event) => {
  const open = location.hash.match(/^#\/desktop\/(.+)$/)?.[1];
  if (!open) return;
  const machine = event.detail.get(open);
  desktop.update(machine);
  agent.update(machine);
});

$("#to-signup").addEventListener("click", () => {
  $("#signup").hidden = false;
  $("#signin").hidden = true;
  $("#auth-title").textContent = "Create an account";
  $("#to-signup").parentElement.hidden = true;
  $("#signup-email").focus();
});

$("#signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  try {
    await auth.signIn(data.get("email"), data.get("password"));
    form.reset();
    showError(form)(null);
    await signedIn();
  } catch (error) {
    showError(form)(error);
  }
});

$("#signup").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  try {
    await auth.signUp(data.get("email"), data.get("password"));
    form.reset();
    showError(form)(null);
    await signedIn();
  } catch (error) {
    showError(form)(error);
  }
});

$("#signout").addEventListener("click", async () => {
  await auth.signOut().catch(() => {});
  signedOut("You are signed out.");
});

$("#signout-all").addEventListener("click", async () => {
  try {
    await auth.signOutEverywhere();
    signedOut("You are signed out on every device.");
  } catch (error) {
    signedOut(error.message);
  }
});

// A reload or a new tab: the refresh cookie, if any, signs the person in again.
if (await auth.refresh()) {
  await signedIn().catch(() => signedOut(""));
} else {
  signedOut("");
}
