// Small helpers shared by the console's views.

/** An element with properties (dataset and aria* included) and children. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("aria") || key === "role") {
      node.setAttribute(key === "role" ? "role" : `aria-${key.slice(4).toLowerCase()}`, value);
    } else node[key] = value;
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

/** A handler that shows an error (or clears it, given null) in the form's alert line. */
export function showError(form) {
  return (error) => {
    const line = form.querySelector(".error");
    line.textContent = error ? error.message : "";
  };
}

/** Ask before something that cannot be undone; resolves true when confirmed. */
export function confirmAction(title, text, action) {
  const dialog = document.getElementById("confirm");
  dialog.querySelector("#confirm-title").textContent = title;
  dialog.querySelector("#confirm-text").textContent = text;
  dialog.querySelector("#confirm-ok").textContent = action;
  dialog.returnValue = "";
  const opener = document.activeElement;
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      opener?.focus?.();
      resolve(dialog.returnValue === "ok");
    }, { once: true });
  });
}

/** "14:03:07" for a message's time, with its full date in the datetime attribute. */
export function timeElement(date) {
  return el("time", { dateTime: date.toISOString() },
    date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }));
}
