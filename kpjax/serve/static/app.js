// kpjax.serve's page: choose or drop a photo -> POST v1/predict -> the photo with its keypoints drawn
// (skeleton, left/right colours, names on hover) and a table of names, x, y and confidence.
// Plain browser JavaScript: no build step, no library, nothing fetched but this server's own API.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const LOW_CONFIDENCE = 0.5;
const $ = (id) => document.getElementById(id);
const state = { model: null, file: null, result: null, photoUrl: null, jsonUrl: null, request: 0 };

function setStatus(text, isError = false) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('error', isError);
}

function svgElement(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.appendChild(element);
  return element;
}

async function loadModel() {
  const response = await fetch('v1/model');
  const model = await response.json();
  if (!response.ok) throw new Error(model.error || response.statusText);
  state.model = model;
  const select = $('category');
  for (const category of model.categories) {
    const option = document.createElement('option');
    option.value = option.textContent = category;
    select.appendChild(option);
  }
  select.value = model.categories[0];  // preset, so that a photo predicts at once
  select.disabled = model.categories.length === 1;
  const count = model.keypoints[model.categories[0]].length;
  const set = model.keypoint_set, noun = set.noun || 'category';
  const garments = set.name === 'fashionai';  // the page's words for FashionAI's set, generic ones for the others
  document.title = `kpjax · ${garments ? 'garment' : set.name} keypoints`;
  $('set-name').textContent = `${garments ? 'garment' : set.name} keypoints`;
  $('category-label').textContent = garments ? 'Garment' : noun.charAt(0).toUpperCase() + noun.slice(1);
  const all = garments ? 'all five garments' : `every ${noun} (${model.categories.length})`;
  $('model-line').textContent = `model ${model.name}: ${model.category === 'all' ? all : model.category}` +
      `${model.category === 'all' ? '' : `, ${count} keypoints`}, ${model.input_size}×${model.input_size} input, ` +
      `${model.devices.length} device${model.devices.length === 1 ? '' : 's'}`;
  $('formats').textContent = model.formats.join(' · ');
}

async function predict() {
  if (!state.file || !state.model) return;
  const request = ++state.request;  // a later choice wins over an answer still on its way
  const params = new URLSearchParams({ category: $('category').value, flip: $('flip').checked ? 'true' : 'false' });
  setStatus(`Predicting ${state.file.name}…`);
  document.body.dataset.state = 'predicting';
  let response, answer;
  try {
    response = await fetch(`v1/predict?${params}`, {
      method: 'POST', body: state.file, headers: { 'Content-Type': state.file.type || 'application/octet-stream' },
    });
    answer = await response.json();
  } catch (error) {
    if (request === state.request) fail(`The server did not answer: ${error.message}`);
    return;
  }
  if (request !== state.request) return;
  if (!response.ok) {
    fail(answer.error || `HTTP ${response.status}`);
    return;
  }
  state.result = answer;
  await showPhoto();
  draw(answer);
  fillTable(answer);
  offerDownload(answer);
  const t = answer.timing_ms;
  setStatus(`${answer.keypoints.length} keypoints in ${Math.round(t.total)} ms ` +
            `(decode ${t.decode.toFixed(1)} ms, model ${t.model.toFixed(1)} ms in a batch of ${answer.batch_size}).`);
  document.body.dataset.state = 'done';
}

function fail(message) {
  setStatus(message, true);
  document.body.dataset.state = 'error';
}

function showPhoto() {
  // The browser shows the photo upright (EXIF orientation applied), as the server measures it.
  return new Promise((resolve) => {
    const photo = $('photo');
    const stage = $('stage');
    const { width, height } = state.result.image;
    // The stage has the photo's aspect and fills the column (small photos are enlarged, tall ones fit 72vh).
    stage.style.aspectRatio = `${width} / ${height}`;
    stage.style.width = `min(100%, calc(72vh * ${width / height}))`;
    photo.onload = () => { stage.classList.remove('blank'); photo.style.visibility = ''; resolve(); };
    photo.onerror = () => {
      // A format this browser cannot show (TIFF, say): the keypoints on a blank frame of the photo's size.
      photo.removeAttribute('src');
      photo.style.visibility = 'hidden';
      stage.classList.add('blank');
      resolve();
    };
    if (photo.dataset.file === state.file.name + state.file.size && photo.complete && photo.naturalWidth) {
      resolve();
      return;
    }
    photo.dataset.file = state.file.name + state.file.size;
    photo.src = state.photoUrl;
    $('figure').hidden = false;
    $('empty').hidden = true;
  });
}

function colour(name) {
  return state.model.colors[name] || '#ffc800';
}

function draw(answer) {
  const overlay = $('overlay');
  overlay.replaceChildren();
  const { width, height } = answer.image;
  // Pixel centres are whole numbers: pixel (0, 0) spans -0.5..0.5.
  overlay.setAttribute('viewBox', `-0.5 -0.5 ${width} ${height}`);
  const size = Math.max(width, height);
  const radius = Math.max(2.5, size / 110);
  const byName = Object.fromEntries(answer.keypoints.map((k) => [k.name, k]));
  const edges = svgElement('g', { class: 'edges' }, overlay);
  for (const [a, b] of state.model.skeleton[answer.category] || []) {
    if (!byName[a] || !byName[b]) continue;
    const centre = !a.includes('_left') && !a.includes('_right');
    svgElement('line', {
      class: 'edge', x1: byName[a].x, y1: byName[a].y, x2: byName[b].x, y2: byName[b].y,
      stroke: colour(centre ? b : a), 'stroke-width': radius * 0.55, 'stroke-opacity': 0.85,
    }, edges);
  }
  for (const k of answer.keypoints) {
    const group = svgElement('g', { class: 'kp', 'data-name': k.name }, overlay);
    const low = k.confidence < LOW_CONFIDENCE;
    svgElement('circle', {
      cx: k.x, cy: k.y, r: radius, fill: low ? '#ffffff' : colour(k.name), 'fill-opacity': low ? 0.6 : 1,
      'stroke-width': radius * 0.3,
    }, group);
    svgElement('title', {}, group).textContent =
        `${k.name} (${k.x.toFixed(1)}, ${k.y.toFixed(1)}) confidence ${k.confidence.toFixed(3)}`;
    const label = svgElement('text', {
      x: k.x + radius * 1.4, y: k.y - radius * 1.2, 'font-size': radius * 2.6, 'stroke-width': radius * 0.45,
    }, group);
    label.textContent = k.name;
    group.addEventListener('mouseenter', () => highlight(k.name, true));
    group.addEventListener('mouseleave', () => highlight(k.name, false));
  }
  const t = answer.flip ? ', flip TTA' : '';
  $('caption').textContent = `${state.file.name}: ${width}×${height} px, ${answer.category}${t}. ` +
      'Hover a point or a row to see its name.';
}

function highlight(name, on) {
  for (const element of document.querySelectorAll(`[data-name="${name}"]`)) element.classList.toggle('hot', on);
}

function fillTable(answer) {
  const body = $('keypoints').querySelector('tbody');
  body.replaceChildren();
  for (const k of answer.keypoints) {
    const row = document.createElement('tr');
    row.dataset.name = k.name;
    row.classList.toggle('low', k.confidence < LOW_CONFIDENCE);
    const name = document.createElement('td');
    const swatch = document.createElement('i');
    swatch.className = 'swatch';
    swatch.style.background = colour(k.name);
    name.append(swatch, k.name);
    const x = document.createElement('td');
    x.textContent = k.x.toFixed(1);
    const y = document.createElement('td');
    y.textContent = k.y.toFixed(1);
    const confidence = document.createElement('td');
    confidence.className = 'conf';
    const bar = document.createElement('span');
    bar.className = 'bar';
    const fill = document.createElement('i');
    fill.style.width = `${Math.round(100 * k.confidence)}%`;
    bar.appendChild(fill);
    confidence.append(k.confidence.toFixed(3), bar);
    row.append(name, x, y, confidence);
    row.addEventListener('mouseenter', () => highlight(k.name, true));
    row.addEventListener('mouseleave', () => highlight(k.name, false));
    body.appendChild(row);
  }
  $('keypoints').hidden = false;
}

function offerDownload(answer) {
  if (state.jsonUrl) URL.revokeObjectURL(state.jsonUrl);
  const record = { file: state.file.name, ...answer };
  state.jsonUrl = URL.createObjectURL(new Blob([JSON.stringify(record, null, 1)], { type: 'application/json' }));
  const link = $('download');
  link.href = state.jsonUrl;
  link.download = `${state.file.name.replace(/\.[^.]*$/, '')}.keypoints.json`;
  link.setAttribute('aria-disabled', 'false');
}

function choose(file) {
  if (!file) return;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.file = file;
  state.photoUrl = URL.createObjectURL(file);
  predict();
}

function wire() {
  $('file').addEventListener('change', (event) => choose(event.target.files[0]));
  $('category').addEventListener('change', predict);
  $('flip').addEventListener('change', predict);
  const drop = $('drop');
  for (const name of ['dragenter', 'dragover']) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add('dragging'); });
  }
  for (const name of ['dragleave', 'drop']) {
    drop.addEventListener(name, () => drop.classList.remove('dragging'));
  }
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    choose(event.dataTransfer.files[0]);
  });
  // Dropping a photo anywhere else must not navigate away from the page.
  window.addEventListener('dragover', (event) => event.preventDefault());
  window.addEventListener('drop', (event) => event.preventDefault());
}

wire();
loadModel().then(() => {
  document.body.dataset.state = 'ready';
  if (state.file) predict();
}).catch((error) => fail(`Cannot read the model: ${error.message}`));
