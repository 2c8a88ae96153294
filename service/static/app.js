// The playground: streams stories from POST /generate, from the run picked among GET /v1/models,
// and drives /train-jobs.
// EventSource cannot POST, so the stream is read from fetch() and its server-sent events parsed
// here; aborting the fetch closes the connection, and the server drops the story from its batch.
"use strict";

const $ = (id) => document.getElementById(id);

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// --- the model ------------------------------------------------------------------------------

async function refreshModel() {
  try {
    // With API_KEY set, /ready names the model only to a client that sends the key.
    const response = await fetch("/ready", { headers: authHeaders() });
    const body = await response.json();
    const named = response.ok && body.model;
    $("model-status").textContent = named
      ? `Model ${body.model} (step ${body.step})`
      : response.ok
        ? "A model is loaded (enter the API key to see which)"
        : body.error?.message ?? "No model loaded yet";
    // The default option names the version a request without `model` gets now.
    $("model").options[0].textContent = named ? `Newest run (${body.model})` : "Newest run";
  } catch {
    $("model-status").textContent = "The service does not answer";
  }
}

// The run picker: one option per run GET /v1/models lists, after "Newest run" (value "", so the
// request names no model). Rebuilt only when the list changed, so an open picker is left alone,
// and the user's choice is kept while its run is still listed.
async function refreshRuns() {
  let cards;
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) {
      $("model-note").textContent = `Runs not listed: ${await errorMessage(response)}`;
      return;
    }
    cards = (await response.json()).data;
  } catch {
    return; // the status line already says the service does not answer
  }
  $("model-note").textContent = "";
  const select = $("model");
  const options = cards.map((card) => {
    const option = document.createElement("option");
    option.value = card.id;
    // The version is "<run>/<checkpoint>": the run's name is shown once.
    const checkpoint = card.version.startsWith(`${card.id}/`)
      ? card.version.slice(card.id.length + 1)
      : card.version;
    // The latest checkpoint's bits per byte (loss compares runs of one vocabulary only), else
    // its val loss, when it recorded one: runs compare at a glance.
    const quality =
      card.val_bits_per_byte != null
        ? ` — ${card.val_bits_per_byte.toFixed(3)} bits/byte`
        : card.val_loss != null
          ? ` — val loss ${card.val_loss.toFixed(3)}`
          : "";
    const vocabulary = card.vocabulary && card.vocabulary !== "gpt2" ? `, ${card.vocabulary}` : "";
    option.textContent = `${card.id} (${checkpoint}${vocabulary})${quality}`;
    option.title = card.version;
    return option;
  });
  const listed = (list) => JSON.stringify(list.map((option) => [option.value, option.textContent]));
  if (listed(options) === listed([...select.options].slice(1))) return;
  const chosen = select.value;
  select.replaceChildren(select.options[0], ...options);
  select.value = options.some((option) => option.value === chosen) ? chosen : "";
}

// --- server-sent events over fetch ------------------------------------------------------------

// Yields {event, data} for each event in a response body, whatever the chunk boundaries.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// --- writing a story ------------------------------------------------------------------------

let running = null; // the AbortController of the story being written

// The sampling inputs start at POST /generate's own defaults, read from its OpenAPI schema: the
// page, the API and `slm generate` share one set (model/sampling.py's story defaults).
const SAMPLING_INPUTS = ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty"];

async function loadSamplingDefaults() {
  try {
    const schema = await (await fetch("/openapi.json")).json();
    const fields = schema.components.schemas.GenerateRequest.properties;
    const form = $("generate-form");
    for (const name of SAMPLING_INPUTS) {
      const value = fields[name]?.default;
      if (form.elements[name].value === "" && value !== undefined && value !== null) {
        form.elements[name].value = value;
      }
    }
  } catch {
    // Empty inputs are left out of the request, so the server's defaults apply all the same.
  }
}

function generationRequest(form) {
  const fields = new FormData(form);
  const request = { prompt: fields.get("prompt"), stream: true };
  for (const name of ["max_new_tokens", "top_k", "seed"]) {
    if (fields.get(name) !== "") request[name] = parseInt(fields.get(name), 10);
  }
  for (const name of ["temperature", "top_p", "repetition_penalty"]) {
    if (fields.get(name) !== "") request[name] = parseFloat(fields.get(name));
  }
  if (fields.get("model")) request.model = fields.get("model"); // else the newest run writes
  return request;
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  const request = generationRequest(event.target);
  $("story-prompt").textContent = request.prompt;
  $("story-text").textContent = "";
  $("story-info").textContent = "Writing…";
  running = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(request),
      signal: running.signal,
    });
    if (!response.ok) {
      $("story-info").textContent = await errorMessage(response);
      if (response.status === 404) refreshRuns(); // the run is gone: drop it from the picker
      return;
    }
    for await (const { event: name, data } of serverSentEvents(response)) {
      if (name === "token") {
        $("story-text").textContent += data.text;
      } else if (name === "done") {
        remember(request, $("story-text").textContent, data);
        const rate = data.timings.tokens_per_s;
        $("story-info").textContent =
          `${data.usage.completion_tokens} tokens, ended by ${data.finish_reason}; ` +
          `first token ${(1000 * data.timings.time_to_first_token_s).toFixed(0)} ms` +
          (rate ? `, ${rate.toFixed(1)} tokens/s` : "") +
          `; model ${data.model}, seed ${data.seed}`;
      } else if (name === "error") {
        $("story-info").textContent = data.error?.message ?? "the story failed";
      }
    }
  } catch (error) {
    $("story-info").textContent =
      error.name === "AbortError" ? "Stopped." : `Failed: ${error.message}`;
  } finally {
    running = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

// --- the stories written in this browser -----------------------------------------------------

// Kept in localStorage, newest first: each with the request as sent (its settings), so it can
// be copied, written again with the same settings, downloaded, or cleared.
const HISTORY_KEY = "slm-stories";
const HISTORY_LIMIT = 100;

function loadHistory() {
  try {
    const stories = JSON.parse(localStorage.getItem(HISTORY_KEY) ?? "[]");
    return Array.isArray(stories) ? stories : [];
  } catch {
    return [];
  }
}

function saveHistory(stories) {
  try {
    localStorage.setItem(HISTORY_KEY, JSON.stringify(stories.slice(0, HISTORY_LIMIT)));
  } catch {
    $("history-note").textContent = "This browser would not keep the story (storage is full).";
  }
  showHistory();
}

function remember(request, text, done) {
  const { stream, ...settings } = request;
  saveHistory([
    {
      written_at: new Date().toISOString(),
      prompt: request.prompt,
      text,
      model: done.model,
      seed: done.seed,
      finish_reason: done.finish_reason,
      completion_tokens: done.usage.completion_tokens,
      request: settings,
    },
    ...loadHistory(),
  ]);
}

function storyText(story) {
  return story.prompt + story.text;
}

function showHistory() {
  const stories = loadHistory();
  $("history-note").textContent = stories.length
    ? `${stories.length} ${stories.length === 1 ? "story" : "stories"}, newest first, kept in this browser only.`
    : "None yet: each story you write is kept here, in this browser only.";
  for (const id of ["history-text", "history-json", "history-clear"]) $(id).disabled = !stories.length;
  $("history").replaceChildren(
    ...stories.map((story) => {
      const item = document.createElement("li");
      const text = document.createElement("p");
      text.className = "text";
      const prompt = document.createElement("b");
      prompt.textContent = story.prompt;
      text.append(prompt, story.text);
      const info = document.createElement("p");
      info.className = "info";
      info.textContent = `${new Date(story.written_at).toLocaleString()} — model ${story.model}, seed ${story.seed}`;
      const buttons = document.createElement("div");
      buttons.className = "buttons";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.textContent = "Copy";
      copy.addEventListener("click", () => copyStory(story));
      const again = document.createElement("button");
      again.type = "button";
      again.textContent = "Write again";
      again.title = "Write a story with the same settings (and the same seed, if one was given)";
      again.addEventListener("click", () => writeAgain(story));
      buttons.append(copy, again);
      item.append(text, info, buttons);
      return item;
    }),
  );
}

async function copyStory(story) {
  try {
    await navigator.clipboard.writeText(storyText(story));
    $("history-note").textContent = "Copied the story.";
  } catch {
    $("history-note").textContent = "This browser did not allow copying; select the text instead.";
  }
}

// The form takes the story's settings as they were sent, then writes.
function writeAgain(story) {
  const form = $("generate-form");
  const request = story.request ?? {};
  form.elements.prompt.value = story.prompt;
  for (const name of [...SAMPLING_INPUTS, "seed"]) {
    form.elements[name].value = request[name] ?? "";
  }
  const select = $("model");
  select.value = [...select.options].some((option) => option.value === request.model)
    ? request.model
    : "";
  form.requestSubmit();
}

function download(name, type, content) {
  const url = URL.createObjectURL(new Blob([content], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function downloadHistory(format) {
  const stories = loadHistory();
  if (format === "json") {
    download("slm-stories.json", "application/json", `${JSON.stringify(stories, null, 2)}\n`);
  } else {
    const text = stories
      .map((story) => `${storyText(story)}\n\n(${story.written_at}, model ${story.model}, seed ${story.seed})`)
      .join("\n\n* * *\n\n");
    download("slm-stories.txt", "text/plain", `${text}\n`);
  }
}

function clearHistory() {
  if (!window.confirm("Forget every story written in this browser?")) return;
  localStorage.removeItem(HISTORY_KEY);
  showHistory();
}

// --- datasets -------------------------------------------------------------------------------

// The data field offers the datasets prepared under the server's DATA_DIR (GET /datasets), with
// their size, and the hub's TinyStories, which the worker downloads and tokenizes first. It
// starts at a prepared dataset when there is one (hub:v2 needs the hub, and takes long).
let preparedDatasets = []; // as GET /datasets lists them
let datasetsListed = null; // null until GET /datasets answered; else why it did not, or ""

const HUB_SOURCES = {
  "hub:v2":
    "TinyStories v2 (GPT-4 stories) from the Hugging Face hub: about 2.2 GB of text, which the " +
    "worker downloads and tokenizes before training starts (a while; the worker needs the hub).",
  "hub:v1":
    "TinyStories v1 from the Hugging Face hub: about 1.9 GB of text, which the worker downloads " +
    "and tokenizes before training starts (a while; the worker needs the hub).",
};

// 1234 → "1.2k", 1_000_000 → "1.0M".
function count(n) {
  if (n < 1000) return String(n);
  if (n < 1e6) return `${(n / 1e3).toFixed(1)}k`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)}M`;
  return `${(n / 1e9).toFixed(1)}B`;
}

const total = (splits) => Object.values(splits ?? {}).reduce((sum, n) => sum + n, 0);

function datasetLabel(dataset) {
  return `${dataset.name} — ${count(total(dataset.tokens))} tokens`;
}

// What the data field's value will train on, said under it.
function describeData() {
  const value = $("train-form").elements.dataset.value.trim();
  const dataset = preparedDatasets.find((d) => d.name === value);
  let note;
  if (dataset) {
    const splits = Object.entries(dataset.tokens)
      .map(([split, n]) => `${split} ${count(n)}`)
      .join(", ");
    note =
      `Prepared on the server: ${count(total(dataset.tokens))} tokens (${splits}), ` +
      `${count(total(dataset.stories))} stories, from ${dataset.source}.`;
  } else if (HUB_SOURCES[value]) {
    note = HUB_SOURCES[value];
  } else if (/^https?:\/\//.test(value)) {
    note = "A text file the worker downloads and tokenizes before training starts.";
  } else if (datasetsListed === null) {
    note = "";
  } else if (datasetsListed) {
    note = `Prepared datasets not listed: ${datasetsListed}`;
  } else if (value) {
    note = preparedDatasets.length
      ? `No prepared dataset '${value}' is listed; the server has ${preparedDatasets.map((d) => d.name).join(", ")}.`
      : `No prepared dataset '${value}' is listed: the server has none yet.`;
  }
  if (!dataset && datasetsListed === "" && !preparedDatasets.length && HUB_SOURCES[value]) {
    note += " No dataset is prepared on the server yet.";
  }
  $("dataset-note").textContent = note ?? "";
}

async function refreshDatasets() {
  try {
    const response = await fetch("/datasets", { headers: authHeaders() });
    if (!response.ok) {
      datasetsListed = await errorMessage(response);
      describeData();
      return;
    }
    preparedDatasets = (await response.json()).datasets;
    datasetsListed = "";
  } catch {
    return; // the status line already says the service does not answer
  }
  const options = [
    ...preparedDatasets.map((dataset) => {
      const option = document.createElement("option");
      option.value = dataset.name;
      option.label = datasetLabel(dataset);
      return option;
    }),
    ...Object.keys(HUB_SOURCES).map((source) => {
      const option = document.createElement("option");
      option.value = source;
      option.label = `${source} — TinyStories ${source.slice(4)}, downloaded first`;
      return option;
    }),
  ];
  $("datasets").replaceChildren(...options);
  // Untouched, the field moves from hub:v2 to the newest prepared dataset.
  const field = $("train-form").elements.dataset;
  if (field.value === field.defaultValue && preparedDatasets.length) {
    const newest = preparedDatasets.reduce((a, b) => (b.created_at > a.created_at ? b : a));
    field.value = newest.name;
  }
  describeData();
}

// --- training -------------------------------------------------------------------------------

let watchedJob = null;
let watchTimer = null;
let jobsTimer = null; // the next poll of the job list, while a listed job is active
let listedJobs = ""; // what the list shows, so that it is rebuilt only when that changed

const ACTIVE_STATES = ["queued", "preparing", "training"];

function jobRequest(form) {
  const fields = new FormData(form);
  const integer = (name) => parseInt(fields.get(name), 10);
  return {
    run_name: fields.get("run_name"),
    // A prepared dataset is named; the hub's TinyStories or a URL is prepared by the worker first.
    data: /^(hub:|https?:)/.test(fields.get("dataset"))
      ? { source: fields.get("dataset") }
      : { dataset: fields.get("dataset") },
    train: {
      preset: fields.get("preset"),
      // A time budget, when one is given, replaces the steps (the API takes one of them).
      ...(parseFloat(fields.get("max_minutes")) > 0
        ? { max_minutes: parseFloat(fields.get("max_minutes")) }
        : { max_steps: integer("max_steps") }),
      batch_size: integer("batch_size"),
      block_size: integer("block_size"),
      lr: parseFloat(fields.get("lr")),
      min_lr: parseFloat(fields.get("lr")) / 10,
      // A tenth of the Steps field (read while a time budget turns it off), at most 100.
      warmup_steps: Math.min(100, Math.floor(parseInt(form.elements.max_steps.value, 10) / 10) || 0),
      eval_interval: integer("eval_interval"),
      eval_iters: 5,
      checkpoint_interval: integer("checkpoint_interval"),
      optimizer: fields.get("optimizer"),
      ...modelOverrides(fields),
    },
  };
}

// The Advanced section's shape and architecture: only what is set is sent (the preset decides
// the rest).
const SHAPE_NUMBERS = ["n_layer", "n_head", "n_embd"];
const SHAPE_CHOICES = ["bias", "position", "norm", "activation", "qk_norm", "tie_embeddings",
  "pad_vocab", "vocabulary"];

function modelOverrides(fields) {
  const overrides = {};
  for (const name of SHAPE_NUMBERS) {
    const value = (fields.get(name) ?? "").trim();
    if (value !== "") overrides[name] = Number(value);
  }
  for (const name of SHAPE_CHOICES) {
    const value = fields.get(name) ?? "";
    if (value !== "") overrides[name] = value === "true" ? true : value === "false" ? false : value;
  }
  return overrides;
}

async function submitJob(event) {
  event.preventDefault();
  $("train-error").textContent = "";
  const response = await fetch("/train-jobs", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(jobRequest(event.target)),
  });
  if (!response.ok) {
    $("train-error").textContent = await errorMessage(response);
    return;
  }
  const job = await response.json();
  await refreshJobs();
  watch(job.id);
}

// The job list follows the server: polled every second while any listed job is queued,
// preparing or training, and after each submit, stop and resume.
async function refreshJobs() {
  clearTimeout(jobsTimer);
  let jobs;
  try {
    const response = await fetch("/train-jobs?limit=10", { headers: authHeaders() });
    if (!response.ok) {
      $("train-error").textContent = await errorMessage(response);
      return;
    }
    jobs = (await response.json()).jobs;
  } catch {
    return; // the status line already says the service does not answer
  }
  const shown = JSON.stringify(jobs.map((job) => [job.id, job.run_name, job.state]));
  if (shown !== listedJobs) {
    listedJobs = shown;
    const list = $("jobs");
    list.replaceChildren();
    for (const job of jobs) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = `${job.run_name} — ${job.state}`;
      button.addEventListener("click", () => watch(job.id));
      item.append(button);
      list.append(item);
    }
  }
  clearTimeout(jobsTimer); // another refresh may have finished meanwhile: one timer only
  if (jobs.some((job) => ACTIVE_STATES.includes(job.state))) {
    jobsTimer = setTimeout(refreshJobs, 1000);
  }
}

// "12 s", "3 min 5 s", "2 h 10 min".
function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// A job's message as the page says it: a job that failed for its data says so in the page's terms
// (the worker's messages name `slm prepare` and its --source, which are for the command line).
function jobMessage(job) {
  const message = job.message;
  if (job.state !== "failed") return message;
  const fix = "Pick a prepared dataset in the Data field, or give an http(s) URL of a text file.";
  const hub = message.match(
    /cannot fetch (\S+) from the Hugging Face hub \(([^)]*)\): (.*?)( — without the hub|$)/s,
  );
  if (hub) {
    return `the worker could not download ${hub[1]} from the Hugging Face hub (${hub[2]}): ${hub[3]}. ${fix}`;
  }
  if (/hub sources need huggingface_hub/.test(message)) {
    return `the worker cannot download from the Hugging Face hub (it lacks huggingface_hub). ${fix}`;
  }
  const missing = message.match(/dataset '([^']*)' is not prepared under DATA_DIR/);
  if (missing) {
    return (
      `the dataset '${missing[1]}' is not prepared on the server. Pick one the Data field lists, ` +
      "or hub:v2 or an http(s) URL, which the worker downloads and prepares first."
    );
  }
  // Any other data error: the command-line advice is left out.
  return message.replace(/[;,]? *(—|or) *(without the hub, )?pass --source [^.]*/, "").trim();
}

// One line for a job: its state, where it is, how fast and how long is left, its losses.
function describeJob(job) {
  const parts = [job.state];
  const active = ACTIVE_STATES.includes(job.state);
  const started = job.step > 0 || !["queued", "preparing"].includes(job.state);
  if (started && job.max_steps) {
    parts[0] += `: step ${job.step} of ${job.max_steps}`;
  } else if (started) {
    parts[0] += `: step ${job.step}`;
  } else {
    // Not started yet: the steps it will train, as asked (the worker works them out later).
    const planned = job.max_steps ?? job.spec?.train?.max_steps;
    const minutes = job.spec?.train?.max_minutes;
    if (planned) parts[0] += `: ${planned} steps to train`;
    else if (minutes) parts[0] += `: ${minutes} minutes to train`;
  }
  if (active && job.tokens_per_s) {
    parts.push(`${Math.round(job.tokens_per_s).toLocaleString("en")} tokens/s`);
  }
  if (active && job.eta_s != null) parts.push(`about ${duration(job.eta_s)} left`);
  const losses = [
    job.train_loss != null ? `train ${job.train_loss.toFixed(3)}` : null,
    job.val_loss != null ? `val ${job.val_loss.toFixed(3)}` : null,
  ].filter(Boolean);
  if (losses.length) parts.push(`loss ${losses.join(", ")}`);
  if (job.val_bits_per_byte != null) parts.push(`${job.val_bits_per_byte.toFixed(3)} bits/byte`);
  if (job.message) parts.push(jobMessage(job));
  return parts.join(" — ");
}

function watch(jobId) {
  watchedJob = jobId;
  $("job-panel").hidden = false;
  clearTimeout(watchTimer);
  pollJob();
}

async function pollJob() {
  const jobId = watchedJob;
  const response = await fetch(`/train-jobs/${encodeURIComponent(jobId)}`, {
    headers: authHeaders(),
  });
  if (jobId !== watchedJob) return;
  if (!response.ok) {
    $("job-status").textContent = await errorMessage(response);
    return;
  }
  const job = await response.json();
  $("job-title").textContent = `Job ${job.run_name}`;
  $("job-status").textContent = describeJob(job);
  // Indeterminate (no value) until the job knows its steps.
  if (job.max_steps) $("job-progress").value = job.step / job.max_steps;
  else $("job-progress").removeAttribute("value");
  drawLosses($("loss-chart"), job.history);
  const active = ACTIVE_STATES.includes(job.state);
  $("job-stop").disabled = !active;
  $("job-resume").disabled = !["stopped", "failed", "abandoned"].includes(job.state);
  if (active) {
    watchTimer = setTimeout(pollJob, 1000);
  } else {
    refreshModel();
    refreshRuns();
    refreshJobs();
    refreshDatasets(); // a job given data.source leaves a prepared dataset behind
  }
}

async function jobAction(method, suffix) {
  const response = await fetch(`/train-jobs/${encodeURIComponent(watchedJob)}${suffix}`, {
    method,
    headers: authHeaders(),
  });
  if (!response.ok) $("train-error").textContent = await errorMessage(response);
  watch(watchedJob);
  refreshJobs(); // the list shows the job's new state (and follows it while it is active)
}

// Round steps for axis ticks: 1, 2 or 5 times a power of ten, about `count` of them over `span`.
function tickStep(span, count) {
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= raw) ?? raw;
}

// Train and val loss against step, on one scale, with the axes labelled at round values; a
// series with a single point (the first evaluation) shows as a dot. The right-hand labels give
// val loss in bits per byte (one factor for the whole run: the val windows never change), the
// figure that compares across vocabularies.
function drawLosses(canvas, history) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  const lastVal = history.findLast((p) => p.val_loss && p.val_bits_per_byte != null);
  const bitsPerNat = lastVal ? lastVal.val_bits_per_byte / lastVal.val_loss : null;
  const pad = { left: 48, right: bitsPerNat ? 44 : 12, top: 12, bottom: 28 };
  context.clearRect(0, 0, width, height);
  const points = history.flatMap((p) => [p.train_loss, p.val_loss]).filter((v) => v != null);
  if (!points.length) return;
  const maxStep = Math.max(1, ...history.map((p) => p.step));
  let low = Math.min(...points);
  let high = Math.max(...points);
  if (high - low < 1e-6) {
    low -= 0.5;
    high += 0.5;
  }
  const lossTick = tickStep(high - low, 4);
  low = Math.floor(low / lossTick) * lossTick;
  high = Math.ceil(high / lossTick) * lossTick;
  const span = high - low;
  const x = (step) => pad.left + (step / maxStep) * (width - pad.left - pad.right);
  const y = (loss) => pad.top + ((high - loss) / span) * (height - pad.top - pad.bottom);
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  const decimals = Math.max(0, -Math.floor(Math.log10(lossTick)));

  context.font = "12px system-ui";
  context.lineWidth = 1;
  // Horizontal grid lines and loss labels.
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (let loss = low; loss <= high + lossTick / 2; loss += lossTick) {
    context.strokeStyle = color("--grid");
    context.beginPath();
    context.moveTo(pad.left, y(loss));
    context.lineTo(width - pad.right, y(loss));
    context.stroke();
    context.fillStyle = color("--muted");
    context.fillText(loss.toFixed(decimals), pad.left - 6, y(loss));
    if (bitsPerNat) {
      context.textAlign = "left";
      context.fillText((loss * bitsPerNat).toFixed(2), width - pad.right + 6, y(loss));
      context.textAlign = "right";
    }
  }
  // Step labels along the bottom.
  const stepTick = Math.max(1, tickStep(maxStep, 5));
  context.textAlign = "center";
  context.textBaseline = "top";
  for (let step = 0; step <= maxStep; step += stepTick) {
    context.fillText(String(step), x(step), height - pad.bottom + 6);
  }
  context.textAlign = "right";
  context.textBaseline = "alphabetic";
  context.fillText("step", width - pad.right, height - pad.bottom - 4);
  if (bitsPerNat) context.fillText("val bits/byte →", width - pad.right, pad.top + 10);
  context.strokeStyle = color("--muted");
  context.beginPath();
  context.moveTo(pad.left, pad.top);
  context.lineTo(pad.left, height - pad.bottom);
  context.lineTo(width - pad.right, height - pad.bottom);
  context.stroke();

  for (const [key, name] of [
    ["train_loss", "--accent"],
    ["val_loss", "--val"],
  ]) {
    const series = history.filter((p) => p[key] != null);
    context.strokeStyle = context.fillStyle = color(name);
    context.lineWidth = 2;
    context.beginPath();
    series.forEach((p, i) => (i ? context.lineTo : context.moveTo).call(context, x(p.step), y(p[key])));
    context.stroke();
    // Val points are few (one per evaluation): each is marked, so the first one shows at all.
    if (key === "val_loss" || series.length === 1) {
      for (const p of series) {
        context.beginPath();
        context.arc(x(p.step), y(p[key]), 3.5, 0, 2 * Math.PI);
        context.fill();
      }
    }
  }
}

// --- wiring ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("slm-api-key") ?? "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("slm-api-key", $("api-key").value.trim());
    refreshModel();
    refreshRuns();
    refreshJobs();
    refreshDatasets();
  });
  $("generate-form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("generate-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => running?.abort());
  $("history-text").addEventListener("click", () => downloadHistory("text"));
  $("history-json").addEventListener("click", () => downloadHistory("json"));
  $("history-clear").addEventListener("click", clearHistory);
  showHistory();
  $("train-form").addEventListener("submit", submitJob);
  $("train-form").elements.dataset.addEventListener("input", describeData);
  // A time budget replaces the steps: the Steps field is off while one is given.
  $("train-form").elements.max_minutes.addEventListener("input", (event) => {
    $("train-form").elements.max_steps.disabled = event.target.value.trim() !== "";
  });
  $("job-stop").addEventListener("click", () => jobAction("DELETE", ""));
  $("job-resume").addEventListener("click", () => jobAction("POST", "/resume"));
  loadSamplingDefaults();
  refreshModel();
  refreshRuns();
  refreshJobs();
  refreshDatasets();
  setInterval(() => {
    refreshModel();
    refreshRuns();
  }, 10000);
});
