// Stepbox web page: drag and drop onto file inputs, and runs with live output.
// Without this script the page still works: the form posts and the result page follows.
"use strict";

function describe(input, chosen) {
  const names = Array.from(input.files || []).map((f) => f.name + " (" + f.size + " bytes)");
  chosen.textContent = names.join(", ");
}

document.querySelectorAll(".drop").forEach((zone) => {
  const input = zone.querySelector("input[type=file]");
  const chosen = zone.querySelector(".chosen");
  if (!input) return;
  input.addEventListener("change", () => describe(input, chosen));
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (!e.dataTransfer || !e.dataTransfer.files.length) return;
    if (input.multiple) {
      input.files = e.dataTransfer.files;
    } else {
      const one = new DataTransfer();
      one.items.add(e.dataTransfer.files[0]);
      input.files = one.files;
    }
    describe(input, chosen);
  });
});

const form = document.getElementById("run-form");
if (form) {
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const button = form.querySelector("button[type=submit]");
    const live = document.getElementById("live");
    const stdout = document.getElementById("live-stdout");
    const stderr = document.getElementById("live-stderr");
    const elapsed = document.getElementById("elapsed");
    const state = document.getElementById("live-state");
    const error = document.getElementById("run-error");
    error.hidden = true;
    stdout.textContent = "";
    stderr.textContent = "";
    stderr.hidden = true;
    live.hidden = false;
    button.disabled = true;
    state.textContent = "Uploading…";
    const started = performance.now();
    const timer = setInterval(() => {
      elapsed.textContent = ((performance.now() - started) / 1000).toFixed(1) + " s";
    }, 100);
    const fail = (message) => {
      clearInterval(timer);
      button.disabled = false;
      state.textContent = "Not run";
      // Nothing ran: keep the live panel only if the step had written something.
      live.hidden = !stdout.textContent && !stderr.textContent;
      error.textContent = message;
      error.hidden = false;
    };
    let response;
    try {
      response = await fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { Accept: "application/x-ndjson" },
        credentials: "same-origin",
      });
    } catch (err) {
      fail("The upload failed: " + err.message);
      return;
    }
    if (!response.ok) {
      let message = "The server answered " + response.status;
      try {
        message = (await response.json()).error || message;
      } catch (_) {}
      fail(message);
      return;
    }
    state.textContent = "Running…";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buffered += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        if (!line) continue;
        const event = JSON.parse(line);
        if (event.stdout !== undefined) stdout.textContent += event.stdout;
        if (event.stderr !== undefined) {
          stderr.hidden = false;
          stderr.textContent += event.stderr;
        }
        if (event.node !== undefined) {
          const node = document.querySelector('[data-node="' + CSS.escape(event.node.id) + '"]');
          if (node) {
            node.classList.remove("running", "ok", "bad");
            if (event.node.class) node.classList.add(event.node.class);
            node.querySelector(".state").textContent = event.node.state;
          }
        }
        if (event.error !== undefined) {
          fail(event.error);
          return;
        }
        if (event.done !== undefined) {
          clearInterval(timer);
          state.textContent = "Finished: " + event.done.status_text;
          window.location.assign(event.done.page_url);
          return;
        }
      }
      if (done) break;
    }
    fail("The connection ended before the run finished.");
  });
}
