// The dit-serve playground: a plain client of the public API in two small modules with no dependencies
// (this one and sse.js), so that it works offline and reads as an example of using the API (README,
// "Playground").

import { serverSentEvents } from "./sse.js";

// The API's own bounds on request fields (dit_serve/schemas.py; tests/test_playground.py keeps them equal).
// The server checks them too; the form uses them so that a slip is caught before a round trip.
const LIMITS = Object.freeze({ n: 8, steps: 100, guidance: 20, fps: 60, promptChars: 1000 });
// Seeds above 2^53 lose digits in JavaScript numbers, so the page keeps to the exactly representable ones.
const MAX_SEED = Number.MAX_SAFE_INTEGER;
const DEFAULT_FPS = 8;
const DEFAULT_PREVIEWS = 5; // a preview every 5 steps: a few per job at the usual 20-50 steps
const FORMATS = { image: ["png", "jpeg", "webp"], video: ["mp4", "gif", "webp"] };
const PRIORITIES = ["normal", "high", "low"];
const KEY_STORAGE = "dit-serve.api-key";
const RECONNECTS = 5; // a dropped event stream is resumed (Last-Event-ID) this many times
const RECONNECT_DELAY_MS = 1000;
const FINAL_EVENTS = new Set(["completed", "failed", "canceled"]);

// API paths are resolved against the page's folder, not the host's root, for a proxy's prefix.
const BASE = new URL(".", document.baseURI);
const $ = (id) => document.getElementById(id);
let models = []; // ModelSpec objects from GET /v1/models
let formModel = null; // the model the form was built for
let jobId = null; // the job being followed, for Cancel
let objectUrls = []; // blob: URLs of shown outputs, freed when the gallery is cleared

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---- HTTP --------------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), BASE); // job objects name URLs from the root: /v1/...
}

// fetch() with the Bearer header when a key is set; an error answer becomes an ApiError carrying
// the API's {"error": {"code", "message"}}, so every failure is shown the same way.
async function api(path, { headers = {}, ...options } = {}) {
  const auth = apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
  let response;
  try {
    response = await fetch(apiUrl(path), { ...options, headers: { ...auth, ...headers } });
  } catch (error) {
    throw new ApiError(0, "unreachable", `the API did not answer (${error.message})`);
  }
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not our error shape (a proxy's page): fall back to the status line below
  }
  const { code = `http_${response.status}`, message = response.statusText } = body?.error ?? {};
  throw new ApiError(response.status, code, message);
}

// Follow a job's events to its final one, resuming from the last event id when the stream drops
// (a proxy's idle timeout, a restarted API). Returns the final event's job object.
async function followEvents(id, onEvent) {
  let lastId = null;
  for (let failures = 0; failures <= RECONNECTS; failures++) {
    const headers = { Accept: "text/event-stream", ...(lastId ? { "Last-Event-ID": lastId } : {}) };
    try {
      const response = await api(`v1/jobs/${id}/events`, { headers });
      for await (const event of serverSentEvents(response)) {
        if (event.id) lastId = event.id;
        failures = 0; // only drops in a row, with nothing received between them, count
        const payload = JSON.parse(event.data);
        if (FINAL_EVENTS.has(event.type)) return payload;
        onEvent(event.type, payload);
      }
    } catch (error) {
      if (error instanceof ApiError && error.status) throw error; // the API said no: retrying won't help
    }
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_DELAY_MS));
  }
  throw new ApiError(0, "stream_lost", `the event stream of job ${id} kept dropping; reload to retry`);
}

// ---- The form, built from the chosen model's ModelSpec ------------------------------------------

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function choice(name, values, selected) {
  const options = values.map((value) => element("option", { value }, [value]));
  const select = element("select", { name, "data-type": "text" }, options);
  select.value = selected;
  return select;
}

// A labelled input; data-type says how its text becomes the request field named by `name`.
function field(label, input, hint = "") {
  return element("label", {}, [label, input, ...(hint ? [element("small", {}, [hint])] : [])]);
}

function number(name, type, attributes) {
  return element("input", { name, type: "number", "data-type": type, ...attributes });
}

function promptFields(spec) {
  const prompt = { name: "prompt", "data-type": "text", required: "", maxlength: LIMITS.promptChars };
  if (spec.conditioning === "text") {
    return [
      field("Prompt", element("textarea", { ...prompt, rows: 3 })),
      field("Negative prompt", element("textarea", { ...prompt, name: "negative_prompt", required: null })),
    ];
  }
  if (!spec.labels) {
    // A checkpoint without label names takes class ids only.
    const attributes = { min: 0, max: spec.num_classes - 1, required: "", value: 0 };
    return [field("Class id", number("class_labels", "ids", attributes), `0 to ${spec.num_classes - 1}`)];
  }
  // Free text with the labels offered as suggestions: the API matches the text to a label.
  const input = element("input", { ...prompt, list: "labels", placeholder: spec.labels[0] });
  const examples = `${spec.labels.length} labels, e.g. ${spec.labels.slice(0, 3).join(", ")}`;
  return [field("Prompt (a label)", input, examples), suggestions("labels", spec.labels)];
}

function suggestions(id, values) {
  return element("datalist", { id }, values.map((value) => element("option", { value })));
}

function sizeField(spec) {
  if (!spec.size_multiple) return [field("Size", choice("size", spec.sizes, spec.default_size))];
  // Any WxH on the model's grid is accepted: free text, with the listed sizes as suggestions.
  const attributes = { list: "sizes", value: spec.default_size, pattern: "[1-9][0-9]*x[1-9][0-9]*" };
  const input = element("input", { name: "size", "data-type": "text", ...attributes });
  const limit = spec.max_pixels ? `, at most ${spec.max_pixels} pixels` : "";
  const hint = `sides multiples of ${spec.size_multiple}${limit}`;
  return [field("Size (WxH)", input, hint), suggestions("sizes", spec.sizes)];
}

// Videos: frames (1 + a multiple of frames_multiple, which the input's step gives) and fps; images: n.
function kindFields(spec) {
  if (spec.kind === "image") {
    return [field("Outputs", number("n", "int", { min: 1, max: LIMITS.n, value: 1 }))];
  }
  const { max_frames: max, frames_multiple: step } = spec;
  const frames = { min: 1, max, step, value: spec.defaults.num_frames };
  return [
    field("Frames", number("num_frames", "int", frames)),
    field("FPS", number("fps", "int", { min: 1, max: LIMITS.fps, value: DEFAULT_FPS })),
  ];
}

function buildForm(spec) {
  const { num_inference_steps: steps, guidance_scale: guidance } = spec.defaults;
  const fields = [
    ...promptFields(spec),
    ...sizeField(spec),
    field("Steps", number("num_inference_steps", "int", { min: 1, max: LIMITS.steps, value: steps })),
    field(
      "Guidance",
      number("guidance_scale", "float", { min: 0, max: LIMITS.guidance, step: "any", value: guidance }),
      "1 or less: no guidance",
    ),
    field("Seed", number("seed", "int", { min: 0, max: MAX_SEED, placeholder: "random" }), "output k: seed + k"),
    ...kindFields(spec),
    field("Format", choice("output_format", FORMATS[spec.kind], FORMATS[spec.kind][0])),
    field("Priority", choice("priority", PRIORITIES, PRIORITIES[0])),
    field(
      "Preview every",
      number("previews", "int", { min: 1, max: LIMITS.steps, value: DEFAULT_PREVIEWS }),
      "steps; empty: no previews",
    ),
  ];
  $("fields").replaceChildren(...fields);
  formModel = spec.name;
  const conditioning = spec.conditioning === "class" ? "class labels" : "text";
  $("model-info").textContent = `${spec.kind}, ${spec.family}, conditioned on ${conditioning}`;
  showCurl();
}

const PARSERS = {
  text: (value) => value,
  int: (value) => Number.parseInt(value, 10),
  float: (value) => Number.parseFloat(value),
  ids: (value) => [Number.parseInt(value, 10)],
};

// The request body: the model and every filled-in field (empty ones are left to the API's defaults).
function requestBody() {
  const body = { model: $("model").value };
  for (const input of $("fields").querySelectorAll("[name]")) {
    if (input.value.trim() !== "") body[input.name] = PARSERS[input.dataset.type](input.value.trim());
  }
  return body;
}

function currentSpec() {
  return models.find((spec) => spec.name === $("model").value);
}

// The same request as a shell command, with the key left in an environment variable.
function curlCommand(method, path, body) {
  const auth = apiKey() ? ` \\\n  -H "Authorization: Bearer $DIT_API_KEY"` : "";
  const json = body && JSON.stringify(body).replaceAll("'", "'\\''"); // a ' closes, escapes and reopens
  const send = body ? ` \\\n  -H 'Content-Type: application/json' \\\n  -d '${json}'` : "";
  return `curl -s${method === "GET" ? "N" : ""} ${apiUrl(path).href}${auth}${send}`;
}

function showCurl(id = null) {
  const spec = currentSpec();
  if (!spec) return;
  const lines = [curlCommand("POST", `v1/${spec.kind}s`, requestBody())];
  if (id) lines.push("", "# then follow its events:", curlCommand("GET", `v1/jobs/${id}/events`));
  $("curl").textContent = lines.join("\n");
}

// ---- The job: progress, previews, outputs --------------------------------------------------------

function showError(error) {
  const hint = error.status === 401 ? " Enter a valid API key above." : "";
  $("error").textContent = `${error.code}: ${error.message}${hint}`;
  $("error").hidden = false;
}

function setStatus(text) {
  $("status").textContent = text;
}

function eta(seconds) {
  return seconds === null || seconds === undefined ? "" : `, about ${Math.ceil(seconds)} s left`;
}

function clearJob() {
  objectUrls.forEach((url) => URL.revokeObjectURL(url));
  objectUrls = [];
  $("error").hidden = true;
  $("gallery").replaceChildren();
  $("progress").value = 0;
  $("progress").hidden = false;
  setStatus("");
}

// One figure per output: it shows previews while the job runs, then the output itself.
function slot(index) {
  let figure = $("gallery").querySelector(`figure[data-index="${index}"]`);
  if (!figure) {
    const parts = [element("div", { class: "media" }), element("figcaption")];
    figure = element("figure", { "data-index": index }, parts);
    $("gallery").append(figure);
  }
  return figure;
}

function showMedia(index, media, caption) {
  const figure = slot(index);
  figure.querySelector(".media").replaceChildren(media);
  figure.querySelector("figcaption").replaceChildren(...caption);
}

const HANDLERS = {
  queued: (event) => {
    const place = event.queue_position === 0 ? "next in line" : `position ${event.queue_position ?? "?"}`;
    setStatus(`Queued: ${place}${eta(event.eta_s)}`);
  },
  started: () => setStatus("Started"),
  progress: (event) => {
    $("progress").value = event.percent;
    setStatus(`Step ${event.step} of ${event.steps} (${event.percent}%)${eta(event.eta_s)}`);
  },
  preview: (event) => {
    const src = `data:${event.content_type};base64,${event.b64_json}`;
    const image = element("img", { src, alt: `preview of output ${event.index}`, class: "preview" });
    showMedia(event.index, image, [`preview at step ${event.step} of ${event.steps}`]);
  },
};

// Outputs need the Bearer header too, so they are fetched as blobs and shown from blob: URLs.
async function showOutput(job, output) {
  const blob = await (await api(output.url)).blob();
  const url = URL.createObjectURL(blob);
  objectUrls.push(url);
  const alt = `output ${output.index} of job ${job.id}`;
  const media =
    output.content_type === "video/mp4"
      ? element("video", { src: url, controls: "", loop: "", autoplay: "", playsinline: "", "aria-label": alt })
      : element("img", { src: url, alt, class: "output" });
  media.muted = true; // browsers autoplay only muted videos (the property, not the attribute, mutes)
  const extension = output.content_type.split("/")[1];
  const name = `${job.id}-${output.index}.${extension}`;
  const download = element("a", { href: url, download: name }, ["Download"]);
  showMedia(output.index, media, [`seed ${output.seed} · `, download]);
}

async function finish(job) {
  jobId = null;
  $("cancel").hidden = true;
  if (job.status === "completed") {
    $("progress").value = 100;
    const timed = job.started_at && job.completed_at; // unix seconds, null when unknown
    setStatus(timed ? `Completed in ${(job.completed_at - job.started_at).toFixed(1)} s` : "Completed");
    await Promise.all(job.outputs.map((output) => showOutput(job, output)));
  } else if (job.status === "failed") {
    setStatus("Failed");
    showError(new ApiError(0, job.error.code, job.error.message));
  } else {
    setStatus("Canceled");
  }
}

async function submit(event) {
  event.preventDefault();
  const spec = currentSpec();
  clearJob();
  $("submit").disabled = true;
  try {
    const body = requestBody();
    const response = await api(`v1/${spec.kind}s`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const job = await response.json();
    jobId = job.id;
    $("cancel").hidden = false;
    showCurl(job.id);
    setStatus(`Accepted job ${job.id}`);
    await finish(await followEvents(job.id, (type, payload) => HANDLERS[type]?.(payload)));
  } catch (error) {
    $("cancel").hidden = true;
    showError(error);
  } finally {
    $("submit").disabled = false;
  }
}

async function cancel() {
  // The event stream then ends with `canceled` (or `completed`, if the job won the race).
  if (jobId) await api(`v1/jobs/${jobId}`, { method: "DELETE" }).catch(showError);
}

async function loadModels() {
  $("error").hidden = true;
  try {
    models = (await (await api("v1/models")).json()).data;
  } catch (error) {
    models = [];
    showError(error);
  }
  const previous = $("model").value;
  const options = models.map((spec) => element("option", { value: spec.name }, [`${spec.name} (${spec.kind})`]));
  $("model").replaceChildren(...options);
  if (!models.length) {
    $("fields").replaceChildren();
    formModel = null;
    $("model-info").textContent = "No model is served: start a worker (dit-serve worker).";
    return;
  }
  if (models.some((spec) => spec.name === previous)) $("model").value = previous;
  // Rebuild only for another model: a new key must not wipe what the visitor typed.
  if ($("model").value !== formModel) buildForm(currentSpec());
}

function start() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) ?? "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, apiKey());
    loadModels(); // with auth on, the models answer only to a key
  });
  $("api-key").addEventListener("input", () => showCurl(jobId)); // the curl command's -H line
  $("model").addEventListener("change", () => buildForm(currentSpec()));
  $("request").addEventListener("input", () => showCurl(jobId));
  $("request").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  loadModels();
}

start();
