// Talking to filedrop: the key on every request, the server's JSON errors turned into their
// message, and retries with backoff for what is worth retrying (network errors, 503 while the
// app is down: NGINX answers 503 JSON then, and 502/504/429/408 alike).

const RETRYABLE = new Set([0, 408, 429, 502, 503, 504]);
export const KEY_REFUSED = 'The key was refused: check it and enter it again.';
export const NO_KEY = 'No API key in this tab: enter it to go on.';

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = 'ApiError';
    this.status = status; // 0: no answer (network error)
    this.code = code;
    this.retryAfter = retryAfter; // ms the server asked to wait (Retry-After), or null
  }

  get retryable() { return RETRYABLE.has(this.status); }
  get keyRefused() { return this.status === 401; }
}

// A request the page does not send: the key was forgotten (nothing goes out without one).
function noKey() {
  return new ApiError(401, 'ERR_NO_KEY', NO_KEY);
}

// A message as a sentence, so that another can follow it ("… retry shortly. Retrying in 2 s…").
export function sentence(text) {
  return /[.!?…]$/.test(text) ? text : `${text}.`;
}

export function isAbort(e) {
  return e && e.name === 'AbortError';
}

function abortError() {
  return new DOMException('aborted', 'AbortError');
}

// Retry-After as ms: delta-seconds or an HTTP date; null when absent or unreadable.
export function retryAfterMs(value) {
  if (!value) return null;
  const ms = /^\s*\d+\s*$/.test(value) ? Number(value) * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.max(0, ms) : null;
}

// The error a failed answer stands for: the JSON error shape's message when there is one
// (never the raw JSON), the key refusal for 401 (its body is empty by design), and the wait
// its Retry-After header asks for.
export function errorFrom(status, text, retryAfter = null) {
  if (status === 0) return new ApiError(0, 'ERR_NETWORK', 'The server could not be reached.');
  if (status === 401) return new ApiError(401, 'ERR_KEY_REFUSED', KEY_REFUSED);
  let code = `ERR_HTTP_${status}`;
  let message = `The server answered HTTP ${status}.`;
  try {
    const body = JSON.parse(text);
    if (body && typeof body.message === 'string' && body.message) message = body.message;
    if (body && typeof body.code === 'string') code = body.code;
  } catch {
    // not JSON: keep the status line's message
  }
  return new ApiError(status, code, message, retryAfterMs(retryAfter));
}

// Delay before retry number `attempt` (0-based): 0.5 s doubling up to 5 s, +-20 % so that many
// files do not retry in lockstep. Short enough that a restarted app is used again quickly.
export function backoff(attempt) {
  const base = Math.min(5000, 500 * 2 ** Math.min(attempt, 10));
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

// At most this long is waited for a Retry-After (a page that waits longer looks stuck).
const MAX_RETRY_AFTER = 60000;

// Delay before retrying after error `e` (attempt `attempt`): the backoff, or what the server's
// Retry-After asked for when longer (NGINX's 503 while the app is down says 5 s, a busy template
// check says when the one under way will have ended), +0-20 % so that many files do not come
// back at the same instant.
export function retryDelay(e, attempt) {
  const asked = Math.min(MAX_RETRY_AFTER, e?.retryAfter ?? 0);
  return Math.max(backoff(attempt), Math.round(asked * (1 + Math.random() * 0.2)));
}

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) { reject(abortError()); return; }
    const timer = setTimeout(() => { signal?.removeEventListener('abort', onAbort); resolve(); }, ms);
    function onAbort() { clearTimeout(timer); reject(abortError()); }
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export class Api {
  constructor(key) {
    this.key = key;
    this.onKeyRefused = () => {};
  }

  // "Forget the key": every later request of this Api (its holders keep it) fails without
  // being sent, until a key is entered again (a new Api).
  forget() {
    this.key = '';
  }

  headers(extra = {}) {
    return { 'X-API-Key': this.key, Accept: 'application/json', ...extra };
  }

  // One request; resolves to the Response when it is 2xx, else throws ApiError.
  async request(method, path, { headers, body, signal } = {}) {
    if (!this.key) throw noKey();
    let res;
    try {
      // credentials 'omit': a 401 must come back to this code, never open a login dialog. The
      // server sends browsers no challenge (server/auth.py); this keeps it so if one came.
      res = await fetch(path, {
        method, headers: this.headers(headers), body, signal, cache: 'no-store', credentials: 'omit',
      });
    } catch (e) {
      if (isAbort(e)) throw e;
      throw errorFrom(0, '');
    }
    if (!res.ok) {
      const err = errorFrom(res.status, await res.text().catch(() => ''), res.headers.get('Retry-After'));
      if (err.keyRefused) this.onKeyRefused();
      throw err;
    }
    return res;
  }

  async json(method, path, options) {
    const res = await this.request(method, path, options);
    if (res.status === 204) return null;
    return res.json();
  }

  // `call()` again after a retryable error, waiting retryDelay() in between, until it succeeds,
  // fails for good or `signal` aborts. `onRetry(error, delayMs)` lets the caller say so.
  async retrying(call, { signal, onRetry, attempts = Infinity } = {}) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await call();
      } catch (e) {
        if (isAbort(e) || !(e instanceof ApiError) || !e.retryable || attempt + 1 >= attempts) throw e;
        const delay = retryDelay(e, attempt);
        onRetry?.(e, delay);
        await sleep(delay, signal);
      }
    }
  }

  // One chunk through XMLHttpRequest, the only browser API that reports upload progress.
  sendChunk({ batchId, fileIdx, file, name, size, type, index, count, start, end, onProgress, signal }) {
    return new Promise((resolve, reject) => {
      if (signal?.aborted) { reject(abortError()); return; }
      if (!this.key) { reject(noKey()); return; }
      const xhr = new XMLHttpRequest();
      // XHR has no credentials 'omit'; given a user and password (the key, which the server
      // also takes as a Basic password) it answers a 401 instead of opening a login dialog,
      // should a challenge come (the server sends browsers none).
      xhr.open('POST', `/api/v1/upload/${encodeURIComponent(batchId)}/${fileIdx}`, true, 'filedrop', this.key);
      const headers = this.headers({
        'Content-Type': 'application/octet-stream',
        'X-Upload-Type': 'chunked',
        'X-Upload-Chunk-Index': String(index),
        'X-Upload-Chunk-Count': String(count),
        'X-File-Size': String(size),
        'X-File-Name': encodeURIComponent(name),
        'X-File-Type': type || 'application/octet-stream',
      });
      for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
      xhr.upload.onprogress = (e) => onProgress?.(e.loaded);
      const onAbort = () => xhr.abort();
      signal?.addEventListener('abort', onAbort, { once: true });
      const done = () => signal?.removeEventListener('abort', onAbort);
      xhr.onload = () => {
        done();
        if (xhr.status >= 200 && xhr.status < 300) {
          try { resolve({ status: xhr.status, body: JSON.parse(xhr.responseText) }); } catch {
            reject(new ApiError(xhr.status, 'ERR_ANSWER_INVALID', 'The server sent an answer this page cannot read.'));
          }
          return;
        }
        const err = errorFrom(xhr.status, xhr.responseText, xhr.getResponseHeader('Retry-After'));
        if (err.keyRefused) this.onKeyRefused();
        reject(err);
      };
      xhr.onerror = () => { done(); reject(errorFrom(0, '')); };
      xhr.ontimeout = xhr.onerror;
      xhr.onabort = () => { done(); reject(abortError()); };
      xhr.send(file.slice(start, end));
    });
  }
}
