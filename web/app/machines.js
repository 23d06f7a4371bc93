// The machines list, kept live by one event stream (GET /api/instances/events: a snapshot,
// then each change), and the actions on each machine.
import { api, readEvents } from "./api.js";
import { confirmAction, el, showError } from "./ui.js";

// Offered when the API has no GET /api/sizes (the defaults of INSTANCE_SIZES).
const DEFAULT_SIZES = [{ name: "small" }, { name: "medium" }, { name: "large" }];
const LIVE = new Set(["pending", "provisioning", "running", "stopping", "stopped", "starting"]);

export class Machines {
  constructor(root, { onOpen }) {
    this.root = root;
    this.list = root.querySelector(".machine-list");
    this.status = root.querySelector("#feed-status");
    this.onOpen = onOpen;
    this.machines = new Map();
    this.errors = new Map(); // machine id -> the last error shown beside it
    this.warnings = new Map(); // machine id -> its idle warning, until its state changes
    this.controller = null;
    this.form = root.querySelector("#create");
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.create().catch(showError(this.form));
    });
  }

  /** Open the stream (once), and fill the size picker. */
  start() {
    if (this.controller) return;
    this.controller = new AbortController();
    this.follow(this.controller.signal);
    this.loadSizes().catch(() => {});
  }

  stop() {
    this.controller?.abort();
    this.controller = null;
    this.machines.clear();
    this.list.replaceChildren();
  }

  get(id) {
    return this.machines.get(id);
  }

  // The stream, reopened after a drop with a growing pause; every connection starts with
  // a snapshot, so nothing is missed meanwhile. A stream the server ended after a while
  // (it bounds their length) is reopened at once.
  async follow(signal) {
    let pause = 1;
    while (!signal.aborted) {
      const opened = Date.now();
      try {
        await readEvents("/api/instances/events", (name, data) => this.apply(name, data), signal);
        if (Date.now() - opened > 5000) {
          pause = 1;
          continue;
        }
      } catch (error) {
        if (signal.aborted) return;
        if (error.status === 401) return; // signed out: the page shows the sign-in form
      }
      if (signal.aborted) return;
      this.status.textContent = `Live updates interrupted; reconnecting in ${pause} s…`;
      document.body.dataset.feed = "reconnecting";
      await new Promise((resolve) => setTimeout(resolve, pause * 1000));
      pause = Math.min(pause * 2, 15);
    }
  }

  apply(name, data) {
    const body = JSON.parse(data);
    if (name === "snapshot") {
      this.machines = new Map(body.items.map((machine) => [machine.id, machine]));
      this.status.textContent = "";
      document.body.dataset.feed = "live";
    } else if (name === "instance") {
      const before = this.machines.get(body.id);
      if (before?.state !== body.state) {
        this.warnings.delete(body.id);
        this.announce(`${body.name} is ${body.state}.`);
      }
      this.machines.set(body.id, body);
    } else if (name === "idle_warning") {
      const machine = this.machines.get(body.id);
      this.warnings.set(body.id, body.reason);
      if (machine) this.announce(`${machine.name}: ${body.reason}`);
    } else if (name === "removed") {
      const gone = this.machines.get(body.id);
      if (gone) this.announce(`${gone.name} is deleted.`);
      this.machines.delete(body.id);
      this.errors.delete(body.id);
    }
    this.render();
    this.root.dispatchEvent(new CustomEvent("machines", { detail: this.machines }));
  }

  // Changes are said once, briefly, to screen readers (the list itself is not live).
  announce(text) {
    this.root.querySelector("#announce").textContent = text;
  }

  render() {
    const items = [...this.machines.values()].sort((a, b) =>
      b.created_at.localeCompare(a.created_at));
    if (!items.length) {
      this.list.replaceChildren(el("li", { className: "empty" }, "No machines yet."));
      return;
    }
    // Rebuilt whole, with focus put back where it was (the lists are short).
    const focused = document.activeElement?.dataset?.action
      ? [document.activeElement.dataset.action, document.activeElement.dataset.instance]
      : null;
    this.list.replaceChildren(...items.map((machine) => this.row(machine)));
    if (focused) {
      this.list.querySelector(
        `[data-action="${focused[0]}"][data-instance="${focused[1]}"]`)?.focus();
    }
  }

  row(machine) {
    const { id, name, size, state, health } = machine;
    const item = el("li", { className: "machine", dataset: { instance: id, state } });
    const healthText = (up) => (up === true ? "up" : up === false ? "down" : "unknown");
    const desktop = healthText(health.desktop);
    const agent = healthText(health.agent);
    item.append(
      el("div", { className: "machine-name" }, el("strong", {}, name), ` · ${size}`),
      el("div", { className: "machine-state" },
        el("span", { className: `badge ${state}`, dataset: { role: "state" } }, state),
        el("span", { className: "health", dataset: { role: "health", desktop, agent } },
          `desktop ${desktop}, agent ${agent}`)),
    );
    if (machine.state_reason && state === "failed") {
      item.append(el("p", { className: "note" }, machine.state_reason));
    }
    if (this.warnings.has(id)) {
      item.append(el("p", { className: "warning", dataset: { role: "idle-warning" } },
        this.warnings.get(id)));
    }
    const actions = el("div", { className: "actions" });
    const button = (action, label, handler, className = "") => {
      const b = el("button", {
        type: "button", className, dataset: { action, instance: id },
        ariaLabel: `${label} ${name}`,
      }, label);
      b.addEventListener("click", () => handler().catch((error) => this.fail(id, error)));
      actions.append(b);
    };
    if (state === "running") button("open", "Open desktop", async () => this.onOpen(machine), "primary");
    if (state === "running") button("stop", "Stop", () => this.act(machine, "stop"));
    if (state === "stopped" || state === "failed") {
      button("start", "Start", () => this.act(machine, "start"));
    }
    if (LIVE.has(state) || state === "failed") {
      button("delete", "Delete", () => this.remove(machine), "danger");
    }
    item.append(actions, el("p", { className: "error", role: "alert" }, this.errors.get(id) || ""));
    return item;
  }

  fail(id, error) {
    this.errors.set(id, error.message);
    const line = this.list.querySelector(`li[data-instance="${id}"] .error`);
    if (line) line.textContent = error.message;
  }

  // An answer of the API, unless the stream has already shown a later version: the
  // stream may overtake the answer (a create's "pending" after its "provisioning", a
  // deleted machine's removal).
  keep(machine, { created = false } = {}) {
    const known = this.machines.get(machine.id);
    if (known ? Date.parse(known.updated_at) > Date.parse(machine.updated_at) : !created) return;
    this.machines.set(machine.id, machine);
    this.render();
  }

  async act(machine, action) {
    this.errors.delete(machine.id);
    this.keep(await api("POST", `/api/instances/${machine.id}/${action}`));
  }

  async remove(machine) {
    const sure = await confirmAction(
      `Delete ${machine.name}?`,
      "The machine and its disk are gone for good.",
      "Delete machine",
    );
    if (!sure) return;
    this.errors.delete(machine.id);
    this.keep(await api("DELETE", `/api/instances/${machine.id}`));
  }

  async create() {
    const data = new FormData(this.form);
    const submit = this.form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const machine = await api("POST", "/api/instances", {
        name: String(data.get("name")).trim(),
        size: data.get("size"),
      });
      this.keep(machine, { created: true });
      this.form.reset();
      showError(this.form)(null);
    } finally {
      submit.disabled = false;
    }
  }

  async loadSizes() {
    let sizes = DEFAULT_SIZES;
    try {
      const offered = await api("GET", "/api/sizes");
      sizes = offered.items?.length ? offered.items : DEFAULT_SIZES;
    } catch {
      // an API without the sizes endpoint: the default offer
    }
    const select = this.form.querySelector("select[name=size]");
    select.replaceChildren(...sizes.map((size) => {
      const details = [size.cpus && `${size.cpus} CPU`,
        size.memory_mib && `${+(size.memory_mib / 1024).toFixed(1)} GiB`,
        size.instance_type].filter(Boolean);
      return el("option", { value: size.name, defaultSelected: Boolean(size.default) },
        details.length ? `${size.name} (${details.join(", ")})` : size.name);
    }));
  }
}
