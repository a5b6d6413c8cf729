// mgstream browser demo: webcam -> JPEG frames over /v1/streams, live gestures; file upload -> batch job.
// Plain JS, no build step. Query parameters: ?autostart=1&fps=15&quality=0.75&threshold=0.5&api_key=...
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const $ = (id) => document.getElementById(id);
  const el = {
    connection: $("connection"), lag: $("lag"), video: $("video"), current: $("current"),
    cameraMessage: $("camera-message"), controls: $("controls"), apiKey: $("api-key"), fps: $("fps"),
    quality: $("quality"), start: $("start"), stop: $("stop"), timeline: $("timeline"), events: $("events"),
    sent: $("stat-sent"), skipped: $("stat-skipped"), processed: $("stat-processed"),
    dropped: $("stat-dropped"), gestures: $("stat-gestures"),
    upload: $("upload"), uploadFile: $("upload-file"), uploadButton: $("upload-button"),
    jobProgress: $("job-progress"), jobState: $("job-state"), jobTimeline: $("job-timeline"),
    jobDetections: $("job-detections"),
  };

  const HEADER_BYTES = 16;               // u8 version, u8 0, u16 0, u32 seq, f64 timestamp (little-endian)
  const PROTOCOL_VERSION = 1;
  const MAX_WIDTH = 640;                 // frames are downscaled before encoding
  const MAX_BUFFERED_BYTES = 512 * 1024; // skip frames instead of queueing them behind a slow network
  const TIMELINE_S = 30;
  const NO_RETRY = new Set([1000, 1008, 1009, 4401]);  // normal end, protocol errors, unauthorized
  const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 10000];

  // Everything a test (or a curious user in the console) may want to read.
  const state = (window.mgstreamState = {
    connection: "idle", camera: "pending", streamId: null, ready: null,
    framesSent: 0, framesSkipped: 0, bytesSent: 0, eventsReceived: 0, gestureStarts: 0, gestureEnds: 0,
    statusMessages: 0, lastStatus: null, lastError: null, lastClose: null, reconnects: 0,
    active: {}, recent: [], job: null, jobShown: false,
  });

  let ws = null;
  let mediaStream = null;
  let wantStreaming = false;
  let retry = 0;
  let retryTimer = null;
  let sendTimer = null;
  let encoding = false;
  let seq = 0;
  let sessionOrigin = 0;  // performance.now()/1000 when the current session became ready
  const canvas = document.createElement("canvas");
  const ctx2d = canvas.getContext("2d");

  // ---------- page state ----------

  function setConnection(value, detail) {
    state.connection = value;
    document.body.dataset.connection = value;
    el.connection.dataset.state = value;
    el.connection.textContent = detail ? `${value}: ${detail}` : value;
  }

  function setCamera(value, message) {
    state.camera = value;
    document.body.dataset.camera = value;
    el.cameraMessage.hidden = !message;
    el.cameraMessage.textContent = message || "";
  }

  function renderStats() {
    el.sent.textContent = state.framesSent;
    el.skipped.textContent = state.framesSkipped;
    const s = state.lastStatus;
    el.processed.textContent = s ? s.frames_processed : 0;
    el.dropped.textContent = s ? s.frames_dropped : 0;
    el.gestures.textContent = state.gestureEnds;
    el.lag.textContent = s ? `lag ${Math.round(s.lag_s * 1000)} ms` : "lag –";
    const d = document.body.dataset;
    d.framesSent = state.framesSent;
    d.eventsReceived = state.eventsReceived;
    d.gestureStarts = state.gestureStarts;
    d.gestureEnds = state.gestureEnds;
  }

  function logLine(kind, text, cls) {
    const li = document.createElement("li");
    li.className = cls || kind;
    const k = document.createElement("span");
    k.className = "kind";
    k.textContent = kind;
    li.append(k, document.createTextNode(" " + text));
    el.events.prepend(li);
    while (el.events.children.length > 60) el.events.lastChild.remove();
  }

  function renderCurrent() {
    el.current.replaceChildren(...Object.values(state.active).map((g) => {
      const li = document.createElement("li");
      li.textContent = g.label;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = g.score.toFixed(2);
      li.append(score);
      return li;
    }));
  }

  const clock = (t) => `${Math.floor(t / 60).toString().padStart(2, "0")}:${(t % 60).toFixed(2).padStart(5, "0")}`;

  // ---------- camera ----------

  async function startCamera() {
    if (mediaStream) return true;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      setCamera("unavailable", "This browser offers no camera here. Use https:// or http://localhost.");
      setConnection("camera-unavailable");
      return false;
    }
    try {
      mediaStream = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false,
      });
    } catch (err) {
      const denied = err && (err.name === "NotAllowedError" || err.name === "SecurityError");
      setCamera(denied ? "denied" : "unavailable",
        denied ? "Camera access was refused. Allow it in the browser and press Start again."
               : `No usable camera (${err && err.name ? err.name : err}).`);
      setConnection(denied ? "camera-denied" : "camera-unavailable");
      return false;
    }
    el.video.srcObject = mediaStream;
    mediaStream.getVideoTracks().forEach((t) => t.addEventListener("ended", () => {
      setCamera("ended", "The camera stopped.");
      stopStreaming("camera ended");
    }));
    try { await el.video.play(); } catch (_) { /* autoplay of a muted video is allowed; ignore */ }
    setCamera("granted", "");
    return true;
  }

  function stopCamera() {
    if (mediaStream) mediaStream.getTracks().forEach((t) => t.stop());
    mediaStream = null;
    el.video.srcObject = null;
  }

  // ---------- WebSocket ----------

  function apiKey() { return el.apiKey.value.trim(); }

  function streamUrl() {
    const url = new URL("/v1/streams", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (apiKey()) url.searchParams.set("api_key", apiKey());  // browsers cannot set WebSocket headers
    return url.toString();
  }

  function openSocket() {
    clearTimeout(retryTimer);
    setConnection(retry > 0 ? "reconnecting" : "connecting", retry > 0 ? `attempt ${retry}` : "");
    let socket;
    try {
      socket = new WebSocket(streamUrl());
    } catch (err) {
      state.lastError = String(err);
      scheduleReconnect();
      return;
    }
    ws = socket;
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      const start = { type: "start", input: "jpeg", fps: Number(el.fps.value) };
      const threshold = params.get("threshold");
      if (threshold !== null && threshold !== "") start.score_threshold = Number(threshold);
      if (apiKey()) start.api_key = apiKey();
      socket.send(JSON.stringify(start));
    };
    socket.onmessage = (ev) => {
      if (typeof ev.data !== "string") return;
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      handleMessage(msg);
    };
    socket.onclose = (ev) => {
      if (ws !== socket) return;  // an old socket we already replaced
      ws = null;
      stopSender();
      state.lastClose = { code: ev.code, reason: ev.reason, at: Date.now() };
      closeActiveGestures();
      if (!wantStreaming) { setConnection("closed"); return; }
      if (ev.code === 4401) {
        wantStreaming = false;
        setConnection("unauthorized", ev.reason || "check the API key");
        logLine("error", `unauthorized (${ev.code}) ${ev.reason || ""}`, "error");
        updateButtons();
        return;
      }
      if (NO_RETRY.has(ev.code)) {
        wantStreaming = false;
        setConnection(ev.code === 1000 ? "closed" : "error", ev.reason || `close ${ev.code}`);
        updateButtons();
        return;
      }
      logLine("info", `connection closed (${ev.code}${ev.reason ? ", " + ev.reason : ""}); retrying`, "info");
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    if (!wantStreaming) return;
    const base = BACKOFF_MS[Math.min(retry, BACKOFF_MS.length - 1)];
    const delay = base * (0.8 + 0.4 * Math.random());
    retry += 1;
    setConnection("reconnecting", `in ${(delay / 1000).toFixed(1)} s`);
    retryTimer = setTimeout(openSocket, delay);
  }

  function handleMessage(msg) {
    state.eventsReceived += 1;
    switch (msg.type) {
      case "ready":
        if (retry > 0) state.reconnects += 1;
        retry = 0;
        seq = 0;
        state.ready = msg;
        state.streamId = msg.stream_id;
        sessionOrigin = performance.now() / 1000;
        setConnection("streaming", `${msg.model} ${msg.model_version}`);
        logLine("ready", `stream ${msg.stream_id} · ${msg.model} ${msg.model_version} · ${msg.mode} mode`, "info");
        startSender();
        break;
      case "gesture_start":
        state.gestureStarts += 1;
        state.active[msg.event_id] = msg;
        addToTimeline(msg, true);
        logLine("start", `${clock(msg.start_time)}  ${msg.label} (${msg.score.toFixed(2)})`, "start");
        renderCurrent();
        break;
      case "gesture_end":
        state.gestureEnds += 1;
        delete state.active[msg.event_id];
        addToTimeline(msg, false);
        logLine("end", `${clock(msg.start_time)}–${clock(msg.end_time)}  ${msg.label} (${msg.score.toFixed(2)})`, "end");
        renderCurrent();
        break;
      case "status":
        state.statusMessages += 1;
        state.lastStatus = msg;
        break;
      case "error":
        state.lastError = `${msg.code}: ${msg.message}`;
        logLine("error", state.lastError, "error");
        break;
      case "end":
        logLine("end", `stream ended: ${msg.frames_processed} frames processed, ${msg.events} gestures`, "info");
        break;
      default:
        break;
    }
    renderStats();
  }

  function closeActiveGestures() {
    // A dropped session never sends the pending ends: close the bars where they are.
    const now = performance.now() / 1000;
    for (const g of state.recent) if (g.open) { g.open = false; g.t1 = now; }
    state.active = {};
    renderCurrent();
  }

  // ---------- sending frames ----------

  function startSender() {
    stopSender();
    const tick = () => {
      sendTimer = setTimeout(tick, 1000 / Number(el.fps.value));
      sendFrame();
    };
    tick();
  }

  function stopSender() {
    clearTimeout(sendTimer);
    sendTimer = null;
  }

  function sendFrame() {
    const socket = ws;
    const video = el.video;
    if (!socket || socket.readyState !== WebSocket.OPEN || !state.ready) return;
    if (video.readyState < 2 || !video.videoWidth) return;
    if (encoding || socket.bufferedAmount > MAX_BUFFERED_BYTES) {  // never build a backlog: skip this frame
      state.framesSkipped += 1;
      renderStats();
      return;
    }
    const scale = Math.min(1, MAX_WIDTH / video.videoWidth);
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    ctx2d.drawImage(video, 0, 0, canvas.width, canvas.height);
    const timestamp = Date.now() / 1000;  // capture time, seconds
    encoding = true;
    canvas.toBlob(async (blob) => {
      try {
        if (!blob || socket !== ws || socket.readyState !== WebSocket.OPEN) return;
        const payload = new Uint8Array(await blob.arrayBuffer());
        const message = new Uint8Array(HEADER_BYTES + payload.length);
        const view = new DataView(message.buffer);
        view.setUint8(0, PROTOCOL_VERSION);
        view.setUint8(1, 0);
        view.setUint16(2, 0, true);
        view.setUint32(4, seq >>> 0, true);
        view.setFloat64(8, timestamp, true);
        message.set(payload, HEADER_BYTES);
        socket.send(message.buffer);
        seq += 1;
        state.framesSent += 1;
        state.bytesSent += message.length;
        renderStats();
      } finally {
        encoding = false;
      }
    }, "image/jpeg", Number(el.quality.value));
  }

  // ---------- timeline ----------

  function addToTimeline(msg, open) {
    // Bars live on the page's clock: session origin + the gesture's stream time.
    let bar = state.recent.find((g) => g.key === `${state.streamId}:${msg.event_id}`);
    if (!bar) {
      bar = { key: `${state.streamId}:${msg.event_id}`, label: msg.label, score: msg.score };
      state.recent.push(bar);
      if (state.recent.length > 200) state.recent.shift();
    }
    bar.t0 = sessionOrigin + msg.start_time;
    bar.t1 = sessionOrigin + msg.end_time;
    bar.score = msg.score;
    bar.open = open;
    drawTimeline();
  }

  function drawTimeline() {
    const c = el.timeline;
    const width = c.clientWidth || c.width;
    const height = c.clientHeight || c.height;
    const dpr = window.devicePixelRatio || 1;
    if (c.width !== Math.round(width * dpr)) { c.width = Math.round(width * dpr); c.height = Math.round(height * dpr); }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, width, height);
    const now = performance.now() / 1000;
    const left = 110;
    const x = (t) => left + ((t - (now - TIMELINE_S)) / TIMELINE_S) * (width - left - 8);
    const visible = state.recent.filter((b) => b.open || b.t1 > now - TIMELINE_S);
    const labels = [...new Set(visible.map((b) => b.label))].slice(-8);
    const rowH = Math.max(14, Math.min(26, (height - 20) / Math.max(labels.length, 1)));
    g.font = "12px system-ui, sans-serif";
    g.strokeStyle = "#2a333c";
    g.fillStyle = "#8b98a5";
    for (let s = 0; s <= TIMELINE_S; s += 5) {  // grid every 5 s, labelled as seconds ago
      const gx = x(now - s);
      g.beginPath(); g.moveTo(gx, 0); g.lineTo(gx, height - 14); g.stroke();
      g.fillText(s === 0 ? "now" : `-${s}s`, gx - 12, height - 2);
    }
    if (!labels.length) {
      g.fillText("no gestures yet", left, 20);
      return;
    }
    labels.forEach((label, row) => {
      const y = 4 + row * rowH;
      g.fillStyle = "#e6edf3";
      g.fillText(label.length > 16 ? label.slice(0, 15) + "…" : label, 6, y + rowH * 0.7);
      for (const b of visible) {
        if (b.label !== label) continue;
        const x0 = Math.max(left, x(b.t0));
        const x1 = Math.max(x0 + 3, x(b.open ? Math.max(b.t1, now) : b.t1));
        g.fillStyle = b.open ? `rgba(63,185,80,${0.35 + 0.6 * b.score})` : `rgba(88,166,255,${0.3 + 0.6 * b.score})`;
        g.fillRect(x0, y + 2, x1 - x0, rowH - 4);
      }
    });
  }

  // ---------- start / stop ----------

  function updateButtons() {
    el.start.disabled = wantStreaming;
    el.stop.disabled = !wantStreaming;
  }

  async function startStreaming() {
    if (wantStreaming) return;
    wantStreaming = true;
    updateButtons();
    if (!(await startCamera())) {
      wantStreaming = false;
      updateButtons();
      return;
    }
    retry = 0;
    openSocket();
  }

  function stopStreaming(reason) {
    wantStreaming = false;
    clearTimeout(retryTimer);
    stopSender();
    const socket = ws;
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "end" }));  // the server flushes the last window, then closes 1000
      setConnection("ending");
      setTimeout(() => { if (socket.readyState !== WebSocket.CLOSED) socket.close(1000); }, 5000);
    } else {
      if (socket) socket.close();
      setConnection("closed", reason || "");
    }
    stopCamera();
    updateButtons();
  }

  // ---------- batch upload ----------

  function authHeaders() { return apiKey() ? { "X-API-Key": apiKey() } : {}; }

  function setJob(text, fraction) {
    el.jobState.textContent = text;
    if (fraction !== undefined) el.jobProgress.value = fraction;
  }

  function uploadFile(file) {
    // XMLHttpRequest rather than fetch: it reports upload progress for long videos.
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/v1/detect");
      for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
      xhr.upload.onprogress = (ev) => {
        if (ev.lengthComputable) setJob(`uploading ${Math.round((100 * ev.loaded) / ev.total)} %`, ev.loaded / ev.total);
      };
      xhr.onload = () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (_) { body = { detail: xhr.responseText }; }
        if (xhr.status >= 200 && xhr.status < 300) resolve(body);
        else reject(new Error(`${xhr.status}: ${(body && body.detail) || xhr.statusText}`));
      };
      xhr.onerror = () => reject(new Error("network error during upload"));
      const form = new FormData();
      form.append("file", file, file.name);
      xhr.send(form);
    });
  }

  async function fetchJson(path) {
    const resp = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    if (!resp.ok) throw Object.assign(new Error(`${resp.status} ${resp.statusText}`), { status: resp.status });
    return resp.json();
  }

  async function pollJob(id) {
    let failures = 0;
    for (;;) {
      let job;
      try {
        job = await fetchJson(`/v1/jobs/${encodeURIComponent(id)}`);
        failures = 0;
      } catch (err) {
        if (err.status === 404 || err.status === 401) { setJob(`job lost: ${err.message}`); return; }
        failures += 1;  // server restarting or network down: jobs are durable, keep asking
        setJob(`waiting for the server (${err.message})`);
        await sleep(Math.min(10000, 1000 * 2 ** Math.min(failures, 4)));
        continue;
      }
      state.job = job;
      const p = job.progress || {};
      const eta = p.eta_s != null ? `, about ${Math.ceil(p.eta_s)} s left` : "";
      const frames = p.frames_total ? ` · ${p.frames_done}/${p.frames_total} frames` : "";
      setJob(`${job.state}${p.phase ? " (" + p.phase + ")" : ""}${frames}${eta}`, p.fraction || 0);
      if (job.state === "done") { await showResults(job); return; }
      if (job.state === "failed" || job.state === "cancelled") { setJob(`${job.state}: ${job.error || ""}`); return; }
      await sleep(1000);
    }
  }

  async function showResults(job) {
    setJob(`done · ${job.detections ?? "?"} gestures`, 1);
    const links = job.links || {};
    if (links["result.png"]) {
      // fetch, not <img src>: the request may need the API key header.
      const resp = await fetch(links["result.png"], { headers: authHeaders() });
      if (resp.ok) {
        el.jobTimeline.src = URL.createObjectURL(await resp.blob());
        el.jobTimeline.hidden = false;
      }
    }
    if (links["result.json"]) {
      const result = await fetchJson(links["result.json"]);
      const rows = (result.detections || []).slice(0, 200).map((d) => {
        const tr = document.createElement("tr");
        for (const v of [d.label, num(d.start_s ?? d.start_time), num(d.end_s ?? d.end_time), num(d.score)]) {
          const td = document.createElement("td");
          td.textContent = v;
          tr.append(td);
        }
        return tr;
      });
      el.jobDetections.tBodies[0].replaceChildren(...rows);
      el.jobDetections.hidden = false;
    }
    state.jobShown = true;  // timeline and table are on the page
  }

  const num = (v) => (typeof v === "number" ? v.toFixed(2) : v ?? "");
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ---------- wiring ----------

  el.controls.addEventListener("submit", (ev) => { ev.preventDefault(); startStreaming(); });
  el.stop.addEventListener("click", () => stopStreaming("stopped"));
  el.fps.addEventListener("change", () => { if (sendTimer) startSender(); });
  el.upload.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = el.uploadFile.files[0];
    if (!file) return;
    el.uploadButton.disabled = true;
    el.jobTimeline.hidden = true;
    el.jobDetections.hidden = true;
    state.jobShown = false;
    try {
      const job = await uploadFile(file);
      state.job = job.job || job;
      await pollJob(state.job.id);
    } catch (err) {
      setJob(`upload failed: ${err.message}`, 0);
    } finally {
      el.uploadButton.disabled = false;
    }
  });
  window.addEventListener("offline", () => logLine("info", "network offline", "info"));
  window.addEventListener("online", () => {
    logLine("info", "network back", "info");
    if (wantStreaming && !ws) { retry = Math.max(retry, 1); openSocket(); }
  });

  if (params.has("fps")) el.fps.value = params.get("fps");
  if (![...el.fps.options].some((o) => o.value === el.fps.value)) el.fps.value = "15";
  if (params.has("quality")) {
    const opt = document.createElement("option");
    opt.value = params.get("quality");
    opt.textContent = `q ${opt.value}`;
    el.quality.append(opt);
    el.quality.value = opt.value;
  }
  if (params.has("api_key")) el.apiKey.value = params.get("api_key");
  setInterval(drawTimeline, 200);
  renderStats();
  drawTimeline();
  if (params.get("autostart") === "1") startStreaming();
})();
