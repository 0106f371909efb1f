// The uploader: every file of the batch goes up in chunks of the size the server announced
// (GET /api/limits), a few chunks in flight per file and a few files at once, each chunk retried
// with backoff on network errors and 503 (longer when Retry-After asks). What is on the server
// is the truth: before it sends anything, and again once it thinks it is done, a file asks the
// server which chunk ids it has (GET /api/v1/upload/{batchId}/{fileIdx}) and sends only the
// others; the same after a page reload, when the user picks the file again and it is matched to
// what localStorage remembered. A chunk answered 201 with the file's "sha256" (the server
// completed the file with it) makes that second question unneeded: the answer is the server's.

import { ApiError, isAbort, retryDelay, sentence, sleep } from './api.js';

export const QUEUED = 'queued';
export const UPLOADING = 'uploading';
export const PAUSED = 'paused';
export const COMPLETE = 'complete';
export const ERROR = 'error';

const FILES_AT_ONCE = 3;
const CHUNKS_PER_FILE = 3;
// Browsers open at most 6 connections per host; 4 for chunks leaves room for the rest.
const CHUNKS_AT_ONCE = 4;
const ASSEMBLY_WAIT_MS = 30 * 60 * 1000; // most a file is waited for once all its chunks are in
const NEED_FILE = 'Choose or drop this file again to resume it.';
const SHA256 = /^[0-9a-f]{64}$/;

// File names the server refuses (server/api/uploads.py, decode_file_name): control characters,
// path separators, "." and "..", only whitespace, format characters (Cf) but the joiners
// ZWNJ/ZWJ, line and paragraph separators (Zl, Zp), noncharacters, over 255 bytes of UTF-8.
// A lone surrogate cannot be sent at all (it is no UTF-8).
const NAME_FORBIDDEN = /[\x00-\x1f\x7f-\x9f/\\]/u;
const NAME_INVISIBLE = /(?![\u200c\u200d])[\p{Cf}\p{Zl}\p{Zp}\p{Cs}]/u;
const MAX_NAME_BYTES = 255;

function noncharacter(cp) {
  return (cp >= 0xfdd0 && cp <= 0xfdef) || (cp & 0xfffe) === 0xfffe;
}

function refusedChar(c) {
  return /[\x00-\x1f\x7f-\x9f]/u.test(c) || NAME_INVISIBLE.test(c) || noncharacter(c.codePointAt(0));
}

// The name with the characters it may not have written as <U+XXXX> (a bidi override shown as is
// would turn the message around).
export function shownName(name) {
  return [...name].map((c) => (refusedChar(c)
    ? `<U+${c.codePointAt(0).toString(16).toUpperCase().padStart(4, '0')}>` : c)).join('');
}

// Why the server would refuse `name`, or null when it takes it.
export function nameProblem(name) {
  if (NAME_FORBIDDEN.test(name) || name === '.' || name === '..') {
    return 'its name has a path separator or a control character, or is "." or ".."';
  }
  if (!name.trim()) return 'its name is only whitespace';
  for (const c of name) {
    const cp = c.codePointAt(0);
    if (noncharacter(cp) || NAME_INVISIBLE.test(c)) {
      const hex = cp.toString(16).toUpperCase().padStart(4, '0');
      return `its name has U+${hex} (${noncharacter(cp) ? 'a noncharacter' : 'an invisible or direction-changing character, or a line separator'})`;
    }
  }
  const bytes = new TextEncoder().encode(name).length;
  if (bytes > MAX_NAME_BYTES) return `the name is ${bytes} bytes of UTF-8, over ${MAX_NAME_BYTES}`;
  return null;
}

// The server lacks chunks of a file whose bytes this page does not have (after a reload).
class NeedFile extends Error {}

class Slots {
  constructor(n) {
    this.free = n;
    this.waiters = [];
  }

  acquire(signal) {
    if (this.free > 0) {
      this.free--;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      this.waiters.push(waiter);
      signal.addEventListener('abort', () => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new DOMException('aborted', 'AbortError'));
      }, { once: true });
    });
  }

  release() {
    const next = this.waiters.shift();
    if (next) next.resolve();
    else this.free++;
  }
}

// One file of the batch, as the page knows it.
export class Upload {
  constructor({ fileIdx, name, size, type, lastModified, relPath, chunkSize }) {
    this.fileIdx = fileIdx;
    this.name = name;
    this.size = size;
    this.type = type || 'application/octet-stream';
    this.lastModified = lastModified ?? null;
    this.relPath = relPath || name;
    this.chunkSize = chunkSize || null;
    this.file = null; // the local File, when the user has given it (not after a reload)
    this.fresh = false; // a new fileIdx of this page: nothing can be on the server yet
    this.serverBytes = 0; // what the server reported having, for a file this page cannot resume
    this.state = QUEUED;
    this.note = '';
    this.sha256 = null;
    this.answered = null; // the SHA-256 a chunk's 201 said the complete file has (this run)
    this.done = new Set(); // chunk ids the server has (as far as we know)
    this.inflight = new Map(); // chunk id -> bytes of it sent so far
    this.sending = new Set(); // promises of the chunks in flight
    this.controller = null;
    this.running = null; // the promise of the current run
    this.removing = false; // a removal waits for the server's answer (the row stays until it lets go)
    this.rate = 0;
    this.sample = null;
    this.wakers = [];
  }

  // Unknown chunk size (a file of the batch this page never sent): counted as one chunk, and
  // never resumed (resuming needs the size its chunks were cut at).
  get chunkCount() {
    return this.size === 0 || !this.chunkSize ? 1 : Math.ceil(this.size / this.chunkSize);
  }

  // Every chunk is on the server: what is left (assembly) needs no local file.
  get allSent() {
    return this.chunkSize !== null && this.done.size >= this.chunkCount;
  }

  get needsFile() {
    return !this.file && this.state !== COMPLETE;
  }

  chunkBytes(i) {
    const start = i * this.chunkSize;
    return Math.max(0, Math.min(this.size, start + this.chunkSize) - start);
  }

  get sent() {
    if (this.state === COMPLETE) return this.size;
    if (!this.chunkSize) return this.serverBytes;
    let n = 0;
    for (const i of this.done) n += this.chunkBytes(i);
    for (const loaded of this.inflight.values()) n += loaded;
    return Math.min(n, this.size);
  }

  nextMissing() {
    for (let i = 0; i < this.chunkCount; i++) {
      if (!this.done.has(i) && !this.inflight.has(i)) return i;
    }
    return -1;
  }

  // Resolves at the next change of the chunks in flight.
  changed() {
    return new Promise((resolve) => this.wakers.push(resolve));
  }

  wake() {
    const w = this.wakers;
    this.wakers = [];
    for (const resolve of w) resolve();
  }
}

export class Uploader extends EventTarget {
  constructor(api, memory, limits) {
    super();
    this.api = api;
    this.memory = memory;
    this.limits = limits;
    this.batchId = null;
    this.uploads = new Map(); // fileIdx -> Upload, in the order shown
    this.pending = new Set(); // uploads queued and not yet started, in the order queued
    this.slots = new Slots(CHUNKS_AT_ONCE);
    this.active = 0;
    this.stopped = false;
    this.creating = null;
    this.totalSample = null;
    this.totalRate = 0;
    this.ticker = setInterval(() => this.tick(), 500);
  }

  emit(type, upload = null) {
    this.dispatchEvent(new CustomEvent(type, { detail: upload }));
  }

  list() {
    return [...this.uploads.values()];
  }

  busy() {
    return this.list().some((u) => u.state === QUEUED || u.state === UPLOADING);
  }

  totals() {
    let size = 0;
    let sent = 0;
    for (const u of this.uploads.values()) {
      size += u.size;
      sent += u.sent;
    }
    return { size, sent, rate: this.totalRate };
  }

  // Speeds: an exponential average of what was sent over each half second.
  tick() {
    const now = performance.now();
    let moving = false;
    for (const u of this.uploads.values()) {
      if (u.state !== UPLOADING) {
        u.sample = null;
        u.rate = 0;
        continue;
      }
      moving = true;
      const sent = u.sent;
      if (u.sample) {
        const inst = Math.max(0, sent - u.sample.sent) / ((now - u.sample.t) / 1000);
        u.rate = u.rate ? 0.7 * u.rate + 0.3 * inst : inst;
      }
      u.sample = { t: now, sent };
    }
    if (!moving) {
      this.totalSample = null;
      this.totalRate = 0;
      return;
    }
    const { sent } = this.totals();
    if (this.totalSample) {
      const inst = Math.max(0, sent - this.totalSample.sent) / ((now - this.totalSample.t) / 1000);
      this.totalRate = this.totalRate ? 0.7 * this.totalRate + 0.3 * inst : inst;
    }
    this.totalSample = { t: now, sent };
    this.emit('progress');
  }

  path(fileIdx) {
    const b = encodeURIComponent(this.batchId);
    return fileIdx === undefined ? `/api/v1/upload/${b}` : `/api/v1/upload/${b}/${fileIdx}`;
  }

  async ensureBatch(signal) {
    if (this.batchId) return this.batchId;
    if (!this.creating) {
      this.creating = this.api.retrying(() => this.api.json('POST', '/api/v1/upload'), { signal })
        .then((body) => {
          this.batchId = body.batchId;
          this.memory.setBatch(this.batchId);
          for (const u of this.uploads.values()) this.rememberFile(u);
          this.emit('batch');
          return this.batchId;
        })
        .finally(() => { this.creating = null; });
    }
    return this.creating;
  }

  rememberFile(u) {
    this.memory.remember(u.fileIdx, {
      name: u.name, size: u.size, type: u.type, lastModified: u.lastModified, relPath: u.relPath,
      chunkSize: u.chunkSize,
    });
  }

  // After a reload: the remembered batch's files as the server has them. Returns false when
  // the remembered batch is gone (dropped, executed, expired, or another key's).
  async restore() {
    const batchId = this.memory.batchId;
    if (!batchId) return true;
    this.batchId = batchId;
    let files;
    try {
      files = (await this.api.retrying(() => this.api.json('GET', this.path()), { attempts: 5 })) || [];
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        this.batchId = null;
        this.memory.forget();
        this.emit('batch');
        return false;
      }
      throw e;
    }
    const remembered = new Map(this.memory.files().map((r) => [r.fileIdx, r]));
    for (const info of files) {
      const fileIdx = Number(info.fileIdx);
      const rec = remembered.get(fileIdx);
      remembered.delete(fileIdx);
      const u = new Upload({
        fileIdx, name: info.name, size: Number(info.size), type: info.mimetype,
        lastModified: rec?.lastModified, relPath: rec?.relPath, chunkSize: rec?.chunkSize,
      });
      if (info.complete && info.sha256) {
        u.state = COMPLETE;
        u.sha256 = info.sha256;
      } else {
        u.serverBytes = Number(info.uploadedSize) || 0;
        if (u.chunkSize && Number(info.chunkCount) === u.chunkCount) {
          u.done = new Set((info.uploadedChunkIds || []).map(Number));
        }
        // All chunks there: the server is assembling it, and the page only waits for that.
        u.state = u.allSent ? QUEUED : PAUSED;
        u.note = u.allSent ? '' : NEED_FILE;
        if (u.allSent) this.pending.add(u);
      }
      this.uploads.set(fileIdx, u);
      this.memory.remember(fileIdx, { ...(rec || {}), name: u.name, size: u.size, type: u.type });
    }
    for (const rec of remembered.values()) {
      // Remembered, nothing stored yet.
      const u = new Upload(rec);
      u.state = PAUSED;
      u.note = NEED_FILE;
      this.uploads.set(u.fileIdx, u);
    }
    this.emit('batch');
    this.schedule();
    return true;
  }

  // The announced chunk size, or bigger chunks for a file that would need more than the server
  // takes (FILEDROP_MAX_CHUNKS_PER_FILE), never over the largest body (FILEDROP_MAX_CHUNK_SIZE).
  chunkSizeFor(size) {
    const { chunkSize, maxChunkSize, maxChunksPerFile } = this.limits;
    return Math.min(maxChunkSize, Math.max(chunkSize, Math.ceil(size / maxChunksPerFile)));
  }

  // Files the user picked or dropped: [{file, relPath}]. A file that matches a remembered one
  // (name, size, lastModified) that is not complete resumes it; any other is a new file.
  // Returns {added: [Upload], refused: [reason]}.
  add(entries) {
    const added = [];
    const refused = [];
    // Looked up by name, size and lastModified, and the highest fileIdx kept as files are added:
    // adding n files to a batch of m costs n + m, not n x m.
    const same = (name, size, lastModified) => JSON.stringify([name, size, lastModified]);
    const waiting = new Map();
    for (const u of this.uploads.values()) {
      if (!u.needsFile) continue;
      const key = same(u.name, u.size, u.lastModified);
      if (!waiting.has(key)) waiting.set(key, []);
      waiting.get(key).push(u);
    }
    let used = -1;
    for (const idx of this.uploads.keys()) used = Math.max(used, idx);
    for (const { file, relPath } of entries) {
      const matches = waiting.get(same(file.name, file.size, file.lastModified));
      const match = matches?.find((u) => u.needsFile);
      if (match) {
        match.file = file;
        match.note = '';
        if (!match.chunkSize) match.chunkSize = this.chunkSizeFor(match.size);
        added.push(match);
        this.queue(match);
        continue;
      }
      const problem = nameProblem(file.name);
      if (problem) {
        refused.push(`${shownName(file.name)}: ${problem}, which the server refuses (rename it)`);
        continue;
      }
      if (file.size > this.limits.maxFileSize) {
        refused.push(`${file.name}: over the ${this.limits.maxFileSize} bytes one file may have (FILEDROP_MAX_FILE_SIZE)`);
        continue;
      }
      if (file.size > this.limits.maxChunkSize * this.limits.maxChunksPerFile) {
        refused.push(`${file.name}: over the ${this.limits.maxChunkSize * this.limits.maxChunksPerFile} bytes that `
          + `${this.limits.maxChunksPerFile} chunks of ${this.limits.maxChunkSize} bytes hold `
          + '(FILEDROP_MAX_CHUNKS_PER_FILE x FILEDROP_MAX_CHUNK_SIZE)');
        continue;
      }
      if (this.uploads.size >= this.limits.maxFilesPerBatch) {
        refused.push(`${file.name}: the batch already holds ${this.limits.maxFilesPerBatch} files (FILEDROP_MAX_FILES_PER_BATCH)`);
        continue;
      }
      const u = new Upload({
        fileIdx: this.memory.takeIndex(used + 1), name: file.name, size: file.size, type: file.type,
        lastModified: file.lastModified, relPath: relPath || file.name, chunkSize: this.chunkSizeFor(file.size),
      });
      u.file = file;
      u.fresh = true;
      used = Math.max(used, u.fileIdx);
      this.uploads.set(u.fileIdx, u);
      if (this.batchId) this.rememberFile(u);
      this.emit('added', u);
      added.push(u);
      this.queue(u);
    }
    return { added, refused };
  }

  queue(u) {
    u.state = QUEUED;
    this.pending.add(u);
    this.emit('change', u);
    this.schedule();
  }

  // The next queued files, in the order they were queued. Only the queue is looked at (not
  // every file of the batch), so starting each file costs the same in a batch of any size.
  schedule() {
    if (this.stopped) return;
    for (const u of this.pending) {
      if (this.active >= FILES_AT_ONCE) break;
      if (u.state !== QUEUED || this.uploads.get(u.fileIdx) !== u) {
        this.pending.delete(u); // paused, removed, finished or failed since it was queued
        continue;
      }
      if (u.running) continue; // its last run still ends (paused, then resumed): it starts after
      if (!(u.file || u.allSent)) {
        this.pending.delete(u); // it needs the file again: queued anew when given
        continue;
      }
      this.pending.delete(u);
      this.active++;
      u.running = this.run(u).finally(() => {
        u.running = null;
        this.active--;
        this.schedule();
      });
    }
  }

  async run(u) {
    const controller = new AbortController();
    u.controller = controller;
    u.fatal = null;
    const { signal } = controller;
    u.answered = null;
    try {
      await this.ensureBatch(signal);
      signal.throwIfAborted(); // paused or removed while the batch was being created
      u.state = UPLOADING;
      this.emit('change', u);
      await this.sync(u, signal);
      let assemblyWait = 0;
      let waited = 0;
      while (u.state !== COMPLETE) {
        await this.sendMissing(u, signal);
        if (u.fatal) throw u.fatal;
        if (u.answered && u.allSent) {
          // A chunk's answer said the file is complete, with its SHA-256: no need to ask.
          this.finish(u, { sha256: u.answered, size: u.size });
          break;
        }
        const info = await this.info(u, signal);
        if (info === null) {
          u.done = new Set(); // nothing stored (a reboot lost it all): send everything again
          continue;
        }
        if (info.complete && info.sha256) {
          this.finish(u, info);
          break;
        }
        const ids = (info.uploadedChunkIds || []).map(Number);
        if (ids.length < u.chunkCount) {
          u.done = new Set(ids); // the server has fewer than we thought: send the others
          continue;
        }
        // Every chunk is there: the server assembles the file, then reports its SHA-256.
        if (waited > ASSEMBLY_WAIT_MS) throw new ApiError(0, 'ERR_ASSEMBLY_SLOW', 'The server did not finish assembling the file; resume to ask again.');
        const delay = Math.min(2000, 100 * 2 ** assemblyWait++);
        waited += delay;
        u.note = 'Assembling on the server…';
        this.emit('change', u);
        await sleep(delay, signal);
      }
    } catch (e) {
      if (e instanceof NeedFile) {
        u.state = PAUSED;
        u.note = NEED_FILE;
        this.emit('change', u);
        return;
      }
      if (isAbort(e) && !u.fatal) return; // paused, removed or the key refused: already said
      this.fail(u, u.fatal || e);
    } finally {
      controller.abort();
      await Promise.allSettled([...u.sending]);
    }
  }

  finish(u, info) {
    u.state = COMPLETE;
    u.sha256 = info.sha256;
    u.size = Number(info.size);
    u.note = '';
    u.done = new Set(Array.from({ length: u.chunkCount }, (_, i) => i));
    this.emit('change', u);
    this.emit('complete', u);
  }

  fail(u, e) {
    if (e instanceof ApiError && e.keyRefused) return; // every upload is paused by stopAll()
    if (e instanceof ApiError && e.code === 'ERR_BATCH_NOT_FOUND' && this.uploads.get(u.fileIdx) === u) {
      this.batchGone();
      return;
    }
    u.state = ERROR;
    u.note = e instanceof ApiError ? e.message : `Unexpected error: ${e}`;
    this.emit('change', u);
    this.emit('failed', u);
  }

  // The file's info (null: nothing stored yet), retried through outages.
  async info(u, signal) {
    try {
      const info = await this.api.retrying(() => this.api.json('GET', this.path(u.fileIdx), { signal }), {
        signal, onRetry: (e, delay) => this.retrying(u, e, delay),
      });
      this.recovered(u);
      return info;
    } catch (e) {
      if (e instanceof ApiError && e.code === 'ERR_FILE_NOT_FOUND') return null;
      throw e;
    }
  }

  // Before sending: the chunk ids the server already has. Stored chunks cut at another size
  // cannot be continued safely (their byte ranges would not line up), so they are deleted.
  async sync(u, signal) {
    if (u.fresh) {
      u.fresh = false; // its first run: a GET would only answer 404
      u.done = new Set();
      return;
    }
    const info = await this.info(u, signal);
    if (info === null) {
      u.done = new Set();
      return;
    }
    if (info.complete && info.sha256 && Number(info.size) === u.size) {
      this.finish(u, info);
      return;
    }
    if (Number(info.chunkCount) !== u.chunkCount || Number(info.size) !== u.size) {
      await this.api.retrying(() => this.api.request('DELETE', this.path(u.fileIdx), { signal }), { signal })
        .catch((e) => { if (!(e instanceof ApiError && e.status === 404)) throw e; });
      u.done = new Set();
      return;
    }
    u.done = new Set((info.uploadedChunkIds || []).map(Number));
  }

  // Until every chunk has been answered: keep up to CHUNKS_PER_FILE in flight.
  async sendMissing(u, signal) {
    for (;;) {
      if (signal.aborted) throw new DOMException('aborted', 'AbortError');
      const next = u.nextMissing();
      if (next < 0 && u.inflight.size === 0) return;
      if (next >= 0 && !u.file) throw new NeedFile();
      if (next < 0 || u.inflight.size >= CHUNKS_PER_FILE) {
        await u.changed();
        continue;
      }
      await this.slots.acquire(signal);
      u.inflight.set(next, 0);
      const p = this.sendChunk(u, next, signal).finally(() => {
        this.slots.release();
        u.inflight.delete(next);
        u.sending.delete(p);
        u.wake();
        this.emit('change', u);
      });
      u.sending.add(p);
    }
  }

  async sendChunk(u, index, signal) {
    const start = index * u.chunkSize;
    const end = Math.min(u.size, start + u.chunkSize);
    for (let attempt = 0; ; attempt++) {
      try {
        const { status, body } = await this.api.sendChunk({
          batchId: this.batchId, fileIdx: u.fileIdx, file: u.file, name: u.name, size: u.size,
          type: u.type, index, count: u.chunkCount, start, end, signal,
          onProgress: (loaded) => { if (u.inflight.has(index)) u.inflight.set(index, loaded); },
        });
        u.done.add(index);
        for (const id of body.uploadedChunkIds || []) u.done.add(Number(id));
        // 201 with "sha256": the file is complete on the server (older servers, and a file
        // another request completes, answer without it: the file's info is asked then).
        if (status === 201 && typeof body.sha256 === 'string' && SHA256.test(body.sha256)) u.answered = body.sha256;
        this.recovered(u);
        return;
      } catch (e) {
        if (u.inflight.has(index)) u.inflight.set(index, 0);
        if (isAbort(e) || signal.aborted || (e instanceof ApiError && e.keyRefused)) return;
        if (!(e instanceof ApiError) || !e.retryable) {
          u.fatal = e;
          u.controller?.abort();
          u.wake();
          return;
        }
        const delay = retryDelay(e, attempt);
        this.retrying(u, e, delay);
        try {
          await sleep(delay, signal);
        } catch {
          return;
        }
      }
    }
  }

  retrying(u, e, delay) {
    u.note = `${sentence(e.message)} Retrying in ${Math.max(1, Math.round(delay / 1000))} s…`;
    u.retryNote = true;
    this.emit('change', u);
  }

  recovered(u) {
    if (u.retryNote) {
      u.note = '';
      u.retryNote = false;
      this.emit('change', u);
    }
  }

  pause(u) {
    if (u.state !== QUEUED && u.state !== UPLOADING) return;
    u.state = PAUSED;
    u.note = '';
    u.controller?.abort();
    this.emit('change', u);
  }

  resume(u) {
    if ((u.state !== PAUSED && u.state !== ERROR) || this.stopped) return;
    if (!u.file) {
      u.note = NEED_FILE;
      this.emit('change', u);
      return;
    }
    u.note = '';
    this.queue(u);
  }

  // The row goes once the server let the file go: a refusal (409 while a job started from the
  // batch runs, say) leaves it on the page as it is on the server, paused if it was uploading.
  async remove(u) {
    if (u.removing) return;
    u.removing = true;
    const was = u.state;
    u.state = was === COMPLETE ? COMPLETE : PAUSED;
    u.controller?.abort();
    this.emit('change', u);
    try {
      await u.running;
      // Only once no chunk of it is in flight: a late chunk would declare the file anew.
      if (this.batchId) {
        try {
          await this.api.retrying(() => this.api.request('DELETE', this.path(u.fileIdx)), { attempts: 5 });
        } catch (e) {
          if (!(e instanceof ApiError && e.status === 404)) throw e;
        }
      }
    } finally {
      u.removing = false;
    }
    this.uploads.delete(u.fileIdx);
    this.memory.drop(u.fileIdx);
    this.emit('removed', u);
  }

  // The key was refused: everything stops until a key is accepted again.
  stopAll(note) {
    this.stopped = true;
    for (const u of this.uploads.values()) {
      if (u.state === QUEUED || u.state === UPLOADING) {
        u.state = PAUSED;
        u.note = note;
        u.pausedByKey = true;
        u.controller?.abort();
        this.emit('change', u);
      }
    }
  }

  restart(api) {
    this.api = api;
    this.stopped = false;
    for (const u of this.uploads.values()) {
      if (u.pausedByKey) {
        u.pausedByKey = false;
        this.resume(u);
      }
    }
    this.schedule();
  }

  // The server no longer has the batch (dropped, expired): as after a reload, it is forgotten,
  // not retried file by file. The files this page still holds that were not complete go up
  // again in a new batch (paused ones stay paused); complete ones went with the old batch.
  batchGone() {
    const keep = this.list().filter((u) => u.file && u.state !== COMPLETE);
    const lost = this.list().filter((u) => !keep.includes(u)).map((u) => u.relPath);
    this.newBatch();
    const paused = new Set(keep.filter((u) => u.state === PAUSED).map((u) => u.file));
    const { added } = this.add(keep.map((u) => ({ file: u.file, relPath: u.relPath })));
    for (const u of added) if (paused.has(u.file)) this.pause(u);
    for (const u of keep) { // whoever waits for one of them (whenComplete: pasted rows) is told
      u.note = 'The batch is gone from the server: this file goes up again in a new batch.';
      this.emit('failed', u);
    }
    this.emit('gone', { again: added.length, lost });
  }

  // Forget the batch (its files stay on the server until it expires) and begin anew.
  newBatch() {
    for (const u of this.uploads.values()) u.controller?.abort();
    this.uploads.clear();
    this.pending.clear();
    this.batchId = null;
    this.memory.forget();
    this.emit('batch');
  }

  // Resolves once `u` is complete; rejects if it fails or is removed.
  whenComplete(u) {
    if (u.state === COMPLETE) return Promise.resolve(u);
    return new Promise((resolve, reject) => {
      const off = () => {
        this.removeEventListener('complete', onComplete);
        this.removeEventListener('failed', onFailed);
        this.removeEventListener('removed', onFailed);
      };
      const onComplete = (e) => { if (e.detail === u) { off(); resolve(u); } };
      const onFailed = (e) => {
        if (e.detail === u) { off(); reject(new Error(u.note || `${u.name} was removed`)); }
      };
      this.addEventListener('complete', onComplete);
      this.addEventListener('failed', onFailed);
      this.addEventListener('removed', onFailed);
    });
  }
}
