// Chatterbox playground. Plain JavaScript, no build step, no library: everything comes from this server.
//
// What it reads from the server (by relative URLs, so it also works under a path prefix):
//   openapi.json          the models (every POST /v2/{slug} with a JSON body) and each one's parameters:
//                         type, range, default, description. A parameter added to the API appears by itself.
//   ready                 the model name and whether a worker runs (no key needed)
//   v1/account            the key's credits (404: the server runs without keys)
//   v1/audio/voices       the voice library, when the server has one (404: the choice is hidden)
// How it gets audio: `getAudio()` below. With "Stream" ticked (offered when POST /v1/{slug} takes `stream`), it
// asks /v1 for `"stream": true` as wav (pcm when chosen), reads the body as it arrives and plays each piece with the
// Web Audio API while the rest is generated; the whole clip then becomes a WAV for the player and the history.
// The API key stays in this browser (sessionStorage, or localStorage when "remember" is ticked) and is sent only
// to this server, as x-api-key.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "chatterbox-playground.api-key";
  const SYNC_MAX_CHARS = 300;          // "auto" route: /v1 (one request) up to this many characters, else /v2
  const CLIP_MAX_S = 30, CLIP_MIN_S = 0.5;
  const HANDLED_ELSEWHERE = new Set(["text", "reference_audio", "voice", "stream"]);   // not in the parameter grid
  const ACCEPTED_CLIP = { wav: "audio/wav", flac: "audio/flac", ogg: "audio/ogg", mp3: "audio/mpeg" };
  const EXT_BY_TYPE = { "audio/mpeg": "mp3", "audio/wav": "wav", "audio/x-wav": "wav", "audio/flac": "flac",
                        "audio/ogg": "ogg", "audio/opus": "opus", "audio/aac": "aac", "audio/pcm": "pcm" };
  const PCM_RATE = 24000;              // output_format "pcm": raw 16-bit little-endian mono at this rate
  const STREAM_FORMATS = new Set(["wav", "pcm"]);   // what the page can play as it arrives (16-bit PCM)
  const START_LATENCY_S = 0.12;        // streamed audio starts this long after its first bytes (and after a gap)

  const state = {
    models: [],            // [{slug, summary, fields: [...]}]
    fields: [],            // the selected model's parameter fields
    hasText: true,         // the selected model speaks text (voice conversion does not)
    example: "",           // the example text put in the box (replaced by the next model's until edited)
    inputs: new Map(),     // field name -> {get(), set(value)}
    clip: null,            // {dataUri, blob, label, seconds}
    library: null,         // null: no library on this server; else [{id, name}]
    busy: null,            // AbortController of the generation in flight
    requestId: null,       // of the generation in flight
    current: null,         // the clip shown in the result card
    history: [],
    audioCtx: null,        // the Web Audio context streamed audio plays through (made on the first click)
    live: null,            // the stream being played: see playStream()
  };

  // --- small helpers ---------------------------------------------------------------------------------------
  function setStatus(name) { document.body.dataset.state = name; }
  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
    if (message) { setStatus("error"); box.scrollIntoView({ block: "nearest", behavior: "smooth" }); }
  }
  function fmtSeconds(s) { return s == null || !isFinite(s) ? "–" : s < 10 ? s.toFixed(2) + " s" : s.toFixed(1) + " s"; }
  function fmtValue(v) {
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Math.round(v * 1000) / 1000);
    if (v && typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === "text") node.textContent = v; else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) node.append(c);
    return node;
  }
  function titleOf(name) { return name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase()); }
  const sleep = (ms, signal) => new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); reject(signal.reason); }, { once: true });
  });

  // --- the key: kept in this browser only -------------------------------------------------------------------
  function apiKey() { return $("api-key").value.trim(); }
  function loadKey() {
    const remembered = localStorage.getItem(KEY_STORAGE);
    $("key-remember").checked = remembered != null;
    $("api-key").value = remembered ?? sessionStorage.getItem(KEY_STORAGE) ?? "";
  }
  function storeKey() {
    const key = apiKey();
    localStorage.removeItem(KEY_STORAGE);
    sessionStorage.removeItem(KEY_STORAGE);
    if (key) ($("key-remember").checked ? localStorage : sessionStorage).setItem(KEY_STORAGE, key);
  }

  // --- HTTP: this server only, errors in words --------------------------------------------------------------
  class Problem extends Error {
    constructor(message, status = 0, body = null) { super(message); this.status = status; this.body = body; }
  }

  async function call(path, { method = "GET", body, json, signal, auth = true, headers = {} } = {}) {
    const h = { ...headers };
    if (auth && apiKey()) h["x-api-key"] = apiKey();
    if (json !== undefined) { h["content-type"] = "application/json"; body = json; }
    let response;
    try {
      response = await fetch(path, { method, body, headers: h, signal, cache: "no-store", credentials: "omit" });
    } catch (e) {
      if (signal?.aborted) throw signal.reason;
      throw new Problem("Could not reach the server (network error). Is it still running, and is this page " +
                        "open at the server's own address?");
    }
    const remaining = response.headers.get("x-remaining-credits");
    if (remaining != null) showCredits(Number(remaining));
    return response;
  }

  async function errorBody(response) {
    try { return await response.json(); } catch { return {}; }
  }

  // The server's `{"error"}` message, with what the status means for the person at the page.
  function explain(status, body, headers) {
    const msg = ((body && (typeof body.error === "string" ? body.error : body.error?.message)) || "").replace(/\.\s*$/, "");
    const said = msg ? `: ${msg}` : "";
    switch (status) {
      case 400: return `The server refused the request${said}.`;
      case 401: return `The server needs a valid API key${said}. Paste a key in "API key" (an operator makes one ` +
                       "with `chatterbox-serverless keys create`).";
      case 403: return `This key may not do that${said}.`;
      case 404: return `Not found${said}.`;
      case 406: return `Not enough credits on this key${said}.`;
      case 408: return "The request took too long to arrive at the server; try again.";
      case 409: return `Conflict${said}.`;
      case 413: return `The request is too large${said}. Use a shorter reference clip.`;
      case 415: return `The server did not accept the request's format${said}.`;
      case 422: return `The job failed${said}.`;
      case 429: {
        const retry = headers?.get("retry-after");
        const when = /retry|try again/i.test(msg) ? "" : retry ? ` Try again in ${retry} s.` : " Try again shortly.";
        return `Too many requests${said}.${when}`;
      }
      case 502: case 503: return `The server cannot synthesize right now${said}.`;
      case 504: return `The server took too long${said}.`;
      default: return `The server answered HTTP ${status}${said}.`;
    }
  }

  async function problemOf(response) {
    const body = await errorBody(response);
    return new Problem(explain(response.status, body, response.headers), response.status, body);
  }

  // JSON with integers kept exact (a seed can exceed 2^53): BigInt values are written as plain digits.
  function toJson(value) {
    return JSON.stringify(value, (_, v) => typeof v === "bigint" ? `\u0000int:${v}` : v)
      .replace(/"\\u0000int:(-?\d+)"/g, "$1");
  }

  // --- models and parameters from the OpenAPI schema --------------------------------------------------------
  function resolve(spec, schema) {
    let s = schema || {};
    for (let i = 0; s.$ref && i < 10; i++) {
      s = s.$ref.replace(/^#\//, "").split("/").reduce((node, part) => node?.[part.replace(/~1/g, "/").replace(/~0/g, "~")], spec) || {};
    }
    if (s.allOf) s = Object.assign({}, ...s.allOf.map((x) => resolve(spec, x)), { ...s, allOf: undefined });
    return s;
  }

  function fieldOf(spec, name, raw, required) {
    let s = resolve(spec, raw);
    let nullable = false;
    const options = s.anyOf || s.oneOf;
    if (options) {
      const kinds = options.map((x) => resolve(spec, x));
      nullable = kinds.some((x) => x.type === "null");
      const real = kinds.filter((x) => x.type !== "null");
      if (real.length === 1) s = { ...real[0], ...s, anyOf: undefined, oneOf: undefined };
    }
    const enumValues = s.enum || (s.const !== undefined ? [s.const] : null);
    const type = enumValues ? "enum" : Array.isArray(s.type) ? s.type.find((t) => t !== "null") : s.type;
    return {
      name, type: type || "string", title: s.title || titleOf(name), description: s.description || "",
      min: s.minimum ?? (s.exclusiveMinimum != null ? s.exclusiveMinimum : undefined),
      max: s.maximum ?? (s.exclusiveMaximum != null ? s.exclusiveMaximum : undefined),
      default: s.default, enum: enumValues, required, nullable: nullable || (s.default === null),
      examples: s.examples,
    };
  }

  async function loadModels() {
    const response = await call("openapi.json", { auth: false });
    if (!response.ok) throw await problemOf(response);
    const spec = await response.json();
    const models = [];
    for (const [path, item] of Object.entries(spec.paths || {})) {
      const m = /^\/v2\/([^/{}]+)$/.exec(path);
      const body = item?.post?.requestBody?.content?.["application/json"]?.schema;
      if (!m || !body) continue;
      const schema = resolve(spec, body);
      const required = new Set(schema.required || []);
      const fields = Object.entries(schema.properties || {}).map(([n, s]) => fieldOf(spec, n, s, required.has(n)));
      const v1 = spec.paths[`/v1/${m[1]}`]?.post;
      const v1Body = resolve(spec, v1?.requestBody?.content?.["application/json"]?.schema);
      models.push({ slug: m[1], summary: item.post.summary || "", fields, v1: !!v1,
                    stream: !!v1Body.properties?.stream });
    }
    if (!models.length) throw new Problem("This server lists no model in its /openapi.json.");
    return models;
  }

  function renderModels() {
    const select = $("model");
    select.replaceChildren(...state.models.map((m) => el("option", { value: m.slug, text: m.slug })));
    select.disabled = state.models.length < 2;
    selectModel(select.value);
  }

  function selectModel(slug) {
    const model = state.models.find((m) => m.slug === slug) || state.models[0];
    state.fields = model.fields;
    $("stream-choice").hidden = !model.stream;
    const text = model.fields.find((f) => f.name === "text");
    state.hasText = !!text;                         // voice conversion has none: its source_audio is a parameter
    $("text").closest("section").hidden = !text;
    if (text && (!$("text").value || $("text").value === state.example) && text.examples?.length) {
      $("text").value = state.example = text.examples[0];     // each model's example, until the text is edited
    }
    updateCount();
    renderParams();
  }

  function stepOf(f) {
    if (f.type === "integer") return "1";
    const span = (f.max ?? 1) - (f.min ?? 0);
    return span > 0 && span <= 10 ? String(span / 200) : "any";
  }

  // One control per parameter: a slider and a number for bounded numbers, a number for the rest (a seed gets a
  // dice), a menu for enums, a box for booleans, a text box otherwise. Empty optional fields are left out.
  function renderParams() {
    const grid = $("params");
    grid.replaceChildren();
    state.inputs.clear();
    for (const f of state.fields.filter((x) => !HANDLED_ELSEWHERE.has(x.name))) {
      const id = `param-${f.name}`;
      const controls = el("div", { class: "controls" });
      let get, set;
      if (f.type === "number" || f.type === "integer") {
        const bounded = f.min != null && f.max != null && f.max - f.min <= 1e6;
        const number = el("input", { id, type: "number", name: f.name, step: stepOf(f), inputmode: f.type === "integer" ? "numeric" : "decimal",
                                      min: f.min, max: bounded ? f.max : null, class: bounded ? null : "wide" });
        if (bounded) {
          const slider = el("input", { type: "range", min: f.min, max: f.max, step: stepOf(f) === "any" ? (f.max - f.min) / 100 : stepOf(f),
                                       "aria-label": f.title });
          slider.addEventListener("input", () => { number.value = slider.value; });
          number.addEventListener("input", () => { if (number.value !== "") slider.value = number.value; });
          controls.append(slider);
          set = (v) => { number.value = v ?? ""; slider.value = v ?? f.min; };
        } else {
          set = (v) => { number.value = v ?? ""; };
        }
        controls.append(number);
        if (f.type === "integer" && !bounded) {
          const dice = el("button", { type: "button", class: "secondary", title: "A random seed", text: "Random" });
          dice.addEventListener("click", () => {
            const v = Math.floor(Math.random() * 2 ** 31);
            number.value = String(f.max != null ? Math.min(v, f.max) : v);
          });
          controls.append(dice);
        }
        get = () => number.value.trim();
      } else if (f.type === "enum") {
        const select = el("select", { id, name: f.name });
        if (f.nullable || !f.required && f.default === undefined) select.append(el("option", { value: "", text: "(server default)" }));
        for (const v of f.enum) select.append(el("option", { value: JSON.stringify(v), text: String(v) }));
        controls.append(select);
        get = () => select.value;
        set = (v) => { select.value = v === undefined || v === null ? "" : JSON.stringify(v); };
      } else if (f.type === "boolean") {
        const box = el("input", { id, type: "checkbox", name: f.name });
        controls.append(box);
        get = () => box.checked;
        set = (v) => { box.checked = !!v; };
      } else {
        const input = el("input", { id, type: "text", name: f.name, class: "wide" });
        controls.append(input);
        get = () => input.value;
        set = (v) => { input.value = v ?? ""; };
      }
      const range = f.min != null && f.max != null && f.max - f.min <= 1e6 ? `${fmtValue(f.min)} to ${fmtValue(f.max)}` :
        f.min != null ? `from ${fmtValue(f.min)}` : "";
      const hint = [f.description, range, f.default !== undefined && f.default !== null ? `default ${fmtValue(f.default)}` : ""]
        .filter(Boolean).join(" · ");
      grid.append(el("div", { class: "param" }, el("label", { for: id, text: f.title }), controls,
                     el("span", { class: "hint", text: hint })));
      set(f.default);
      state.inputs.set(f.name, { get, set, field: f });
    }
  }

  function resetParams() {
    for (const { set, field } of state.inputs.values()) set(field.default);
  }

  // The request body from the form; throws a Problem naming the first wrong parameter.
  function collectBody() {
    const text = $("text").value;
    if (state.hasText && !text.trim()) throw new Problem("Type or paste some text to speak first.");
    const body = state.hasText ? { text } : {};
    for (const [name, { get, field: f }] of state.inputs) {
      const raw = get();
      if (raw === "" || raw === undefined) {
        if (f.required) throw new Problem(`${f.title} is required.`);
        continue;
      }
      if (f.type === "integer") {
        if (!/^-?\d+$/.test(raw)) throw new Problem(`${f.title} must be a whole number.`);
        const v = BigInt(raw);
        if ((f.min != null && v < BigInt(Math.ceil(f.min))) ||
            (f.max != null && f.max < 2 ** 53 && v > BigInt(Math.floor(f.max))) || v > 2n ** 63n - 1n) {
          throw new Problem(`${f.title} must be between ${fmtValue(f.min)} and ${f.max < 2 ** 53 ? fmtValue(f.max) : "2^63-1"}.`);
        }
        body[name] = v;
      } else if (f.type === "number") {
        const v = Number(raw);
        if (!isFinite(v)) throw new Problem(`${f.title} must be a number.`);
        if ((f.min != null && v < f.min) || (f.max != null && v > f.max)) {
          throw new Problem(`${f.title} must be between ${fmtValue(f.min)} and ${fmtValue(f.max)} (got ${raw}).`);
        }
        body[name] = v;
      } else if (f.type === "enum") {
        body[name] = JSON.parse(raw);
      } else {
        body[name] = raw;
      }
    }
    return body;
  }

  // --- voices: built-in, library, or a clip (uploaded or recorded) ------------------------------------------
  function voiceChoice() { return document.querySelector("input[name=voice]:checked").value; }

  function onVoiceChoice() {
    const choice = voiceChoice();
    $("clip-panel").hidden = choice !== "clip";
    $("library-voice").disabled = choice !== "library";
  }

  // The voice library of another part of this server (GET /v1/audio/voices): listed when that route answers 200,
  // hidden when it is absent (404). Accepts a list, {data: [...]} or {voices: [...]} of {id, name}.
  async function loadLibrary() {
    let items = null;
    try {
      const response = await call("v1/audio/voices");
      if (response.ok) {
        const body = await response.json();
        const list = Array.isArray(body) ? body : body.data || body.voices || [];
        items = list.map((v) => typeof v === "string" ? { id: v, name: v } : {
          id: v.id ?? v.voice_id ?? v.name,
          name: (v.name ?? v.id) + (v.audio_sample?.seconds ? ` (${Number(v.audio_sample.seconds).toFixed(1)} s)` : ""),
        }).filter((v) => v.id != null);
      }
    } catch { /* no library reachable: hidden */ }
    state.library = items;
    const choice = $("voice-library-choice");
    choice.hidden = items === null;
    $("save-voice").hidden = items === null || !state.clip;
    const select = $("library-voice");
    const previous = select.value;
    select.replaceChildren(...(items || []).map((v) => el("option", { value: v.id, text: v.name })));
    if (items?.some((v) => v.id === previous)) select.value = previous;
    if (!items?.length) select.append(el("option", { value: "", text: "(no voices yet)" }));
    if (items === null && voiceChoice() === "library") {
      document.querySelector("input[name=voice][value=builtin]").checked = true;
      onVoiceChoice();
    }
  }

  async function saveToLibrary() {
    if (!state.clip) return;
    const name = $("save-voice-name").value.trim() || state.clip.label.replace(/\.[a-z0-9]+$/i, "");
    const form = new FormData();
    form.append("name", name);
    form.append("audio_sample", state.clip.blob, state.clip.fileName);
    showError("");
    const response = await call("v1/audio/voices", { method: "POST", body: form });
    if (!response.ok) throw await problemOf(response);
    const voice = await response.json().catch(() => ({}));
    $("save-voice-name").value = "";
    await loadLibrary();
    if (voice.id != null) $("library-voice").value = voice.id;
    document.querySelector("input[name=voice][value=library]").checked = true;
    onVoiceChoice();
  }

  function sniff(bytes) {
    const ascii = (a, b) => String.fromCharCode(...bytes.slice(a, b));
    if (bytes.length >= 12 && ["RIFF", "RF64"].includes(ascii(0, 4)) && ascii(8, 12) === "WAVE") return "wav";
    if (ascii(0, 4) === "fLaC") return "flac";
    if (ascii(0, 4) === "OggS") return "ogg";
    if (ascii(0, 3) === "ID3" || (bytes[0] === 0xff && (bytes[1] & 0xe0) === 0xe0)) return "mp3";
    return null;
  }

  async function decode(arrayBuffer, sampleRate = 24000) {
    // OfflineAudioContext decodes without a user gesture and resamples to its own rate.
    const ctx = new OfflineAudioContext(1, 1, sampleRate);
    return ctx.decodeAudioData(arrayBuffer.slice(0));
  }

  // 16-bit PCM mono WAV of (the first maxSeconds of) a decoded buffer.
  function encodeWav(buffer, maxSeconds = CLIP_MAX_S) {
    const rate = buffer.sampleRate;
    const n = Math.min(buffer.length, Math.floor(maxSeconds * rate));
    const channels = Array.from({ length: buffer.numberOfChannels }, (_, i) => buffer.getChannelData(i));
    const out = new DataView(new ArrayBuffer(44 + 2 * n));
    const text = (at, s) => { for (let i = 0; i < s.length; i++) out.setUint8(at + i, s.charCodeAt(i)); };
    text(0, "RIFF"); out.setUint32(4, 36 + 2 * n, true); text(8, "WAVE"); text(12, "fmt ");
    out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
    out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true);
    out.setUint16(34, 16, true); text(36, "data"); out.setUint32(40, 2 * n, true);
    for (let i = 0; i < n; i++) {
      let v = 0;
      for (const c of channels) v += c[i];
      v = Math.max(-1, Math.min(1, v / channels.length));
      out.setInt16(44 + 2 * i, v < 0 ? v * 0x8000 : v * 0x7fff, true);
    }
    return new Blob([out.buffer], { type: "audio/wav" });
  }

  // Raw pcm (16-bit little-endian mono) made playable: the same samples behind a WAV header.
  function pcmToWav(blob, rate = PCM_RATE) {
    const header = new DataView(new ArrayBuffer(44));
    const text = (at, t) => { for (let i = 0; i < t.length; i++) header.setUint8(at + i, t.charCodeAt(i)); };
    const n = blob.size - (blob.size % 2);
    text(0, "RIFF"); header.setUint32(4, 36 + n, true); text(8, "WAVE"); text(12, "fmt ");
    header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
    header.setUint32(24, rate, true); header.setUint32(28, rate * 2, true); header.setUint16(32, 2, true);
    header.setUint16(34, 16, true); text(36, "data"); header.setUint32(40, n, true);
    return new Blob([header.buffer, blob.slice(0, n)], { type: "audio/wav" });
  }

  function dataUri(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Problem("Could not read the clip."));
      reader.readAsDataURL(blob);
    });
  }

  // A clip the API accepts (wav, mp3, flac or ogg, 0.5 to 30 s) from any audio the browser can decode: an
  // accepted file is sent as it is; anything else (webm, m4a, a recording) is converted to WAV here.
  async function useClip(blob, label) {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    const format = sniff(bytes.subarray(0, 12));
    let buffer = null;
    try { buffer = await decode(bytes.buffer); } catch { /* the server may still read it: it decides */ }
    if (!format && !buffer) throw new Problem(`"${label}" is not audio this browser or the server can read ` +
                                              "(the API takes wav, mp3, flac or ogg).");
    let send = blob, note = "";
    if (!format || (buffer && buffer.duration > CLIP_MAX_S)) {
      send = encodeWav(buffer);
      note = buffer.duration > CLIP_MAX_S ? ` (the first ${CLIP_MAX_S} s, as WAV)` : " (converted to WAV)";
    } else if (blob.type !== ACCEPTED_CLIP[format]) {
      send = new Blob([bytes], { type: ACCEPTED_CLIP[format] });
    }
    if (buffer && buffer.duration < CLIP_MIN_S) {
      throw new Problem(`The clip is too short (${buffer.duration.toFixed(2)} s); the API needs at least ${CLIP_MIN_S} s of speech.`);
    }
    const ext = EXT_BY_TYPE[send.type] || "wav";
    state.clip = { blob: send, dataUri: await dataUri(send), label, seconds: buffer?.duration ?? null,
                   fileName: label.replace(/\.[a-z0-9]+$/i, "") + "." + ext };
    $("clip-info").textContent = `Voice: ${label}${note}` + (buffer ? `, ${buffer.duration.toFixed(1)} s` : "") + ".";
    const audio = $("clip-audio");
    if (audio.dataset.url) URL.revokeObjectURL(audio.dataset.url);
    audio.dataset.url = URL.createObjectURL(send);
    audio.src = audio.dataset.url;
    audio.hidden = false;
    $("save-voice").hidden = state.library === null;
  }

  async function onClipFile() {
    const file = $("clip-file").files[0];
    if (!file) return;
    showError("");
    try { await useClip(file, file.name); } catch (e) { state.clip = null; showError(e.message); }
  }

  const recorder = { media: null, chunks: [], timer: null, started: 0 };

  async function toggleRecording() {
    showError("");
    if (recorder.media) { recorder.media.stop(); return; }
    if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") {
      showError("This browser cannot record here. Recording needs a secure page: open the playground over https " +
                "or at localhost, or upload a clip instead.");
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: false, noiseSuppression: false } });
    } catch (e) {
      showError(e.name === "NotAllowedError" ? "The browser did not allow the microphone: allow it for this page, " +
                "or upload a clip instead." : `No microphone could be opened (${e.message || e.name}).`);
      return;
    }
    const media = new MediaRecorder(stream);
    recorder.media = media;
    recorder.chunks = [];
    recorder.started = performance.now();
    media.ondataavailable = (e) => { if (e.data.size) recorder.chunks.push(e.data); };
    media.onstop = async () => {
      clearInterval(recorder.timer);
      stream.getTracks().forEach((t) => t.stop());
      recorder.media = null;
      $("record").textContent = "● Record";
      $("record").classList.remove("recording");
      $("record-status").textContent = "";
      const blob = new Blob(recorder.chunks, { type: media.mimeType || "audio/webm" });
      try { await useClip(blob, "recording.wav"); } catch (e) { state.clip = null; showError(e.message); }
    };
    media.start(250);
    $("record").textContent = "■ Stop";
    $("record").classList.add("recording");
    recorder.timer = setInterval(() => {
      const s = (performance.now() - recorder.started) / 1000;
      $("record-status").textContent = `recording… ${s.toFixed(1)} s`;
      if (s >= CLIP_MAX_S) media.stop();
    }, 100);
  }

  // --- getting the audio -------------------------------------------------------------------------------------
  // job: {slug, body, route: "v1" | "v2", stream, signal}; hooks.onStatus(text), hooks.onRequestId(id),
  // hooks.onLive(live) (a stream started playing). Resolves to {blob, requestId, metrics, firstAudioAt, doneAt,
  // route, streamed} (times from performance.now()). With job.stream, body has "stream": true and a wav or pcm
  // output_format: the audio plays while it arrives (playStream).
  async function getAudio(job, hooks) {
    const { slug, body, signal } = job;
    let requestId;
    if (job.route === "v1") {
      const how = job.stream ? "streamed" : "sync";
      hooks.onStatus(`synthesizing (${how} /v1)…`);
      const response = await call(`v1/${slug}`, { method: "POST", json: toJson(body), signal });
      requestId = response.headers.get("x-request-id");
      if (response.ok) {
        hooks.onRequestId(requestId);
        const audio = job.stream ? await playStream(response, body.output_format, requestId, hooks, signal)
          : await readAudio(response, signal);
        const metrics = await fetchMetrics(requestId, signal);
        return { ...audio, requestId, metrics, route: `${how} /v1/${slug}` };
      }
      const problem = await problemOf(response);
      if (response.status !== 504 || !problem.body?.request_id) throw problem;
      requestId = problem.body.request_id;          // the sync wait ran out: the job goes on, follow it
    } else {
      hooks.onStatus("queueing…");
      const response = await call(`v2/${slug}`, { method: "POST", json: toJson(body), signal });
      if (!response.ok) throw await problemOf(response);
      requestId = (await response.json()).request_id;
    }
    hooks.onRequestId(requestId);
    const result = await pollUntilDone(requestId, hooks, signal);
    const response = await call(sameOrigin(result.output), { auth: false, signal });
    if (!response.ok) throw await problemOf(response);
    const audio = await readAudio(response, signal);
    return { ...audio, requestId, metrics: result.metrics || {}, route: `queued /v2/${slug}` };
  }

  // The Web Audio context streamed audio plays through. Made (or resumed) from the Generate click, a user
  // gesture, so that the browser lets it start.
  function audioContext() {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return null;
    try {
      state.audioCtx ??= new Ctx({ latencyHint: "interactive" });
      if (state.audioCtx.state === "suspended") state.audioCtx.resume().catch(() => {});
    } catch { return null; }
    return state.audioCtx;
  }

  // Where the samples start in a wav stream's first bytes: {rate, offset}; null: more bytes needed.
  function wavHead(bytes) {
    if (bytes.length < 12) return null;
    const ascii = (a, b) => String.fromCharCode(...bytes.subarray(a, b));
    if (!["RIFF", "RF64"].includes(ascii(0, 4)) || ascii(8, 12) !== "WAVE") {
      throw new Problem("The server's audio stream is not WAV as asked.");
    }
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let rate = null;
    for (let at = 12; at + 8 <= bytes.length;) {
      const id = ascii(at, at + 4), size = view.getUint32(at + 4, true);
      if (id === "data") {
        if (rate == null) throw new Problem("The server's WAV stream has no format chunk before its data.");
        return { rate, offset: at + 8 };
      }
      if (at + 8 + size > bytes.length) return null;
      if (id === "fmt ") {
        const format = view.getUint16(at + 8, true), channels = view.getUint16(at + 10, true);
        const bits = view.getUint16(at + 22, true);
        if (format !== 1 || channels !== 1 || bits !== 16) {
          throw new Problem(`The server's WAV stream is not 16-bit mono PCM (format ${format}, ${channels} ` +
                            `channels, ${bits} bits): it cannot be played as it streams.`);
        }
        rate = view.getUint32(at + 12, true);
      }
      at += 8 + size + (size % 2);
    }
    if (bytes.length > 4096) throw new Problem("The server's WAV stream has no data chunk.");
    return null;
  }

  function concatBytes(a, b) {
    const out = new Uint8Array(a.length + b.length);
    out.set(a); out.set(b, a.length);
    return out;
  }

  // A streamed body played as it arrives: every piece read is turned into float samples and scheduled right
  // after the previous one on the Web Audio clock (START_LATENCY_S after the first; again after a gap, when the
  // network fell behind), the waveform grows with it, and the whole clip comes back as a Blob: a WAV (sizes
  // filled in) or, for pcm, the raw bytes as they came. A body that ends early (the server cuts it when the job
  // fails after its first byte) is reported in words.
  async function playStream(response, format, requestId, hooks, signal) {
    const ctx = audioContext();
    const live = {
      ctx, rate: format === "pcm" ? PCM_RATE : null, head: format === "pcm" ? null : new Uint8Array(0),
      odd: null, pcm: [], raw: [], length: 0, samples: [], segments: [], next: 0, gaps: 0, pieces: 0,
      sources: new Set(), firstAudioAt: null, firstPlayAt: null, doneAt: null, peaks: null,
    };
    stopLive();
    state.live = live;
    hooks.onLive(live);
    requestAnimationFrame(followLive);
    const reader = response.body.getReader();
    signal?.addEventListener("abort", () => { reader.cancel().catch(() => {}); stopLive(); }, { once: true });
    for (;;) {
      let read;
      try {
        read = await reader.read();
      } catch (e) {
        if (signal?.aborted) throw signal.reason;
        live.doneAt = performance.now();
        throw await cutShort(live, requestId, signal);
      }
      if (read.done) break;
      let bytes = read.value;
      if (!bytes.length) continue;
      live.firstAudioAt ??= performance.now();
      live.raw.push(bytes);
      if (live.head) {                               // wav: the header first, then its samples' rate is known
        const head = concatBytes(live.head, bytes);
        const found = wavHead(head);
        if (!found) { live.head = head; continue; }
        live.rate = found.rate;
        live.head = null;
        bytes = head.subarray(found.offset);
      }
      if (live.odd != null) { bytes = concatBytes(Uint8Array.of(live.odd), bytes); live.odd = null; }
      if (bytes.length % 2) { live.odd = bytes[bytes.length - 1]; bytes = bytes.subarray(0, bytes.length - 1); }
      if (!bytes.length) continue;
      const pcm = bytes.slice();                     // its own copy, 2-byte aligned
      live.pcm.push(pcm);
      const ints = new Int16Array(pcm.buffer);
      const floats = new Float32Array(ints.length);
      for (let i = 0; i < ints.length; i++) floats[i] = ints[i] / 32768;
      schedule(live, floats);
      hooks.onLive(live);
    }
    live.doneAt = performance.now();
    if (!live.length) throw new Problem("The server's audio stream ended without audio.");
    const blob = format === "pcm" ? new Blob(live.raw, { type: "audio/pcm" }) : wavOf(live.pcm, live.rate);
    return { blob, firstAudioAt: live.firstAudioAt, doneAt: live.doneAt, streamed: live };
  }

  function schedule(live, floats) {
    const at = live.length;
    live.samples.push(floats);
    live.length += floats.length;
    live.pieces += 1;
    live.peaks = null;
    const ctx = live.ctx;
    if (!ctx) return;
    const buffer = ctx.createBuffer(1, floats.length, live.rate);
    buffer.copyToChannel(floats, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const now = ctx.currentTime;
    if (live.next < now + 0.01) {                  // the first piece, or the stream fell behind: start anew
      if (live.segments.length) live.gaps += 1;
      live.next = now + START_LATENCY_S;
    }
    source.start(live.next);
    live.firstPlayAt ??= performance.now() + (live.next - now) * 1000;
    live.segments.push({ when: live.next, from: at, count: floats.length });
    live.next += buffer.duration;
    live.sources.add(source);
    source.onended = () => live.sources.delete(source);
  }

  // How many of the stream's samples have been played so far.
  function livePlayed(live) {
    if (!live?.ctx) return 0;
    const t = live.ctx.currentTime;
    let played = 0;
    for (const s of live.segments) {
      if (t <= s.when) break;
      played = s.from + Math.min(s.count, Math.round((t - s.when) * live.rate));
    }
    return played;
  }

  function livePlaying(live) { return !!live?.ctx && live.sources.size > 0 && live.ctx.currentTime < live.next; }

  // Silence the stream being played (Stop, a new generation, or the player started).
  function stopLive() {
    const live = state.live;
    if (!live) return;
    for (const source of live.sources) { try { source.stop(); } catch { /* not started */ } }
    live.sources.clear();
  }

  // 16-bit mono WAV of the pieces of a stream.
  function wavOf(parts, rate) {
    const n = parts.reduce((sum, p) => sum + p.length, 0);
    const header = new DataView(new ArrayBuffer(44));
    const text = (at, t) => { for (let i = 0; i < t.length; i++) header.setUint8(at + i, t.charCodeAt(i)); };
    text(0, "RIFF"); header.setUint32(4, 36 + n, true); text(8, "WAVE"); text(12, "fmt ");
    header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
    header.setUint32(24, rate, true); header.setUint32(28, rate * 2, true); header.setUint16(32, 2, true);
    header.setUint16(34, 16, true); text(36, "data"); header.setUint32(40, n, true);
    return new Blob([header.buffer, ...parts], { type: "audio/wav" });
  }

  // The stream ended before the audio was complete: say so, with the job's own error when it has one.
  async function cutShort(live, requestId, signal) {
    const got = live.rate ? `after ${fmtSeconds(live.length / live.rate)} of audio` : "before any audio";
    let why = "the connection was lost";
    if (requestId) {
      try {
        const response = await call(`v2/requests/${encodeURIComponent(requestId)}/status`, { signal });
        const body = await errorBody(response);
        const error = typeof body.error === "string" ? body.error : body.error?.message;
        if (body.status === "FAILED") why = `the job failed${error ? ": " + error.replace(/\.\s*$/, "") : ""}`;
        else if (body.status === "QUEUED" || body.status === "PROCESSING") {
          why = "the request was interrupted at the server and is being generated again (generate again to hear it)";
        }
      } catch { /* the connection is gone: the first reason stands */ }
    }
    return new Problem(`The audio stream stopped early, ${got}: ${why}. What arrived is not kept.`);
  }

  // The response body as a Blob, noting when its first bytes arrived (the time to first audio).
  async function readAudio(response, signal) {
    const type = (response.headers.get("content-type") || "application/octet-stream").split(";")[0];
    const reader = response.body.getReader();
    const chunks = [];
    let firstAudioAt = null;
    for (;;) {
      if (signal?.aborted) throw signal.reason;
      const { done, value } = await reader.read();
      if (done) break;
      if (value.length && firstAudioAt === null) firstAudioAt = performance.now();
      chunks.push(value);
    }
    if (!chunks.length) throw new Problem("The server sent an empty audio file.");
    return { blob: new Blob(chunks, { type }), firstAudioAt, doneAt: performance.now() };
  }

  async function pollUntilDone(requestId, hooks, signal) {
    const started = performance.now();
    let wait = 100;
    for (;;) {
      const response = await call(`v2/requests/${encodeURIComponent(requestId)}/status`, { signal });
      const body = await errorBody(response);
      if (!response.ok) throw new Problem(explain(response.status, body, response.headers), response.status, body);
      const elapsed = ((performance.now() - started) / 1000).toFixed(1);
      if (body.status === "COMPLETED") break;
      const place = body.queue_position != null ? `, position ${body.queue_position}` : "";
      hooks.onStatus(`${(body.status || "waiting").toLowerCase()}${place}… ${elapsed} s`);
      await sleep(wait, signal);
      wait = Math.min(1000, wait * 1.4);
    }
    hooks.onStatus("fetching the audio…");
    const response = await call(`v2/requests/${encodeURIComponent(requestId)}`, { signal });
    const body = await errorBody(response);
    if (!response.ok) throw new Problem(explain(response.status, body, response.headers), response.status, body);
    if (!body.output) throw new Problem("The job completed but the server gave no audio URL.");
    return body;
  }

  async function fetchMetrics(requestId, signal) {
    if (!requestId) return {};
    try {
      const response = await call(`v2/requests/${encodeURIComponent(requestId)}/status`, { signal });
      return response.ok ? (await response.json()).metrics || {} : {};
    } catch { return {}; }
  }

  // The signed `output` URL is absolute; behind a proxy without --public-url its host may not be the page's.
  // The page may only fetch from its own origin (CSP), so the same path is asked of this origin then.
  function sameOrigin(url) {
    const u = new URL(url, location.href);
    return u.origin === location.origin ? u.href : location.origin + u.pathname + u.search;
  }

  // --- generate ---------------------------------------------------------------------------------------------
  async function generate() {
    showError("");
    let body;
    try { body = collectBody(); } catch (e) { showError(e.message); return; }
    const slug = $("model").value;
    const choice = voiceChoice();
    let voiceLabel = "built-in voice";
    if (choice === "clip") {
      if (!state.clip) { showError("Choose a reference clip first: upload a file or record one."); return; }
      body.reference_audio = state.clip.dataUri;
      voiceLabel = state.clip.label;
    } else if (choice === "library") {
      const id = $("library-voice").value;
      if (!id) { showError("The voice library is empty: save a clip to it first, or pick another voice."); return; }
      body.voice = id;
      voiceLabel = $("library-voice").selectedOptions[0]?.textContent || id;
    }
    const model = state.models.find((m) => m.slug === slug);
    let route = $("route").value;
    // streamed: always /v1 (the sync limit only bounds the wait for the first piece), in a format that plays as
    // it arrives; the queued route stays queued
    const stream = $("stream").checked && !!model?.stream && !!model?.v1 && route !== "v2";
    if (stream) {
      route = "v1";
      body.stream = true;
      if (!STREAM_FORMATS.has(body.output_format)) body.output_format = "wav";
      audioContext();                                // from the click: the browser lets it start
    }
    if (route === "auto") route = (body.text ?? "").length <= SYNC_MAX_CHARS && model?.v1 ? "v1" : "v2";
    if (route === "v1" && !model?.v1) route = "v2";

    const abort = new AbortController();
    state.busy = abort;
    state.requestId = null;
    setStatus("busy");
    $("generate").disabled = true;
    $("stop").hidden = false;
    const started = performance.now();
    const hooks = { onStatus: (t) => { $("progress").textContent = t; },
                    onRequestId: (id) => { state.requestId = id; },
                    onLive: (live) => showLive(live, started, `streamed /v1/${slug}`, voiceLabel) };
    try {
      const audio = await getAudio({ slug, body, route, stream, signal: abort.signal }, hooks);
      const wall = (audio.doneAt - started) / 1000;
      const format = body.output_format ?? EXT_BY_TYPE[audio.blob.type] ?? "bin";
      const playable = format === "pcm" || audio.blob.type === "audio/pcm" ? pcmToWav(audio.blob) : audio.blob;
      const clip = {
        n: state.history.length + 1, url: URL.createObjectURL(audio.blob), blob: audio.blob, format,
        playUrl: playable === audio.blob ? null : URL.createObjectURL(playable),
        requestId: audio.requestId, metrics: audio.metrics, route: audio.route, model: slug, voice: voiceLabel,
        text: body.text ?? "(voice conversion)", seed: body.seed != null ? String(body.seed) : null,
        firstAudio: audio.firstAudioAt != null ? (audio.firstAudioAt - started) / 1000 : null, wall,
        at: new Date(), live: audio.streamed || null,
      };
      clip.buffer = await decode(await playable.arrayBuffer(), 24000).catch(() => null);
      clip.seconds = clip.buffer?.duration ?? audio.metrics?.audio_seconds ?? null;
      clip.rtf = clip.seconds != null && wall > 0 ? clip.seconds / wall : null;
      state.history.unshift(clip);
      show(clip, !clip.live);                         // a streamed clip has played (or still plays) already
      renderHistory();
      $("progress").textContent = `done in ${fmtSeconds(wall)}`;
      setStatus("done");
    } catch (e) {
      if (abort.signal.aborted) {
        $("progress").textContent = "stopped";
        setStatus("idle");
      } else {
        $("progress").textContent = "";
        showError(e instanceof Problem ? e.message : `Something went wrong in the page: ${e.message || e}`);
      }
    } finally {
      state.busy = null;
      $("generate").disabled = false;
      $("stop").hidden = true;
    }
  }

  // Stop waiting; where the server can cancel (POST /v2/requests/{id}/cancel), the job is cancelled too.
  async function stop() {
    const id = state.requestId;
    state.busy?.abort(new DOMException("stopped", "AbortError"));
    stopLive();
    if (!id) return;
    try {
      const response = await call(`v2/requests/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      $("progress").textContent = response.ok ? "stopped: the job was cancelled" :
        response.status === 404 || response.status === 405 ? "stopped waiting (the job goes on at the server)" :
        `stopped waiting: ${explain(response.status, await errorBody(response), response.headers)}`;
    } catch { /* network error: nothing more to say */ }
  }

  // --- showing a clip: player, waveform, figures ------------------------------------------------------------
  // While a stream plays: its figures so far and its growing waveform (the player is emptied meanwhile). The
  // result card's data-stream-* attributes say what was played (pieces, seconds, gaps, the context's state).
  function showLive(live, started, route, voice) {
    const result = $("result"), player = $("player");
    if (state.current) {
      state.current = null;
      player.pause();
      player.removeAttribute("src");
      player.load();
    }
    result.hidden = false;
    const seconds = live.rate ? live.length / live.rate : 0;
    Object.assign(result.dataset, {
      streamPieces: String(live.pieces), streamSeconds: seconds.toFixed(3), streamGaps: String(live.gaps),
      streamFirstPlay: live.firstPlayAt != null ? ((live.firstPlayAt - started) / 1000).toFixed(3) : "",
      streamContext: live.ctx ? live.ctx.state : "none",
    });
    const stats = [["Time to first audio", live.firstAudioAt != null ? fmtSeconds((live.firstAudioAt - started) / 1000) : "waiting…"],
                   ["Audio received", fmtSeconds(seconds)],
                   ["Playing", live.ctx ? (live.pieces ? `as it streams (${live.pieces} piece${live.pieces === 1 ? "" : "s"})` : "–")
                     : "not here (no Web Audio): at the end"],
                   ["Voice", voice], ["Route", route], ["Request id", state.requestId || "–"]];
    $("stats").replaceChildren(...stats.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
    $("metrics").replaceChildren(el("div", {}, el("dt", { text: "(when done)" }), el("dd", { text: "" })));
    if (live.firstAudioAt != null) $("progress").textContent = `streaming… ${fmtSeconds(seconds)} of audio`;
    drawWaveform();
  }

  function followLive() {
    drawWaveform();
    const live = state.live;
    if (live && (live.doneAt == null || livePlaying(live))) requestAnimationFrame(followLive);
  }

  function show(clip, autoplay) {
    state.current = clip;
    $("result").hidden = false;
    const player = $("player");
    player.src = clip.playUrl || clip.url;
    if (autoplay) player.play().catch(() => { /* autoplay may be blocked: the controls are there */ });
    const stats = [["Time to first audio", fmtSeconds(clip.firstAudio)], ["Total time", fmtSeconds(clip.wall)],
                   ["Audio length", fmtSeconds(clip.seconds)],
                   ["Real-time factor", clip.rtf != null ? `${clip.rtf.toFixed(2)}× real time` : "–"],
                   ["Voice", clip.voice], ["Route", clip.route], ["Request id", clip.requestId || "–"]];
    $("stats").replaceChildren(...stats.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
    const metrics = Object.entries(clip.metrics || {});
    $("metrics").replaceChildren(...(metrics.length ? metrics : [["(none)", ""]]).map(([k, v]) =>
      el("div", {}, el("dt", { text: k }), el("dd", { text: fmtValue(v) }))));
    drawWaveform();
  }

  // Lowest and highest sample per column; `span` samples fill the width (a growing stream: more than it has).
  function peaksOf(pieces, span, columns) {
    const peaks = new Float32Array(columns * 2);
    const per = Math.max(1, span / columns);
    let i = 0;
    for (const data of pieces) {
      for (let j = 0; j < data.length; j++, i++) {
        const c = Math.min(columns - 1, Math.floor(i / per)), v = data[j];
        if (v < peaks[2 * c]) peaks[2 * c] = v; else if (v > peaks[2 * c + 1]) peaks[2 * c + 1] = v;
      }
    }
    return peaks;
  }

  function drawWaveform() {
    const canvas = $("waveform");
    const clip = state.current;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.floor(canvas.clientWidth * ratio)), height = Math.floor(96 * ratio);
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, width, height);
    const live = state.live;
    let peaks, played;
    if (!clip && live) {                             // a stream arriving: what came so far, over at least 4 s
      if (!live.length) return;
      const span = Math.max(live.length, Math.round(live.rate * 4));
      if (!live.peaks || live.peaks.length !== width * 2 || live.peaksSpan !== span) {
        live.peaks = peaksOf(live.samples, span, width);
        live.peaksSpan = span;
      }
      peaks = live.peaks;
      played = livePlayed(live) / span;
    } else {
      if (!clip?.buffer) return;
      if (!clip.peaks || clip.peaks.length !== width * 2) clip.peaks = peaksOf([clip.buffer.getChannelData(0)], clip.buffer.length, width);
      peaks = clip.peaks;
      const player = $("player");
      played = clip.live && clip.live === live && livePlaying(live) ? livePlayed(live) / live.length
        : player.duration > 0 ? player.currentTime / player.duration : 0;
    }
    const styles = getComputedStyle(document.documentElement);
    let max = 1e-6;
    for (const p of peaks) max = Math.max(max, Math.abs(p));
    const mid = height / 2, scale = (height / 2 - 2) / max;
    for (let x = 0; x < width; x++) {
      g.fillStyle = x / width < played ? styles.getPropertyValue("--wave-played") : styles.getPropertyValue("--wave");
      const top = mid - peaks[2 * x + 1] * scale, bottom = mid - peaks[2 * x] * scale;
      g.fillRect(x, top, 1, Math.max(1, bottom - top));
    }
  }

  function followPlayback() {
    drawWaveform();
    if (!$("player").paused) requestAnimationFrame(followPlayback);
  }

  function renderHistory() {
    $("history-empty").hidden = state.history.length > 0;
    $("history").replaceChildren(...state.history.map((clip) => {
      const name = `chatterbox-${clip.n}-${(clip.requestId || "clip").slice(0, 8)}.${clip.format}`;
      const play = el("button", { type: "button", class: "secondary", text: "▶ Play" });
      play.addEventListener("click", () => show(clip, true));
      const said = clip.text.length > 140 ? clip.text.slice(0, 140) + "…" : clip.text;
      const meta = [`#${clip.n}`, clip.at.toLocaleTimeString(), clip.model, clip.voice, fmtSeconds(clip.seconds),
                    clip.rtf != null ? `${clip.rtf.toFixed(2)}× real time` : null, clip.seed != null ? `seed ${clip.seed}` : null]
        .filter(Boolean).join(" · ");
      return el("li", {}, el("p", { class: "said", text: said }), el("span", { class: "meta", text: meta }),
                el("div", { class: "links" }, play, el("a", { href: clip.url, download: name, text: `Download ${clip.format}` })));
    }));
  }

  // --- the key's account and the server's state -------------------------------------------------------------
  function showCredits(available) {
    if (!isFinite(available)) return;
    const line = $("account");
    line.dataset.available = String(available);
    if (line.dataset.name != null) line.textContent = `${line.dataset.name}: ${available} credits available.`;
  }

  async function loadAccount() {
    const line = $("account");
    delete line.dataset.name;
    try {
      const response = await call("v1/account");
      if (response.status === 404) {
        line.textContent = "This server runs without keys: the key may stay empty.";
      } else if (response.ok) {
        const acc = await response.json();
        line.dataset.name = acc.name ? `Key "${acc.name}"` : `Key ${acc.key_prefix || ""}…`;
        showCredits(acc.available);
      } else {
        line.textContent = apiKey() ? explain(response.status, await errorBody(response), response.headers)
          : "Enter an API key: this server needs one.";
      }
    } catch (e) { line.textContent = e.message; }
  }

  async function loadServerState() {
    try {
      const response = await call("ready", { auth: false });
      const body = await errorBody(response);
      $("server-status").textContent = response.ok ? `${body.model || "model"} · ready`
        : `not ready${body.error ? ": " + body.error.replace(/^not ready: /, "") : ""}`;
    } catch (e) { $("server-status").textContent = "server unreachable"; }
  }

  function updateCount() { $("text-count").textContent = String($("text").value.length); }

  // --- wiring -----------------------------------------------------------------------------------------------
  async function start() {
    setStatus("loading");
    loadKey();
    let keyTimer = null;
    $("api-key").addEventListener("input", () => {
      storeKey();
      clearTimeout(keyTimer);
      keyTimer = setTimeout(() => { loadAccount(); loadLibrary(); }, 400);
    });
    $("key-remember").addEventListener("change", storeKey);
    $("key-show").addEventListener("click", () => {
      const input = $("api-key"), shown = input.type === "text";
      input.type = shown ? "password" : "text";
      $("key-show").textContent = shown ? "Show" : "Hide";
      $("key-show").setAttribute("aria-pressed", String(!shown));
    });
    $("text").addEventListener("input", updateCount);
    $("model").addEventListener("change", () => selectModel($("model").value));
    for (const radio of document.querySelectorAll("input[name=voice]")) radio.addEventListener("change", onVoiceChoice);
    $("clip-file").addEventListener("change", onClipFile);
    $("record").addEventListener("click", toggleRecording);
    $("save-voice-button").addEventListener("click", () => saveToLibrary().catch((e) => showError(e.message)));
    $("reset-params").addEventListener("click", resetParams);
    $("generate").addEventListener("click", generate);
    $("stop").addEventListener("click", stop);
    $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
    const player = $("player");
    player.addEventListener("play", () => { stopLive(); followPlayback(); });
    player.addEventListener("seeked", drawWaveform);
    player.addEventListener("error", () => {
      const clip = state.current;
      if (clip && player.src) showError(`This browser cannot play the ${clip.format} audio it received; ` +
                                        "download it from the list below, or pick another output format.");
    });
    player.addEventListener("timeupdate", () => { if (player.paused) drawWaveform(); });
    $("waveform").addEventListener("click", (e) => {
      const rect = e.currentTarget.getBoundingClientRect();
      if (player.duration > 0) player.currentTime = ((e.clientX - rect.left) / rect.width) * player.duration;
    });
    window.addEventListener("resize", drawWaveform);
    if (window.matchMedia("(max-width: 639px)").matches) $("params-details").open = false;
    onVoiceChoice();
    loadServerState();
    loadAccount();
    loadLibrary();
    try {
      state.models = await loadModels();
      renderModels();
      setStatus("idle");
    } catch (e) {
      $("generate").disabled = true;
      showError(e.message);
    }
  }

  start();
})();
