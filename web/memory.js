// What the page remembers across reloads (localStorage): only which batch, and which local file
// is which fileIdx with the chunk size it was cut in. What has been uploaded is never taken from
// here: the server's uploadedChunkIds are the truth.

const STORE_KEY = 'filedrop.drop-page.v1';

function empty() {
  return { batchId: null, nextIdx: 0, files: {} };
}

export class Memory {
  constructor(storage = window.localStorage) {
    this.storage = storage;
    this.state = empty();
    try {
      const saved = JSON.parse(storage.getItem(STORE_KEY) || 'null');
      if (saved && typeof saved === 'object' && typeof saved.files === 'object') this.state = { ...empty(), ...saved };
    } catch {
      this.state = empty();
    }
  }

  save() {
    try {
      this.storage.setItem(STORE_KEY, JSON.stringify(this.state));
    } catch {
      // storage full or disabled: uploads go on, only resume after a reload is lost
    }
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

  // A new fileIdx: never one used before in this batch (a removed file's index stays unused).
  takeIndex(atLeast = 0) {
    const idx = Math.max(this.state.nextIdx, atLeast);
    this.state.nextIdx = idx + 1;
    this.save();
    return idx;
  }

  remember(fileIdx, record) {
    this.state.files[String(fileIdx)] = record;
    this.state.nextIdx = Math.max(this.state.nextIdx, fileIdx + 1);
    this.save();
  }

  file(fileIdx) {
    return this.state.files[String(fileIdx)] || null;
  }

  files() {
    return Object.entries(this.state.files).map(([idx, rec]) => ({ fileIdx: Number(idx), ...rec }));
  }

  drop(fileIdx) {
    delete this.state.files[String(fileIdx)];
    this.save();
  }
}
