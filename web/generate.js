// Generating smartlinks from the batch: SmartLinks.Generate on the upload batch (kept with
// X-Batch-No-Drop), then the job followed live (status, log) until it ends, and its links.

import { ApiError, isAbort, sentence, sleep } from './api.js';
import { bytes } from './format.js';
import { COMPLETE } from './upload.js';

const TERMINAL = new Set(['Completed', 'Completed with errors', 'Cancelled', 'Failed']);
const LINKS_SHOWN = 1000; // more are in the CSV; thousands of rows in the page help nobody
const LOG_SHOWN = 200;

function enc(s) {
  return encodeURIComponent(s);
}

function jobPath(job, what) {
  return `/api/batch/${enc(job.batch_id)}/${enc(job.job_id)}/${what}`;
}

function say(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle('error', isError);
}

export function describe(job) {
  const done = (job.succeededCount || 0) + (job.erroredCount || 0);
  let text = `${job.status}: ${done} of ${job.totalCount ?? '?'} rows done, ${job.succeededCount || 0} succeeded, `
    + `${job.erroredCount || 0} errored`;
  if (job.reason) text += `. ${job.reason}`;
  return text;
}

// Copy `text` to the clipboard: the Clipboard API where the page is a secure context, else the
// older selection + copy command.
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = document.createElement('textarea');
  area.value = text;
  area.setAttribute('readonly', '');
  area.className = 'offscreen';
  document.body.append(area);
  area.select();
  const ok = document.execCommand('copy');
  area.remove();
  if (!ok) throw new Error('the browser refused to copy');
}

export class Generator {
  constructor(api, uploader, memory, limits) {
    this.api = api;
    this.uploader = uploader;
    this.memory = memory;
    this.limits = limits;
    this.job = null;
    this.controller = null;
    this.starting = false;
    this.interrupted = false; // the job's polls stopped on an error (no key, key refused)
    const $ = (id) => document.getElementById(id);
    this.el = {
      form: $('generate-form'), template: $('template-file'), data: $('data-file'),
      fromFile: $('data-from-file'), fromPaste: $('data-from-paste'), paste: $('data-paste'),
      strategy: $('strategy'), maxErrors: $('max-errors'), start: $('generate'), cancel: $('job-cancel'),
      message: $('generate-message'), job: $('job'), jobId: $('job-id'), status: $('job-status'),
      progress: $('job-progress'), logCount: $('job-log-count'), log: $('job-log'), result: $('job-result'),
      links: $('links'), linksMessage: $('links-message'), errored: $('errored'),
      erroredHeading: $('errored-heading'), csv: $('download-csv'), copyAll: $('copy-all'),
      linkTemplate: $('link-template'),
    };
    this.el.form.addEventListener('submit', (e) => { e.preventDefault(); this.start(); });
    this.el.cancel.addEventListener('click', () => this.cancel());
    this.el.csv.addEventListener('click', () => this.downloadCsv());
    this.el.copyAll.addEventListener('click', () => this.copyLinks([...this.el.links.querySelectorAll('a')].map((a) => a.href)));
    this.el.links.addEventListener('click', (e) => {
      const button = e.target.closest('button[data-action="copy"]');
      if (button) this.copyLinks([button.parentElement.querySelector('a').href]);
    });
    this.el.paste.addEventListener('input', () => { if (this.el.paste.value.trim()) this.el.fromPaste.checked = true; });
    this.el.data.addEventListener('change', () => { this.el.fromFile.checked = true; });
    // The choices follow the batch file by file: a file complete adds its option, a file removed
    // takes its option away, and only a new (or restored) batch rebuilds both lists. A batch of
    // n files costs n small changes, not n lists of n options.
    this.wanted = new Map([[this.el.template, null], [this.el.data, null]]); // select -> fileIdx
    this.options = new Map([[this.el.template, new Map()], [this.el.data, new Map()]]); // select -> fileIdx -> <option>
    for (const select of this.wanted.keys()) {
      select.addEventListener('change', () => this.wanted.set(select, select.value === '' ? null : Number(select.value)));
    }
    uploader.addEventListener('complete', (e) => { this.addChoice(e.detail); this.pickChoices(); });
    uploader.addEventListener('removed', (e) => { this.removeChoice(e.detail.fileIdx); this.pickChoices(); });
    uploader.addEventListener('batch', () => this.refreshChoices());
    this.refreshChoices();
  }

  // A key entered again: the job whose polls stopped on an error is followed again, as after
  // a reload.
  setApi(api) {
    this.api = api;
    if (this.interrupted) {
      this.interrupted = false;
      say(this.el.message, '');
      this.restore();
    }
  }

  // The template and data choices: the batch's complete files, by name (with the fileIdx when two
  // share a name), in fileIdx order. Rebuilt whole from the uploader's files.
  refreshChoices() {
    this.names = new Map(); // fileIdx -> name, of the complete files
    this.order = []; // their fileIdx, ascending
    this.byName = new Map(); // name -> Set of fileIdx
    for (const [select, options] of this.options) {
      select.replaceChildren();
      options.clear();
    }
    const complete = this.uploader.list().filter((u) => u.state === COMPLETE).sort((a, b) => a.fileIdx - b.fileIdx);
    for (const u of complete) this.addChoice(u);
    this.pickChoices();
  }

  label(fileIdx) {
    const name = this.names.get(fileIdx);
    return this.byName.get(name).size > 1 ? `${name} (file ${fileIdx})` : name;
  }

  // Where `fileIdx` is, or would go, in this.order.
  position(fileIdx) {
    let lo = 0;
    let hi = this.order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.order[mid] < fileIdx) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  relabel(name) {
    for (const idx of this.byName.get(name) || []) {
      for (const options of this.options.values()) options.get(idx).text = this.label(idx);
    }
  }

  addChoice(u) {
    if (u.state !== COMPLETE || this.names.has(u.fileIdx) || this.uploader.uploads.get(u.fileIdx) !== u) return;
    const pos = this.position(u.fileIdx);
    this.order.splice(pos, 0, u.fileIdx);
    this.names.set(u.fileIdx, u.name);
    if (!this.byName.has(u.name)) this.byName.set(u.name, new Set());
    this.byName.get(u.name).add(u.fileIdx);
    const next = this.order[pos + 1];
    for (const [select, options] of this.options) {
      const option = new Option(this.label(u.fileIdx), String(u.fileIdx));
      select.insertBefore(option, next === undefined ? null : options.get(next));
      options.set(u.fileIdx, option);
    }
    if (this.byName.get(u.name).size === 2) this.relabel(u.name);
  }

  removeChoice(fileIdx) {
    const name = this.names.get(fileIdx);
    if (name === undefined) return;
    this.names.delete(fileIdx);
    this.order.splice(this.position(fileIdx), 1);
    const same = this.byName.get(name);
    same.delete(fileIdx);
    if (!same.size) this.byName.delete(name);
    for (const options of this.options.values()) {
      options.get(fileIdx).remove();
      options.delete(fileIdx);
    }
    if (same.size === 1) this.relabel(name);
  }

  // Each list shows what was chosen (by the user, or picked before) while that file is there;
  // else a pick: for the template a JSON file named like one, else the first JSON file, else the
  // first; for the data another file, JSON lines first.
  pickChoices() {
    const { template, data } = this.el;
    const there = (idx) => idx !== null && this.names.has(idx);
    const first = (ok) => this.order.find((idx) => ok(this.names.get(idx), idx)) ?? null;
    if (!there(this.wanted.get(template))) {
      this.wanted.set(template, first((n) => /template|master|smartlink/i.test(n) && /\.json$/i.test(n))
        ?? first((n) => /\.json$/i.test(n)) ?? first(() => true));
    }
    const chosen = this.wanted.get(template);
    if (!there(this.wanted.get(data))) {
      this.wanted.set(data, first((n, idx) => idx !== chosen && /\.(jsonl?|ndjson)$/i.test(n))
        ?? first((n, idx) => idx !== chosen));
    }
    for (const [select, idx] of this.wanted) {
      const value = idx === null ? '' : String(idx);
      if (select.value !== value) select.value = value;
      select.disabled = this.order.length === 0;
    }
  }

  async start() {
    if (this.starting) return;
    say(this.el.message, '');
    const template = this.el.template.value;
    if (template === '') {
      say(this.el.message, 'Choose the template file first (upload it above).', true);
      this.el.template.focus();
      return;
    }
    this.starting = true;
    this.el.start.disabled = true;
    try {
      let data;
      if (this.el.fromPaste.checked) {
        data = await this.uploadPasted();
        if (data === null) return;
      } else {
        data = this.el.data.value;
        if (data === '') {
          say(this.el.message, 'Choose the data file, or paste the rows.', true);
          this.el.data.focus();
          return;
        }
      }
      const params = { template: Number(template), data: Number(data), strategy: this.el.strategy.value };
      const maxErrors = this.el.maxErrors.value.trim();
      if (maxErrors !== '') params.max_errors = Number(maxErrors);
      say(this.el.message, 'Starting the job…');
      const batchId = this.uploader.batchId;
      // An identical start is answered with the running job, so a retried start makes no second job.
      const job = await this.api.retrying(() => this.api.json('POST', `/api/v1/upload/${enc(batchId)}/execute/SmartLinks.Generate`, {
        headers: { 'Content-Type': 'application/json', 'X-Batch-No-Drop': 'true' },
        body: JSON.stringify({ params }),
      }), { attempts: 5, onRetry: (e) => say(this.el.message, `${sentence(e.message)} Retrying…`) });
      say(this.el.message, '');
      this.follow(job);
    } catch (e) {
      say(this.el.message, e instanceof ApiError ? e.message : String(e.message || e), true);
    } finally {
      this.starting = false;
      this.el.start.disabled = false;
    }
  }

  // Pasted rows become a file of the batch (the operation reads files of the batch).
  async uploadPasted() {
    const text = this.el.paste.value.trim();
    if (!text) {
      say(this.el.message, 'Paste the data rows first (a JSON array, or one JSON object a line).', true);
      this.el.paste.focus();
      return null;
    }
    const file = new File([text], `pasted-rows-${new Date().toISOString().replace(/[:.]/g, '-')}.json`,
      { type: 'application/json' });
    if (file.size > this.limits.maxDataSize) {
      say(this.el.message, `The pasted rows are ${bytes(file.size)}, over the ${bytes(this.limits.maxDataSize)} `
        + 'a job accepts (FILEDROP_MAX_DATA_SIZE).', true);
      return null;
    }
    say(this.el.message, 'Uploading the pasted rows…');
    const { added, refused } = this.uploader.add([{ file }]);
    if (!added.length) {
      say(this.el.message, refused.join(' '), true);
      return null;
    }
    await this.uploader.whenComplete(added[0]);
    this.el.paste.value = '';
    this.el.fromFile.checked = true;
    this.el.data.value = String(added[0].fileIdx);
    this.wanted.set(this.el.data, added[0].fileIdx);
    return added[0].fileIdx;
  }

  // After a reload: the job this page started last, if the server still has it.
  async restore() {
    const { job } = this.memory;
    if (!job) return;
    try {
      this.follow(await this.api.json('GET', jobPath(job, 'status')));
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        this.memory.setJob(null);
      }
    }
  }

  async follow(job) {
    this.controller?.abort();
    const controller = new AbortController();
    this.controller = controller;
    const { signal } = controller;
    this.job = job;
    this.interrupted = false;
    this.memory.setJob({ batch_id: job.batch_id, job_id: job.job_id });
    this.el.job.hidden = false;
    this.el.result.hidden = true;
    this.el.links.replaceChildren();
    this.el.errored.replaceChildren();
    this.el.log.replaceChildren();
    this.el.jobId.textContent = job.job_id;
    this.render(job);
    try {
      for (let n = 0; !TERMINAL.has(job.status); n++) {
        this.el.cancel.hidden = false;
        await sleep(Math.min(1000, 200 + 100 * n), signal);
        job = await this.api.retrying(() => this.api.json('GET', jobPath(job, 'status'), { signal }), {
          signal, onRetry: (e) => say(this.el.message, `${sentence(e.message)} Retrying…`),
        });
        say(this.el.message, '');
        this.job = job;
        this.render(job);
        if (n % 3 === 2) await this.showLog(job, signal);
      }
      this.el.cancel.hidden = true;
      await this.showLog(job, signal);
      await this.showResult(job, signal);
    } catch (e) {
      if (isAbort(e)) return;
      if (this.controller === controller) this.interrupted = true;
      say(this.el.message, e.message || String(e), true);
    }
  }

  render(job) {
    this.el.status.textContent = describe(job);
    this.el.status.dataset.status = job.status;
    const total = job.totalCount || 0;
    this.el.progress.max = Math.max(1, total);
    this.el.progress.value = (job.succeededCount || 0) + (job.erroredCount || 0);
  }

  async showLog(job, signal) {
    const body = await this.api.retrying(() => this.api.json('GET', jobPath(job, 'log'), { signal }), { signal });
    const entries = body.log || [];
    this.el.logCount.textContent = String(entries.length);
    this.el.log.replaceChildren(...entries.slice(-LOG_SHOWN).map((e) => {
      const li = document.createElement('li');
      li.className = `log-${e.level}`;
      const at = document.createElement('time');
      at.textContent = e.at;
      li.append(at, ` ${String(e.level).toUpperCase()} ${e.message}`);
      return li;
    }));
  }

  async showResult(job, signal) {
    const body = await this.api.retrying(() => this.api.json('GET', jobPath(job, 'result'), { signal }), { signal });
    const rows = body.rows || [];
    const links = rows.filter((r) => r.url);
    const errored = rows.filter((r) => r.status === 'errored');
    this.el.links.replaceChildren(...links.slice(0, LINKS_SHOWN).map((r) => {
      const li = this.el.linkTemplate.content.firstElementChild.cloneNode(true);
      const a = li.querySelector('a');
      a.href = r.url;
      a.textContent = r.url;
      li.querySelector('button').setAttribute('aria-label', `Copy the link of ${r.reference_id}`);
      return li;
    }));
    say(this.el.linksMessage, links.length > LINKS_SHOWN
      ? `The first ${LINKS_SHOWN} of ${links.length} links; the CSV has them all.`
      : `${links.length} ${links.length === 1 ? 'link' : 'links'}.`);
    this.el.errored.replaceChildren(...errored.slice(0, LINKS_SHOWN).map((r) => {
      const li = document.createElement('li');
      li.textContent = `${r.reference_id}: ${r.error}`;
      return li;
    }));
    this.el.erroredHeading.hidden = errored.length === 0;
    this.el.result.hidden = false;
  }

  async cancel() {
    if (!this.job) return;
    try {
      this.render(await this.api.json('POST', jobPath(this.job, 'cancel')));
    } catch (e) {
      say(this.el.message, e.message, true);
    }
  }

  async copyLinks(urls) {
    try {
      await copyText(urls.join('\n'));
      say(this.el.linksMessage, urls.length === 1 ? 'Link copied.' : `${urls.length} links copied.`);
    } catch (e) {
      say(this.el.linksMessage, `Could not copy: ${e.message}`, true);
    }
  }

  // The CSV needs the key, so it is fetched here and handed to the browser as a download.
  async downloadCsv() {
    if (!this.job) return;
    try {
      const res = await this.api.request('GET', `${jobPath(this.job, 'result')}?format=csv`, { headers: { Accept: 'text/csv' } });
      const url = URL.createObjectURL(await res.blob());
      const a = document.createElement('a');
      a.href = url;
      a.download = `${this.job.job_id}.csv`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (e) {
      say(this.el.linksMessage, e.message, true);
    }
  }
}
