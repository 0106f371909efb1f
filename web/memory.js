// What the page remembers across reloads (localStorage): only which batch, and which local file
// is which fileIdx with the chunk size it was cut in. What has been uploaded is never taken from
// here: the server's uploadedChunkIds are the truth.
//
// Every tab of the page shares this storage, and so the batch: each change is made to what is
// stored now (read again first), never to a copy read earlier, so that a tab takes a fileIdx no
// other tab has taken and keeps the files the others remembered.

const STORE_KEY = 'filedrop.drop-page.v1';

function empty() {
  return { batchId: null, nextIdx: 0, files: {} };
}

export class Memory {
  constructor(storage = window.localStorage) {
    this.storage = storage;
    this.state = this.read() || empty();
  }

  read() {
    try {
      const saved = JSON.parse(this.storage.getItem(STORE_KEY) || 'null');
      if (saved && typeof saved === 'object' && saved.files && typeof saved.files === 'object') {
        return { ...empty(), ...saved };
      }
    } catch {
      // unreadable or disabled: what this tab holds
    }
    return null;
  }

  save() {
    try {
      this.storage.setItem(STORE_KEY, JSON.stringify(this.state));
    } catch {
      // storage full or disabled: uploads go on, only resume after a reload is lost
    }
  }

  // `change(state)` made to the stored state of this tab's batch (another tab may have changed
  // it since this one read it), then stored.
  update(change) {
    const stored = this.read();
    if (stored && stored.batchId === this.state.batchId) this.state = stored;
    change(this.state);
    this.save();
  }

  get batchId() { return this.state.batchId; }

  setBatch(batchId) {
    this.state = { ...empty(), batchId };
    this.save();
  }

  forget() {
    this.state = empty();
    this.save();
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
    this.update((state) => {
      state.files[String(fileIdx)] = record;
      state.nextIdx = Math.max(state.nextIdx, fileIdx + 1);
    });
  }

  file(fileIdx) {
    return this.state.files[String(fileIdx)] || null;
  }

  files() {
    return Object.entries(this.state.files).map(([idx, rec]) => ({ fileIdx: Number(idx), ...rec }));
  }

  drop(fileIdx) {
    this.update((state) => { delete state.files[String(fileIdx)]; });
  }

  // The job this tab follows (after a reload it is followed again).
  get job() { return this.state.job || null; }

  setJob(job) {
    this.update((state) => { state.job = job; });
  }
}
