// Thruflux web relay: everything that is not the page's DOM, so a local GUI can reuse it.
//
// End-to-end format (the same as `thru`'s apps/thru/src/web.rs, module e2e):
//   key    32 bytes, base64url without padding, in the link's #fragment (never sent);
//   chunk  64 KiB of plaintext sealed with AES-256-GCM, its 16-byte tag after it;
//   nonce  file index (u32 big-endian) then chunk index (u64 big-endian); the manifest is
//          file 0xFFFFFFFF, chunk 0;
//   aad    one byte: 1 on a file's last chunk, else 0 (a stream cut at a chunk boundary
//          does not verify as complete). An empty file is one empty chunk.
// Each chunk is verified before a byte of it is handed on.

export const CHUNK = 64 * 1024;
export const TAG = 16;
export const MANIFEST = 0xffffffff;

export function b64urlDecode(text) {
  const b64 = text.replace(/-/g, '+').replace(/_/g, '/');
  const bin = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

export function b64urlEncode(bytes) {
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

export async function importKey(raw) {
  if (raw.length !== 32) throw new Error('the link is incomplete: its key is missing or cut short');
  return crypto.subtle.importKey('raw', raw, 'AES-GCM', false, ['encrypt', 'decrypt']);
}

export async function newKey() {
  const raw = crypto.getRandomValues(new Uint8Array(32));
  return { raw, key: await importKey(raw) };
}

function nonce(file, chunk) {
  const n = new Uint8Array(12);
  const v = new DataView(n.buffer);
  v.setUint32(0, file);
  v.setBigUint64(4, BigInt(chunk));
  return n;
}

export class TamperedError extends Error {}

export async function open(key, file, chunk, last, sealed) {
  try {
    const plain = await crypto.subtle.decrypt(
      { name: 'AES-GCM', iv: nonce(file, chunk), additionalData: new Uint8Array([last ? 1 : 0]) },
      key, sealed);
    return new Uint8Array(plain);
  } catch {
    throw new TamperedError(`chunk ${chunk} failed verification (altered on the way, or a wrong link)`);
  }
}

export async function seal(key, file, chunk, last, plain) {
  const sealed = await crypto.subtle.encrypt(
    { name: 'AES-GCM', iv: nonce(file, chunk), additionalData: new Uint8Array([last ? 1 : 0]) },
    key, plain);
  return new Uint8Array(sealed);
}

export const chunks = (size) => Math.max(1, Math.ceil(size / CHUNK));
export const sealedSize = (size) => size + chunks(size) * TAG;

/// The offer: `{mode, files: [{name, size, index}]}`; e2e manifests are decrypted here.
export async function manifest(base, key) {
  const resp = await fetch(`${base}/manifest`, { cache: 'no-store' });
  if (!resp.ok) throw new Error('this link is not available (never valid, used, or expired)');
  const m = await resp.json();
  if (m.mode !== 'e2e') {
    return { mode: 'plain', files: m.files.map((f, index) => ({ ...f, index })) };
  }
  if (!key) throw new Error('the link is incomplete: its #key part is missing');
  const blob = Uint8Array.from(atob(m.blob), (c) => c.charCodeAt(0));
  const inner = JSON.parse(new TextDecoder().decode(await open(key, MANIFEST, 0, true, blob)));
  const files = inner.files.map((f, index) => ({ name: f.name, size: f.size, index }));
  files.forEach((f, i) => {
    if (sealedSize(f.size) !== m.files[i].size) throw new TamperedError('the manifest does not match the relay');
  });
  return { mode: 'e2e', files };
}

/// Reads a response body in sealed chunks and yields verified plaintext, chunk by chunk.
export async function* decrypted(base, key, file) {
  const resp = await fetch(`${base}/${file.index}`, { cache: 'no-store' });
  if (!resp.ok) throw new Error(`the relay refused the download (HTTP ${resp.status})`);
  const reader = resp.body.getReader();
  const total = chunks(file.size);
  const buf = new Uint8Array(CHUNK + TAG);
  let fill = 0;
  let c = 0;
  const want = (i) => Math.min(CHUNK, file.size - i * CHUNK) + TAG;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    let off = 0;
    while (off < value.length) {
      if (c >= total) throw new TamperedError('more data than announced');
      const need = want(c) - fill;
      const take = Math.min(need, value.length - off);
      buf.set(value.subarray(off, off + take), fill);
      fill += take;
      off += take;
      if (fill === want(c)) {
        yield await open(key, file.index, c, c + 1 === total, buf.slice(0, fill));
        fill = 0;
        c += 1;
      }
    }
  }
  if (c !== total) throw new Error('the download was cut short; nothing was saved as complete');
}

/// Plain mode: the bytes as they come.
export async function* plain(base, file) {
  const resp = await fetch(`${base}/${file.name.split('/').map(encodeURIComponent).join('/')}`, { cache: 'no-store' });
  if (!resp.ok) throw new Error(`the relay refused the download (HTTP ${resp.status})`);
  const reader = resp.body.getReader();
  let got = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    got += value.length;
    yield value;
  }
  if (got !== file.size) throw new Error('the download was cut short');
}

// --- zip (store only, streamed: sizes and CRC-32 after each file's data) ---------------

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

export function crc32(crc, bytes) {
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

/// A zip of `entries` ([{name, size, data: async iterable of Uint8Array}]) as it is read.
/// Without ZIP64: at most 4 GiB in all (larger sets: download the files one by one).
/// Every yielded array may be transferred (detached) by the consumer: lengths are taken
/// before yielding.
export async function* zip(entries) {
  const total = entries.reduce((a, e) => a + e.size + 30 + 16 + 46 + 2 * e.name.length * 3, 22);
  if (total >= 0xffffffff) throw new Error('over 4 GiB: download the files one by one');
  const enc = new TextEncoder();
  const central = [];
  let offset = 0;
  for (const e of entries) {
    const name = enc.encode(e.name);
    const head = new Uint8Array(30 + name.length);
    const h = new DataView(head.buffer);
    h.setUint32(0, 0x04034b50, true);
    h.setUint16(4, 20, true);
    h.setUint16(6, 0x0808, true); // sizes after the data; UTF-8 names
    head.set(name, 30);
    h.setUint16(26, name.length, true);
    const headLength = head.length;
    yield head;
    let crc = 0;
    let size = 0;
    for await (const part of e.data) {
      crc = crc32(crc, part);
      size += part.length;
      yield part;
    }
    if (size !== e.size) throw new Error(`${e.name}: ${size} bytes, ${e.size} announced`);
    const desc = new Uint8Array(16);
    const d = new DataView(desc.buffer);
    d.setUint32(0, 0x08074b50, true);
    d.setUint32(4, crc, true);
    d.setUint32(8, size, true);
    d.setUint32(12, size, true);
    central.push({ name, crc, size, offset });
    offset += headLength + size + 16;
    yield desc;
  }
  const start = offset;
  for (const c of central) {
    const rec = new Uint8Array(46 + c.name.length);
    const r = new DataView(rec.buffer);
    r.setUint32(0, 0x02014b50, true);
    r.setUint16(4, 20, true);
    r.setUint16(6, 20, true);
    r.setUint16(8, 0x0808, true);
    r.setUint32(16, c.crc, true);
    r.setUint32(20, c.size, true);
    r.setUint32(24, c.size, true);
    r.setUint16(28, c.name.length, true);
    r.setUint32(42, c.offset, true);
    rec.set(c.name, 46);
    offset += 46 + c.name.length;
    yield rec;
  }
  const end = new Uint8Array(22);
  const z = new DataView(end.buffer);
  z.setUint32(0, 0x06054b50, true);
  z.setUint16(8, central.length, true);
  z.setUint16(10, central.length, true);
  z.setUint32(12, offset - start, true);
  z.setUint32(16, start, true);
  yield end;
}

// --- saving a stream as a download, with bounded memory -------------------------------

let worker = null;

/// Registers the Service Worker that turns a stream into a download (once).
export async function serviceWorker() {
  if (!('serviceWorker' in navigator)) return null;
  if (!worker) {
    worker = (async () => {
      await navigator.serviceWorker.register('/w/sw.js', { scope: '/w/' });
      const reg = await navigator.serviceWorker.ready;
      return reg.active;
    })();
  }
  return worker;
}

/// Saves the async iterable `data` as a download named `filename`. The Service Worker pulls
/// one chunk at a time, so only a few chunks are ever in memory. `onChunk(n)` sees progress.
/// A failure (a chunk that does not verify) errors the download: the browser keeps nothing
/// under the final name.
export async function save(filename, size, data, onChunk) {
  const sw = await serviceWorker();
  const iter = data[Symbol.asyncIterator]();
  if (!sw) {
    // No Service Worker (a private window in some browsers): gather in memory.
    const parts = [];
    for (;;) {
      const { value, done } = await iter.next();
      if (done) break;
      parts.push(value);
      onChunk?.(value.length);
    }
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob(parts));
    a.download = filename;
    a.click();
    return;
  }
  const id = b64urlEncode(crypto.getRandomValues(new Uint8Array(12)));
  const channel = new MessageChannel();
  const finished = new Promise((resolve, reject) => {
    channel.port1.onmessage = async (ev) => {
      if (ev.data.ready) {
        const frame = document.createElement('iframe');
        frame.hidden = true;
        frame.src = `/w/dl/${id}`;
        document.body.appendChild(frame);
        return;
      }
      if (ev.data.cancel) {
        reject(new Error('the download was cancelled'));
        return;
      }
      if (!ev.data.pull) return;
      try {
        const { value, done } = await iter.next();
        if (done) {
          channel.port1.postMessage({ done: true });
          resolve();
        } else {
          onChunk?.(value.length);
          const copy = value.byteOffset === 0 && value.byteLength === value.buffer.byteLength
            ? value.buffer : value.slice().buffer;
          channel.port1.postMessage({ chunk: copy }, [copy]);
        }
      } catch (e) {
        channel.port1.postMessage({ error: String(e.message || e) });
        reject(e);
      }
    };
  });
  sw.postMessage({ type: 'download', id, filename, size }, [channel.port2]);
  return finished;
}

// --- uploading (browser to `thru join --web`) -----------------------------------------

/// Sends `files` ([{name, file: File}]) sealed, over the relay's upload WebSocket: first
/// the sealed manifest, then each file's chunks in order, one per frame. Waits on the
/// socket's buffer so memory stays bounded. Resolves with the receiver's verdict.
export async function upload(id, key, files, onBytes) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${scheme}://${location.host}/v1/relay/upload/${id}`);
  ws.binaryType = 'arraybuffer';
  const verdict = new Promise((resolve, reject) => {
    ws.onmessage = (ev) => resolve(String(ev.data));
    ws.onclose = (ev) => reject(new Error(ev.reason || 'the relay closed the upload'));
    ws.onerror = () => reject(new Error('the relay connection failed'));
  });
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error('the link is not available (used or expired)'));
  });
  const drain = async () => {
    while (ws.bufferedAmount > 4 * (CHUNK + TAG)) await new Promise((r) => setTimeout(r, 10));
    if (ws.readyState !== WebSocket.OPEN) throw new Error('the relay closed the upload');
  };
  const list = { v: 1, files: files.map((f) => ({ name: f.name, size: f.file.size })) };
  ws.send(await seal(key, MANIFEST, 0, true, new TextEncoder().encode(JSON.stringify(list))));
  for (let i = 0; i < files.length; i++) {
    const f = files[i].file;
    const n = chunks(f.size);
    for (let c = 0; c < n; c++) {
      const plain = new Uint8Array(await f.slice(c * CHUNK, Math.min(f.size, (c + 1) * CHUNK)).arrayBuffer());
      await drain();
      ws.send(await seal(key, i, c, c + 1 === n, plain));
      onBytes?.(plain.length);
    }
  }
  await drain();
  ws.send('end');
  return verdict;
}

export function human(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u += 1; }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}
