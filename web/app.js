// The drop page: the key, the files of the batch (drop, pick, progress, pause/resume/remove),
// and the smartlink generation. Plain modules, no build step; no inline script or style (the
// page is served with Content-Security-Policy: default-src 'self').

import { Api, ApiError, KEY_REFUSED, sentence } from './api.js';
import * as fmt from './format.js';
import { Generator } from './generate.js';
import { Memory } from './memory.js';
import { COMPLETE, ERROR, PAUSED, QUEUED, UPLOADING, Uploader } from './upload.js';

const KEY_STORE = 'filedrop.api-key'; // sessionStorage: this tab only
const STATE_LABEL = {
  [QUEUED]: 'Queued', [UPLOADING]: 'Uploading', [PAUSED]: 'Paused', [COMPLETE]: 'Complete', [ERROR]: 'Error',
};

const $ = (id) => document.getElementById(id);
const el = {
  keyForm: $('key-form'), key: $('api-key'), keyForget: $('key-forget'), keyMessage: $('key-message'),
  files: $('files-section'), generate: $('generate-section'), batchId: $('batch-id'),
  newBatch: $('new-batch'), zone: $('drop-zone'), fileInput: $('file-input'), folderInput: $('folder-input'),
  limits: $('limits-line'), filesMessage: $('files-message'), total: $('total'),
  totalProgress: $('total-progress'), totalText: $('total-text'), list: $('file-list'),
  rowTemplate: $('file-row-template'),
};

let uploader = null;
let generator = null;
let api = null; // the Api of the key in use (the uploader's and the generator's)
const rows = new Map(); // fileIdx -> <li>

function say(target, text, isError = false) {
  target.textContent = text;
  target.classList.toggle('error', isError);
}

// -- the key ---------------------------------------------------------------------------------
async function useKey(raw) {
  const key = raw.trim();
  if (!key) {
    say(el.keyMessage, 'Enter the API key.', true);
    el.key.focus();
    return;
  }
  say(el.keyMessage, 'Checking the key…');
  const next = new Api(key);
  let limits;
  try {
    // /api/limits needs a key: it tells whether this one is accepted, and the chunk size.
    limits = await next.retrying(() => next.json('GET', '/api/limits'), {
      attempts: 4, onRetry: (e) => say(el.keyMessage, `${sentence(e.message)} Retrying…`),
    });
  } catch (e) {
    if (e instanceof ApiError && e.keyRefused) {
      sessionStorage.removeItem(KEY_STORE);
      say(el.keyMessage, KEY_REFUSED, true);
      el.key.setAttribute('aria-invalid', 'true');
      el.key.focus();
      el.key.select();
    } else {
      say(el.keyMessage, `The key could not be checked: ${e.message}`, true);
    }
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  api?.forget(); // a key entered again replaces the one before
  api = next;
  el.key.removeAttribute('aria-invalid');
  el.keyForget.hidden = false;
  api.onKeyRefused = keyRefused;
  say(el.keyMessage, 'Key accepted.');
  if (uploader) {
    uploader.restart(api);
    generator.setApi(api);
    return;
  }
  await start(api, limits);
}

function keyRefused() {
  sessionStorage.removeItem(KEY_STORE);
  say(el.keyMessage, KEY_REFUSED, true);
  el.key.setAttribute('aria-invalid', 'true');
  uploader?.stopAll('Paused: the key was refused. Enter a valid key to go on.');
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  api?.forget(); // the uploader and the generator hold it: nothing more is sent with it
  el.key.value = '';
  el.keyForget.hidden = true;
  uploader?.stopAll('Paused: no key. Enter the key to go on.');
  say(el.keyMessage, 'The key is forgotten in this tab.');
  el.key.focus();
}

// -- the files -------------------------------------------------------------------------------
async function start(api, limits) {
  const memory = new Memory();
  uploader = new Uploader(api, memory, limits);
  generator = new Generator(api, uploader, memory, limits);
  const largest = Math.min(limits.maxFileSize, limits.maxChunkSize * limits.maxChunksPerFile);
  say(el.limits, `Sent in chunks of ${fmt.bytes(limits.chunkSize)}. At most ${fmt.bytes(largest)} a file, `
    + `${limits.maxFilesPerBatch} files and ${fmt.bytes(limits.maxBatchBytes)} a batch.`);
  uploader.addEventListener('change', (e) => schedule(e.detail));
  uploader.addEventListener('added', (e) => schedule(e.detail));
  uploader.addEventListener('progress', () => schedule(null));
  uploader.addEventListener('removed', (e) => removeRow(e.detail));
  uploader.addEventListener('batch', () => { showBatch(); renderAll(); });
  uploader.addEventListener('gone', (e) => {
    const { again, lost } = e.detail;
    let text = 'The batch is gone from the server (dropped or expired), or is another key\'s: ';
    if (again === 1) text += 'the file not yet complete goes up again in a new batch.';
    else if (again) text += `the ${again} files not yet complete go up again in a new batch.`;
    else text += 'a new one starts with the next file.';
    if (lost.length) text += ` Gone with it, add again if needed: ${lost.join(', ')}.`;
    say(el.filesMessage, text);
  });
  el.files.hidden = false;
  el.generate.hidden = false;
  showBatch();
  try {
    if (!(await uploader.restore())) {
      say(el.filesMessage, 'The batch this page remembered is gone (dropped, used or expired): '
        + 'a new one starts with the next file.');
    }
    await generator.restore();
  } catch (e) {
    say(el.filesMessage, `The remembered batch could not be read: ${e.message}`, true);
  }
  renderAll();
}

function showBatch() {
  el.batchId.textContent = uploader.batchId || 'none yet: it starts with the first file';
  el.newBatch.disabled = !uploader.batchId;
}

function addFiles(entries, left = 0) {
  if (!entries.length && !left) return;
  const { refused } = uploader.add(entries);
  if (left) {
    refused.push(`${left} ${left === 1 ? 'file' : 'files'} of what was dropped: a batch holds at most `
      + `${uploader.limits.maxFilesPerBatch} files (FILEDROP_MAX_FILES_PER_BATCH)`);
  }
  say(el.filesMessage, refused.length ? `Not added: ${refused.join('; ')}.` : '', refused.length > 0);
}

function fromInput(input) {
  const entries = [...input.files].map((file) => ({ file, relPath: file.webkitRelativePath || file.name }));
  input.value = ''; // the same file can be picked again
  addFiles(entries);
}

// Dropped folders are walked (readEntries answers in batches until an empty one). Files past
// the batch's limit are only counted (`left`), so that the page can say they were left out.
async function dropped(dataTransfer) {
  const roots = [...dataTransfer.items].filter((i) => i.kind === 'file').map((i) => i.webkitGetAsEntry?.());
  if (!roots.length || roots.some((r) => !r)) {
    return { entries: [...dataTransfer.files].map((file) => ({ file, relPath: file.name })), left: 0 };
  }
  const out = [];
  let left = 0;
  const most = uploader.limits.maxFilesPerBatch;
  async function walk(entry, prefix) {
    if (entry.isFile) {
      if (out.length >= most) {
        left++;
        return;
      }
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      out.push({ file, relPath: prefix + file.name });
      return;
    }
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
    }
  }
  for (const root of roots) await walk(root, '');
  return { entries: out, left };
}

// -- rendering -------------------------------------------------------------------------------
const dirty = new Set();
let renderTimer = null;

function schedule(upload) {
  if (upload) dirty.add(upload.fileIdx);
  else for (const u of uploader.list()) if (u.state === UPLOADING) dirty.add(u.fileIdx);
  if (renderTimer === null) renderTimer = setTimeout(flush, 50);
}

function flush() {
  renderTimer = null;
  for (const idx of dirty) {
    const u = uploader.uploads.get(idx);
    if (u) renderRow(u);
  }
  dirty.clear();
  renderTotal();
}

function renderAll() {
  for (const [idx, li] of rows) {
    if (!uploader.uploads.has(idx)) {
      li.remove();
      rows.delete(idx);
    }
  }
  for (const u of uploader.list()) renderRow(u);
  renderTotal();
}

function rowFor(u) {
  let li = rows.get(u.fileIdx);
  if (li) return li;
  li = el.rowTemplate.content.firstElementChild.cloneNode(true);
  li.dataset.fileIdx = String(u.fileIdx);
  rows.set(u.fileIdx, li);
  el.list.append(li);
  return li;
}

function renderRow(u) {
  const li = rowFor(u);
  li.dataset.state = u.state;
  if (u.sha256) li.dataset.sha256 = u.sha256;
  else delete li.dataset.sha256;
  li.querySelector('.file-name').textContent = u.relPath;
  li.querySelector('.file-state').textContent = STATE_LABEL[u.state];
  const progress = li.querySelector('.file-progress');
  progress.value = u.size ? u.sent / u.size : (u.state === COMPLETE ? 1 : 0);
  progress.setAttribute('aria-label', `${u.relPath} uploaded`);
  // No speed while a chunk waits to be retried: the last one measured no longer holds.
  li.querySelector('.file-figures').textContent = u.state === COMPLETE ? ''
    : fmt.progressLine(u.sent, u.size, u.retryNote ? 0 : u.rate);
  const note = li.querySelector('.file-note');
  note.textContent = u.note;
  note.classList.toggle('error', u.state === ERROR);
  li.querySelector('.file-done').hidden = u.state !== COMPLETE;
  li.querySelector('.file-size').textContent = `${fmt.bytes(u.size)} (${u.size} bytes)`;
  li.querySelector('.file-sha256').textContent = u.sha256 || '';
  const toggle = li.querySelector('[data-action="toggle"]');
  const running = u.state === QUEUED || u.state === UPLOADING;
  toggle.hidden = u.state === COMPLETE;
  toggle.textContent = running ? 'Pause' : (u.state === ERROR ? 'Retry' : 'Resume');
  toggle.setAttribute('aria-label', `${toggle.textContent} ${u.relPath}`);
  toggle.disabled = !running && u.needsFile;
  li.querySelector('[data-action="remove"]').setAttribute('aria-label', `Remove ${u.relPath}`);
}

function removeRow(u) {
  const li = rows.get(u.fileIdx);
  if (!li) return;
  const focusWasInside = li.contains(document.activeElement);
  const next = li.nextElementSibling || li.previousElementSibling;
  li.remove();
  rows.delete(u.fileIdx);
  if (focusWasInside) (next?.querySelector('[data-action="remove"]') || el.fileInput).focus();
  renderTotal();
}

function renderTotal() {
  const list = uploader.list();
  el.total.hidden = list.length === 0;
  const { size, sent, rate } = uploader.totals();
  el.totalProgress.value = size ? sent / size : (list.length ? 1 : 0);
  const complete = list.filter((u) => u.state === COMPLETE).length;
  say(el.totalText, `${complete} of ${list.length} ${list.length === 1 ? 'file' : 'files'} complete; `
    + fmt.progressLine(sent, size, rate));
  el.newBatch.disabled = !uploader.batchId || uploader.busy();
}

// -- wiring ----------------------------------------------------------------------------------
el.keyForm.addEventListener('submit', (e) => {
  e.preventDefault();
  useKey(el.key.value);
});
el.keyForget.addEventListener('click', forgetKey);
el.fileInput.addEventListener('change', () => fromInput(el.fileInput));
el.folderInput.addEventListener('change', () => fromInput(el.folderInput));
el.newBatch.addEventListener('click', () => {
  uploader.newBatch();
  say(el.filesMessage, 'A new batch starts with the next file (the previous one stays on the server until it expires).');
});
el.list.addEventListener('click', (e) => {
  const button = e.target.closest('button[data-action]');
  if (!button) return;
  const u = uploader.uploads.get(Number(button.closest('li').dataset.fileIdx));
  if (!u) return;
  if (button.dataset.action === 'remove') {
    uploader.remove(u).catch((err) => say(el.filesMessage, `${u.name} could not be removed on the server: ${err.message}`, true));
  } else if (u.state === QUEUED || u.state === UPLOADING) {
    uploader.pause(u);
  } else {
    uploader.resume(u);
  }
});
// Files dropped anywhere on the page go to the batch (and never make the browser open them).
window.addEventListener('dragover', (e) => {
  e.preventDefault();
  if (!el.files.hidden) el.zone.classList.add('over');
});
window.addEventListener('dragleave', (e) => {
  if (e.relatedTarget === null) el.zone.classList.remove('over');
});
window.addEventListener('drop', async (e) => {
  e.preventDefault();
  el.zone.classList.remove('over');
  if (el.files.hidden || !uploader) return;
  try {
    const { entries, left } = await dropped(e.dataTransfer);
    addFiles(entries, left);
  } catch (err) {
    say(el.filesMessage, `The dropped files could not be read: ${err.message}`, true);
  }
});

const saved = sessionStorage.getItem(KEY_STORE);
if (saved) {
  el.key.value = saved;
  useKey(saved);
}
