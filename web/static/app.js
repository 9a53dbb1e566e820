// vmfarm's web UI: small progressive enhancements; every page works without them.
"use strict";

// The submit page: an uploaded file fills the editor; the image picker sets `image = "..."`.
function setUpSubmit() {
  const editor = document.getElementById("manifest");
  if (!editor) return;
  const file = document.getElementById("file");
  if (file) {
    file.addEventListener("change", () => {
      const f = file.files && file.files[0];
      if (!f) return;
      f.text().then((text) => {
        editor.value = text;
        file.value = "";
      });
    });
  }
  const picker = document.getElementById("image-picker");
  if (picker) {
    picker.addEventListener("change", () => {
      const image = picker.value;
      if (!image) return;
      const line = `image = "${image}"`;
      const re = /^(image|images)\s*=.*$/m;
      editor.value = re.test(editor.value) ? editor.value.replace(re, line) : `${line}\n${editor.value}`;
    });
  }
}

// ANSI SGR colours: 30-37/90-97 foreground, 40-47/100-107 background, 1 bold, 0 reset.
function ansiState() {
  return { fg: null, bg: null, bold: false };
}

function applySgr(state, codes) {
  const list = codes === "" ? [0] : codes.split(";").map((c) => parseInt(c, 10) || 0);
  for (const c of list) {
    if (c === 0) Object.assign(state, ansiState());
    else if (c === 1) state.bold = true;
    else if (c === 22) state.bold = false;
    else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) state.fg = c;
    else if (c === 39) state.fg = null;
    else if ((c >= 40 && c <= 47) || (c >= 100 && c <= 107)) state.bg = c;
    else if (c === 49) state.bg = null;
  }
}

function styledSpan(state, text) {
  const span = document.createElement("span");
  span.textContent = text;
  const classes = [];
  if (state.fg !== null) classes.push(`fg${state.fg}`);
  if (state.bg !== null) classes.push(`bg${state.bg}`);
  if (state.bold) classes.push("bold");
  if (classes.length) span.className = classes.join(" ");
  return span;
}

function pad(n, width) {
  return String(n).padStart(width, "0");
}

function clock(ms) {
  const d = new Date(ms);
  return `${pad(d.getUTCHours(), 2)}:${pad(d.getUTCMinutes(), 2)}:${pad(d.getUTCSeconds(), 2)}.${pad(d.getUTCMilliseconds(), 3)}`;
}

// The job page's live log, over Server-Sent Events.
function setUpLog() {
  const log = document.getElementById("log");
  if (!log) return;
  const status = document.getElementById("log-status");
  const follow = document.getElementById("follow");
  const sgr = ansiState();
  let line = null; // The line being written (a chunk may end mid-line).
  let lines = 0;
  let programmatic = false;

  // Auto-scroll stops when the user scrolls up, and comes back when they scroll to the end.
  log.addEventListener("scroll", () => {
    if (programmatic) {
      programmatic = false;
      return;
    }
    follow.checked = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  });
  follow.addEventListener("change", () => {
    if (follow.checked) scrollDown();
  });
  function scrollDown() {
    programmatic = true;
    log.scrollTop = log.scrollHeight;
  }

  function newLine(chunk) {
    line = document.createElement("div");
    line.className = `line ${chunk.stream}`;
    const ts = document.createElement("span");
    ts.className = "ts";
    ts.textContent = clock(chunk.ts_ms);
    ts.title = new Date(chunk.ts_ms).toISOString();
    line.appendChild(ts);
    if (chunk.task) {
      const task = document.createElement("span");
      task.className = "tname";
      task.textContent = chunk.task;
      line.appendChild(task);
    }
    log.appendChild(line);
    lines += 1;
  }

  function write(chunk) {
    const parts = chunk.data.split("\n");
    parts.forEach((part, i) => {
      if (i > 0) line = null;
      if (part === "" && i === parts.length - 1) return;
      if (line === null) newLine(chunk);
      // Split on escape sequences; keep the text between them.
      const re = /\x1b\[([0-9;]*)([A-Za-z])/g;
      let last = 0;
      let m;
      while ((m = re.exec(part)) !== null) {
        if (m.index > last) line.appendChild(styledSpan(sgr, part.slice(last, m.index)));
        if (m[2] === "m") applySgr(sgr, m[1]);
        last = re.lastIndex;
      }
      const rest = part.slice(last).replace(/\r/g, "");
      if (rest) line.appendChild(styledSpan(sgr, rest));
    });
  }

  const source = new EventSource(log.dataset.stream);
  source.addEventListener("open", () => {
    status.textContent = "Live.";
  });
  source.addEventListener("log", (event) => {
    write(JSON.parse(event.data));
    status.textContent = `Live · ${lines} lines.`;
    if (follow.checked) scrollDown();
  });
  source.addEventListener("end", (event) => {
    source.close();
    const end = JSON.parse(event.data);
    status.textContent = `Ended: ${end.state} · ${lines} lines.`;
    // The job ended while the page was open: show its final state, tasks and artifacts.
    if (log.dataset.terminal !== "true") {
      const reload = window.setTimeout(() => window.location.reload(), 300);
      // A navigation the user starts meanwhile (a link, the address bar) goes ahead, not this.
      window.addEventListener("beforeunload", () => window.clearTimeout(reload));
    }
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CONNECTING) status.textContent = "Reconnecting…";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpSubmit();
  setUpLog();
});
