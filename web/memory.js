// What the page remembers across reloads (localStorage): only which batch, and which local file
// is which fileIdx with the chunk size it was cut in. What has been uploaded is never taken from
// here: the server's uploadedChunkIds are the truth.
//
// Every tab of the page shares this storage, and so the batch: each change is made to what is
// stored now (read again first), never to a copy read earlier, so that a tab takes a fileIdx no
// other tab has taken and keeps the files the others remembered.
//
// The record is cut so that no change costs more as the batch grows: a small head
// (`STORE_KEY`: batch id, next fileIdx, the job followed) that every change reads again and
// writes, and one key per file (`filedrop.drop-page.v1.file:<batchId>:<fileIdx>`), written once
// by the one tab that took that fileIdx. A batch of n files is n small writes, not n writes of a
// record of n files.

const STORE_KEY = 'filedrop.drop-page.v1';
const FILE_PREFIX = `${STORE_KEY}.file:`;

function empty() {
  return { batchId: null, nextIdx: 0, job: null };
}

function fileKey(batchId, fileIdx) {
  return `${FILE_PREFIX}${batchId}:${fileIdx}`;
}

export class Memory {
  constructor(storage = window.localStorage) {
    this.storage = storage;
    this.records = new Map(); // fileIdx -> record: the files of this tab's batch it knows of
    this.state = this.read() || empty();
  }

  // The head as stored now (null: none, or unreadable). A record of the page before the files
  // had keys of their own (`files` in the head) is moved to those keys.
  read() {
    let saved;
    try {
      saved = JSON.parse(this.storage.getItem(STORE_KEY) || 'null');
    } catch {
      return null; // unreadable or disabled: what this tab holds
    }
    if (!saved || typeof saved !== 'object') return null;
    const head = { ...empty(), batchId: saved.batchId ?? null, nextIdx: Number(saved.nextIdx) || 0, job: saved.job ?? null };
    if (saved.files && typeof saved.files === 'object' && Object.keys(saved.files).length) {
      if (head.batchId) {
        for (const [idx, rec] of Object.entries(saved.files)) this.put(fileKey(head.batchId, idx), rec);
      }
      this.put(STORE_KEY, head);
    }
    return head;
  }

  put(key, value) {
    try {
      this.storage.setItem(key, JSON.stringify(value));
    } catch {
      // storage full or disabled: uploads go on, only resume after a reload is lost
    }
  }

  unput(key) {
    try {
      this.storage.removeItem(key);
    } catch {
      // disabled: nothing was stored
    }
  }

  save() {
    this.put(STORE_KEY, this.state);
  }

  // `change(head)` made to the stored head of this tab's batch (another tab may have changed it
  // since this one read it), then stored. When the stored head is another batch's (another tab
  // started a new one) or gone, this tab's batch is stored again with the files it knows, as
  // the whole record was before it had keys per file.
  update(change) {
    const stored = this.read();
    const same = stored && stored.batchId === this.state.batchId;
    if (same) this.state = stored;
    const before = JSON.stringify(this.state);
    change(this.state);
    if (!same && this.state.batchId) {
      for (const [idx, rec] of this.records) this.put(fileKey(this.state.batchId, idx), rec);
    }
    if (!same || JSON.stringify(this.state) !== before) this.save();
  }

  get batchId() { return this.state.batchId; }

  // Every file key of a batch other than `keep` (a forgotten batch's) is removed.
  sweep(keep) {
    const gone = [];
    try {
      for (let i = 0; i < this.storage.length; i++) {
        const key = this.storage.key(i);
        if (key && key.startsWith(FILE_PREFIX) && (keep === null || !key.startsWith(`${FILE_PREFIX}${keep}:`))) gone.push(key);
      }
    } catch {
      return;
    }
    for (const key of gone) this.unput(key);
  }

  setBatch(batchId) {
    this.state = { ...empty(), batchId };
    this.records.clear();
    this.save();
    this.sweep(batchId);
  }

  forget() {
    this.state = empty();
    this.records.clear();
    this.save();
    this.sweep(null);
  }

  // A new fileIdx: never one used before in this batch (a removed file's index stays unused),
  // by this tab or another.
  takeIndex(atLeast = 0) {
    let idx;
    this.update((state) => {
      idx = Math.max(state.nextIdx, atLeast);
      state.nextIdx = idx + 1;
    });
    return idx;
  }

  remember(fileIdx, record) {
    this.records.set(String(fileIdx), record);
    this.update((state) => {
      state.nextIdx = Math.max(state.nextIdx, fileIdx + 1);
    });
    if (this.state.batchId) this.put(fileKey(this.state.batchId, fileIdx), record);
  }

  file(fileIdx) {
    if (!this.state.batchId) return null;
    try {
      const rec = JSON.parse(this.storage.getItem(fileKey(this.state.batchId, fileIdx)) || 'null');
      if (rec && typeof rec === 'object') return rec;
    } catch {
      // unreadable: what this tab holds
    }
    return this.records.get(String(fileIdx)) || null;
  }

  // The batch's remembered files, by every tab (read once, after a reload).
  files() {
    const found = new Map(this.records);
    const prefix = `${FILE_PREFIX}${this.state.batchId}:`;
    if (this.state.batchId) {
      try {
        for (let i = 0; i < this.storage.length; i++) {
          const key = this.storage.key(i);
          if (!key || !key.startsWith(prefix)) continue;
          const rec = JSON.parse(this.storage.getItem(key) || 'null');
          if (rec && typeof rec === 'object') found.set(key.slice(prefix.length), rec);
        }
      } catch {
        // unreadable or disabled: what this tab holds
      }
    }
    for (const [idx, rec] of found) this.records.set(idx, rec);
    return [...found].map(([idx, rec]) => ({ ...rec, fileIdx: Number(idx) }))
      .filter((r) => Number.isInteger(r.fileIdx)).sort((a, b) => a.fileIdx - b.fileIdx);
  }

  drop(fileIdx) {
    this.records.delete(String(fileIdx));
    if (this.state.batchId) this.unput(fileKey(this.state.batchId, fileIdx));
  }

  // The job this tab follows (after a reload it is followed again).
  get job() { return this.state.job || null; }

  setJob(job) {
    this.update((state) => { state.job = job; });
  }
}
