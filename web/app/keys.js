// Provider API keys: add, replace, remove. The API shows a masked hint only, never a key.
import { api } from "./api.js";
import { confirmAction, el, showError } from "./ui.js";

const PROVIDERS = {
  anthropic: "Anthropic", openai: "OpenAI", google: "Google Gemini", mistral: "Mistral",
  groq: "Groq", openrouter: "OpenRouter", xai: "xAI", deepseek: "DeepSeek",
};

export class Keys {
  constructor(root) {
    this.root = root;
    this.list = root.querySelector(".key-list");
    this.form = root.querySelector("#add-key");
    this.keys = [];
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.add().catch(showError(this.form));
    });
  }

  async load() {
    this.keys = await api("GET", "/api/user/api-keys");
    this.render();
  }

  clear() {
    this.keys = [];
    this.list.replaceChildren();
  }

  render() {
    const stored = new Set(this.keys.map((key) => key.provider));
    this.list.replaceChildren(...(this.keys.length
      ? this.keys.map((key) => this.row(key))
      : [el("li", { className: "empty" }, "No keys yet.")]));
    const select = this.form.querySelector("select[name=provider]");
    const free = Object.entries(PROVIDERS).filter(([id]) => !stored.has(id));
    select.replaceChildren(...free.map(([id, label]) => el("option", { value: id }, label)));
    this.form.hidden = free.length === 0;
  }

  row(key) {
    const label = PROVIDERS[key.provider] || key.provider;
    const item = el("li", { className: "key", dataset: { provider: key.provider } },
      el("span", { className: "key-name" }, el("strong", {}, label), " ",
        el("code", { dataset: { role: "hint" } }, key.hint)));
    const error = el("p", { className: "error", role: "alert" });
    const replace = el("form", { className: "replace", hidden: true },
      el("label", { htmlFor: `replace-${key.provider}` }, `New ${label} key`),
      el("input", { id: `replace-${key.provider}`, name: "key", type: "password",
        autocomplete: "off", required: true, maxLength: 512, spellcheck: false }),
      el("button", { type: "submit", className: "primary" }, "Save"),
      el("button", { type: "button", dataset: { action: "cancel" } }, "Cancel"));
    const replaceButton = el("button", { type: "button", dataset: { action: "replace" },
      ariaLabel: `Replace the ${label} key` }, "Replace");
    const removeButton = el("button", { type: "button", className: "danger",
      dataset: { action: "remove" }, ariaLabel: `Remove the ${label} key` }, "Remove");
    replaceButton.addEventListener("click", () => {
      replace.hidden = false;
      replace.elements.key.focus();
    });
    replace.querySelector("[data-action=cancel]").addEventListener("click", () => {
      replace.hidden = true;
      replaceButton.focus();
    });
    replace.addEventListener("submit", (event) => {
      event.preventDefault();
      api("PUT", `/api/user/api-keys/${key.provider}`, { key: replace.elements.key.value })
        .then(() => this.load())
        .catch((e) => { error.textContent = e.message; });
    });
    removeButton.addEventListener("click", async () => {
      if (!(await confirmAction(`Remove the ${label} key?`,
        "Machines started from now on will not get it.", "Remove key"))) return;
      api("DELETE", `/api/user/api-keys/${key.provider}`)
        .then(() => this.load())
        .catch((e) => { error.textContent = e.message; });
    });
    item.append(el("span", { className: "actions" }, replaceButton, removeButton), replace, error);
    return item;
  }

  async add() {
    const data = new FormData(this.form);
    await api("POST", "/api/user/api-keys", { provider: data.get("provider"), key: data.get("key") });
    this.form.reset();
    showError(this.form)(null);
    await this.load();
  }
}
