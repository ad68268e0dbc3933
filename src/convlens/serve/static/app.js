"use strict";
// The convlens explorer page. Every request goes to a URL relative to the page's own path, so the page works
// at any prefix (a proxy, --root-path). The view lives in the URL's hash: a link reproduces it.
// convlens.serve.app.page inlines trust.js at the marker below, inside this block.
{
  const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
  const $ = (id) => document.getElementById(id);
  const state = {image: "", method: "gradcam", layer: "auto", target: "", opacity: 0.4, compare: false,
                 method2: "layercam", layer2: "auto", unit: ""};
  let model = null;
  let generation = 0;

  const url = (path, params) => {
    const query = new URLSearchParams(params || {}).toString();
    return BASE + path + (query ? "?" + query : "");
  };

  function showError(text) {
    const box = $("message");
    box.hidden = !text;
    box.textContent = text || "";
  }

  async function call(path, params, options) {
    const response = await fetch(url(path, params), options);
    if (!response.ok) {
      let text = response.status + " " + response.statusText;
      try { text = (await response.json()).error || text; } catch (err) { /* not JSON */ }
      throw new Error(text);
    }
    return response;
  }
  const json = async (path, params, options) => (await call(path, params, options)).json();
  async function png(path, params) {
    const response = await call(path, params);
    const info = response.headers.get("X-Convlens-Info");
    return {src: URL.createObjectURL(await response.blob()), info: info ? JSON.parse(info) : null};
  }
  function setImage(img, src) {
    if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    img.dataset.url = src.startsWith("blob:") ? src : "";
    img.src = src;
  }

  // -- the view in the URL --------------------------------------------------------------------------------
  function readHash() {
    const query = new URLSearchParams(location.hash.slice(1));
    for (const key of Object.keys(state)) if (query.has(key)) state[key] = query.get(key);
    state.opacity = Math.min(1, Math.max(0, parseFloat(state.opacity))) || 0;
    if (!query.has("opacity")) state.opacity = 0.4;
    state.compare = state.compare === true || state.compare === "1";
  }
  function writeHash() {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(state)) {
      if (value === "" || value === null) continue;
      query.set(key, key === "compare" ? (value ? "1" : "0") : String(value));
    }
    history.replaceState(null, "", "#" + query.toString());
    $("permalink").href = location.href;
  }

  // -- controls ---------------------------------------------------------------------------------------------
  function fillMethods(select) {
    select.innerHTML = "";
    for (const method of model.methods) {
      const option = new Option(method.applies ? method.name : method.name + " (does not apply)", method.name);
      option.disabled = !method.applies;
      option.title = method.reason || `${method.kind} method`;
      select.add(option);
    }
  }
  function fillLayers(select) {
    select.innerHTML = "";
    select.add(new Option(`auto (${model.auto_layer})`, "auto"));
    for (const layer of model.layers) select.add(new Option(layer, layer));
  }
  function fillImages(images) {
    const select = $("image");
    select.innerHTML = "";
    for (const image of images) select.add(new Option(image.name + (image.mask ? " (mask)" : ""), image.id));
    if (state.image && ![...select.options].some((o) => o.value === state.image)) {
      select.add(new Option(state.image, state.image));
    }
  }
  const usable = (name) => model.methods.some((m) => m.name === name && m.applies);
  function syncControls() {
    if (!usable(state.method)) state.method = "gradcam";
    if (!usable(state.method2)) state.method2 = state.method;
    for (const [id, key] of [["image", "image"], ["method", "method"], ["layer", "layer"], ["method2", "method2"],
                             ["layer2", "layer2"]]) $(id).value = state[key];
    $("opacity").value = state.opacity;
    $("opacity-value").textContent = Number(state.opacity).toFixed(2);
    $("compare").checked = state.compare;
    $("compare-controls").hidden = !state.compare;
    $("panel-2").hidden = !state.compare;
  }

  // -- the views ---------------------------------------------------------------------------------------------
  const gridLayer = () => (state.layer === "auto" ? model.auto_layer : state.layer);

  async function refresh(what) {
    const token = ++generation;
    showError("");
    writeHash();
    if (!state.image) {
      showError("no image to show: upload one, or start the server with --data DIR");
      return;
    }
    try {
      if (what.has("image")) {
        const original = await png("api/image.png", {image: state.image});
        if (token !== generation) return;
        setImage($("original"), original.src);
        showPredictions((await json("api/predict", {image: state.image})).predictions);
      }
      if (what.has("heatmap")) await drawHeatmaps(token);
      if (what.has("grid")) await drawGrid(token);
    } catch (err) {
      if (token === generation) showError(err.message);
    }
  }
  const ALL = new Set(["image", "heatmap", "grid"]);

  function showPredictions(predictions) {
    const list = $("predictions");
    list.innerHTML = "";
    predictions.forEach((p, rank) => {
      const item = document.createElement("li");
      item.textContent = `${p.label} — ${(100 * p.probability).toFixed(1)} %`;
      item.dataset.index = p.index;
      item.title = "explain this class";
      const chosen = state.target === "" ? rank === 0 : String(p.index) === String(state.target);
      item.classList.toggle("target", chosen);
      item.addEventListener("click", () => {
        state.target = String(p.index);
        for (const other of list.children) other.classList.toggle("target", other === item);
        refresh(new Set(["heatmap"]));
      });
      list.appendChild(item);
    });
  }

  async function drawPanel(figure, method, layer, token) {
    const params = {image: state.image, method, layer, target: state.target, opacity: state.opacity};
    const slow = model.methods.find((m) => m.name === method).kind === "perturbation";
    const img = figure.querySelector("img");
    figure.querySelector(".job-state").textContent = "";
    let info;
    if (slow) {  // Score-CAM, Ablation-CAM: a background job with progress and cancel
      const job = await json("api/jobs/heatmap", params, {method: "POST"});
      const found = await new Promise((resolve, reject) => follow(job, figure.querySelector("progress"),
        figure.querySelector(".job-state"), figure.querySelector(".job-cancel"),
        async () => { try { resolve(await json(`api/jobs/${job.id}/result`)); } catch (err) { reject(err); } },
        () => resolve(null)));
      if (!found || token !== generation) return null;
      setImage(img, found.png);
      info = found.info;
    } else {
      const shown = await png("api/heatmap.png", params);
      if (token !== generation) return null;
      setImage(img, shown.src);
      info = shown.info;
    }
    const where = info.layer ? ` at ${info.layer}` : "";
    figure.querySelector("figcaption").textContent =
      `${info.method}${where}: ${info.target_name}${info.flat ? " (flat map)" : ""}`;
    figure.querySelector(".bar").style.background = model.methods.find((m) => m.name === info.method).colorbar;
    return info;
  }

  async function drawHeatmaps(token) {
    const first = await drawPanel($("panel-1"), state.method, state.layer, token);
    if (!first) return;
    $("target-name").textContent = state.target === "" ? `top-1 (${first.target_name})` : first.target_name;
    $("command").textContent = first.command;
    if (state.compare) await drawPanel($("panel-2"), state.method2, state.layer2, token);
  }

  let layout = null;
  async function drawGrid(token) {
    const grid = await png("api/activations.png", {image: state.image, layer: gridLayer()});
    if (token !== generation) return;
    layout = grid.info;
    $("grid").dataset.layout = JSON.stringify(layout);
    $("grid-layer").textContent = `${layout.layer} (${layout.channels} channels)`;
    const grown = Math.max(1, Math.floor(640 / layout.width));  // small grids are drawn bigger, pixels kept sharp
    $("grid").style.width = Math.min(1200, layout.width * grown) + "px";
    $("grid").style.imageRendering = grown > 1 ? "pixelated" : "auto";
    setImage($("grid"), grid.src);
    $("grid").onload = markChannel;
  }

  function channelAt(event) {
    const img = $("grid");
    const box = img.getBoundingClientRect();
    const scale = img.naturalWidth / box.width;
    const x = (event.clientX - box.left) * scale - layout.margin;
    const y = (event.clientY - box.top) * scale - layout.margin;
    const column = Math.floor(x / (layout.tile_width + layout.margin));
    const row = Math.floor(y / (layout.tile_height + layout.margin));
    if (x < 0 || y < 0 || column >= layout.columns) return null;
    const channel = row * layout.columns + column;
    return channel < layout.channels ? channel : null;
  }
  function markChannel() {
    const pick = $("grid-pick");
    const [layer, unit] = parseUnit();
    if (!layout || layer !== layout.layer || unit === null) { pick.hidden = true; return; }
    const img = $("grid");
    const scale = img.getBoundingClientRect().width / (img.naturalWidth || 1);
    pick.style.left = ((layout.margin + (unit % layout.columns) * (layout.tile_width + layout.margin)) * scale) + "px";
    pick.style.top = ((layout.margin + Math.floor(unit / layout.columns) * (layout.tile_height + layout.margin)) * scale) + "px";
    pick.style.width = (layout.tile_width * scale + 2) + "px";
    pick.style.height = (layout.tile_height * scale + 2) + "px";
    pick.hidden = false;
  }

  // -- the unit page -----------------------------------------------------------------------------------------
  function parseUnit() {
    const at = state.unit.lastIndexOf(":");
    return at < 0 ? [null, null] : [state.unit.slice(0, at), parseInt(state.unit.slice(at + 1), 10)];
  }

  async function openUnit(layer, unit) {
    state.unit = `${layer}:${unit}`;
    writeHash();
    markChannel();
    $("unit").hidden = false;
    $("unit-title").textContent = `${unit} of ${layer}`;
    $("pattern").hidden = true;
    $("pattern-state").textContent = "";
    try {
      const map = await png("api/unit/map.png", {image: state.image, layer, unit});
      setImage($("unit-map"), map.src);
      $("unit-map-caption").textContent =
        `on this image: max ${map.info.max.toPrecision(3)}, mean ${map.info.mean.toPrecision(3)}`;
      showAtlas(await json("api/unit", {layer, unit}));
    } catch (err) {
      showError(err.message);
    }
  }

  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function showAtlas(found) {
    const box = $("unit-atlas");
    const examples = $("examples");
    box.innerHTML = "";
    examples.innerHTML = "";
    const atlas = found.atlas;
    if (!atlas) {
      box.textContent = model.atlas ? `The atlas has no layer ${found.layer} (its layers: ${model.atlas.layers.join(", ")}). `
                                    : "No atlas yet (--atlas gives one). ";
      dissectButton(box, found);
      return;
    }
    const facts = document.createElement("p");
    const label = atlas.label ? `detects “${atlas.label}” (IoU ${atlas.iou.toFixed(3)})`
                              : atlas.dissected ? `detects no concept (best IoU ${(atlas.iou || 0).toFixed(3)})`
                                                : "not dissected";
    const selectivity = atlas.selectivity === null ? "-" : atlas.selectivity.toFixed(3);
    facts.id = "unit-label";
    facts.textContent = `Dissection: ${label}. Class selectivity: ${selectivity}.`;
    box.appendChild(facts);
    const table = document.createElement("table");
    table.createTHead().insertRow().append(...["class", "mean activation"].map((t) => {
      const th = document.createElement("th"); th.textContent = t; return th;
    }));
    const body = table.createTBody();
    for (const c of atlas.class_means) {
      const row = body.insertRow();
      cell(row, c.class);
      cell(row, c.mean === null ? "-" : c.mean.toPrecision(3), "num");
    }
    box.appendChild(table);
    const [layer, unit] = [found.layer, found.unit];
    for (const top of atlas.top) {
      for (const kind of ["whole", "crop"]) {
        const figure = document.createElement("figure");
        const img = document.createElement("img");
        img.alt = `${kind} top image ${top.rank + 1}`;
        img.className = "example";
        const caption = document.createElement("figcaption");
        caption.textContent = `${kind === "whole" ? "#" + (top.rank + 1) : "where it fires"}: ${top.value.toPrecision(3)}`;
        caption.title = top.key;
        figure.append(img, caption);
        examples.appendChild(figure);
        png("api/unit/example.png", {layer, unit, rank: top.rank, kind})
          .then((shown) => setImage(img, shown.src)).catch((err) => showError(err.message));
      }
    }
  }

  function follow(job, bar, label, cancel, onDone, onFail) {
    if (job.state === "done") { label.textContent = job.cached ? "from the cache" : "done"; onDone(job); return; }
    bar.hidden = false;
    cancel.hidden = false;
    cancel.onclick = () => fetch(url(`api/jobs/${job.id}`), {method: "DELETE"});
    const events = new EventSource(url(`api/jobs/${job.id}/events`));
    events.onmessage = (event) => {
      const now = JSON.parse(event.data);
      bar.max = now.total || 1;
      bar.value = now.done;
      label.textContent = now.state + (now.total ? ` ${now.done}/${now.total}` : "");
      if (["done", "error", "cancelled"].includes(now.state)) {
        events.close();
        bar.hidden = true;
        cancel.hidden = true;
        if (now.state === "done") onDone(now);
        else {
          label.textContent = now.state + (now.message ? ": " + now.message : "");
          if (onFail) onFail(now);
        }
      }
    };
    events.onerror = () => events.close();
  }

  function dissectButton(box, found) {
    // Network Dissection of this layer on the served data (or generated shapes), as a background job.
    const start = document.createElement("button");
    start.id = "dissect";
    start.textContent = `dissect ${found.layer}`;
    const bar = document.createElement("progress");
    const label = document.createElement("span");
    const cancel = document.createElement("button");
    cancel.textContent = "cancel";
    bar.hidden = cancel.hidden = true;
    start.onclick = async () => {
      try {
        const job = await json("api/jobs/dissect", {layers: found.layer}, {method: "POST"});
        follow(job, bar, label, cancel, () => openUnit(found.layer, found.unit));
      } catch (err) {
        showError(err.message);
      }
    };
    box.append(start, " ", bar, " ", label, " ", cancel);
  }

  async function startPattern() {
    const [layer, unit] = parseUnit();
    try {
      const job = await json("api/jobs/pattern", {layer, unit}, {method: "POST"});
      follow(job, $("pattern-progress"), $("pattern-state"), $("pattern-cancel"), async () => {
        const shown = await png(`api/jobs/${job.id}/result`);
        setImage($("pattern"), shown.src);
        $("pattern").hidden = false;
      });
    } catch (err) {
      showError(err.message);
    }
  }

  // -- wiring --------------------------------------------------------------------------------------------------
  function bind() {
    $("image").addEventListener("change", (e) => { state.image = e.target.value; state.target = ""; refresh(ALL); });
    $("method").addEventListener("change", (e) => { state.method = e.target.value; refresh(new Set(["heatmap"])); });
    $("method2").addEventListener("change", (e) => { state.method2 = e.target.value; refresh(new Set(["heatmap"])); });
    $("layer").addEventListener("change", (e) => { state.layer = e.target.value; refresh(new Set(["heatmap", "grid"])); });
    $("layer2").addEventListener("change", (e) => { state.layer2 = e.target.value; refresh(new Set(["heatmap"])); });
    $("opacity").addEventListener("input", (e) => { $("opacity-value").textContent = Number(e.target.value).toFixed(2); });
    $("opacity").addEventListener("change", (e) => { state.opacity = parseFloat(e.target.value); refresh(new Set(["heatmap"])); });
    $("compare").addEventListener("change", (e) => { state.compare = e.target.checked; syncControls(); refresh(new Set(["heatmap"])); });
    $("target-reset").addEventListener("click", () => { state.target = ""; refresh(new Set(["image", "heatmap"])); });
    $("grid").addEventListener("click", (e) => {
      const channel = layout ? channelAt(e) : null;
      if (channel !== null) openUnit(layout.layer, channel);
    });
    $("unit-close").addEventListener("click", () => { state.unit = ""; $("unit").hidden = true; markChannel(); writeHash(); });
    $("pattern-start").addEventListener("click", startPattern);
    $("trust-start").addEventListener("click", startTrust);
    $("save").addEventListener("click", saveView);
    $("upload").addEventListener("change", async (e) => {
      const file = e.target.files[0];
      if (!file) return;
      try {
        const sent = await json("api/upload", {name: file.name}, {method: "POST", body: file});
        $("image").add(new Option(`${file.name} (uploaded)`, sent.id));
        state.image = sent.id;
        state.target = "";
        $("image").value = sent.id;
        refresh(ALL);
      } catch (err) {
        showError(err.message);
      }
    });
  }

  async function init() {
    readHash();
    try {
      model = await json("api/model");
      $("model-name").textContent = `${model.name} (input ${model.input_size.join("×")})`;
      fillMethods($("method"));
      fillMethods($("method2"));
      fillLayers($("layer"));
      fillLayers($("layer2"));
      const images = (await json("api/images")).images;
      if (!state.image && images.length) state.image = images[0].id;
      fillImages(images);
    } catch (err) {
      showError(err.message);
      return;
    }
    syncControls();
    bind();
    await refresh(ALL);
    const [layer, unit] = parseUnit();
    if (layer !== null) openUnit(layer, unit);
    document.body.dataset.ready = "1";
  }

  /*TRUST_JS*/

  init();
}
