// Thruflux relay pages: draws the download page (/w/ID) and the upload page (/u/ID).
// Everything else lives in relay.js.
import * as relay from './relay.js';

const $ = (id) => document.getElementById(id);
const [, kind, id] = location.pathname.split('/');
const keyText = location.hash.slice(1);

function say(text) { $('status').textContent = text; }

function fail(err) {
  const box = $('error');
  box.hidden = false;
  box.textContent = `Stopped: ${err.message || err}`;
  document.body.dataset.state = 'error';
}

function row(name, size) {
  const li = document.createElement('li');
  const n = document.createElement('span');
  n.className = 'name';
  n.textContent = name;
  const s = document.createElement('span');
  s.className = 'size';
  s.textContent = relay.human(size);
  li.append(n, s);
  return li;
}

async function downloadPage() {
  const base = `/w/${id}`;
  const key = keyText ? await relay.importKey(relay.b64urlDecode(keyText)) : null;
  const offer = await relay.manifest(base, key);
  const total = offer.files.reduce((a, f) => a + f.size, 0);
  say(`${offer.files.length} file${offer.files.length === 1 ? '' : 's'}, ${relay.human(total)}`);
  $('note').textContent = offer.mode === 'e2e'
    ? 'End-to-end encrypted: this page decrypts and checks every chunk; the relay sees only ciphertext and sizes.'
    : 'Not encrypted: the relay server can read these files.';
  const list = $('files');
  const progress = document.createElement('progress');
  progress.max = 1;
  progress.value = 0;
  let busy = false;
  const run = async (label, filename, size, data) => {
    if (busy) return;
    busy = true;
    document.body.dataset.state = 'busy';
    let done = 0;
    $('all').after(progress);
    progress.max = Math.max(size, 1);
    say(`${label}: 0%`);
    try {
      await relay.save(filename, size, data, (n) => {
        done += n;
        progress.value = done;
        say(`${label}: ${Math.floor((100 * done) / Math.max(size, 1))}% (${relay.human(done)})`);
      });
      say(`${label}: done, ${relay.human(done)} saved`);
      document.body.dataset.state = 'done';
      document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1);
    } catch (e) {
      fail(e);
    } finally {
      busy = false;
    }
  };
  const stream = (f) => (offer.mode === 'e2e' ? relay.decrypted(base, key, f) : relay.plain(base, f));
  for (const f of offer.files) {
    const li = row(f.name, f.size);
    const b = document.createElement('button');
    b.textContent = 'Download';
    b.dataset.index = String(f.index);
    b.onclick = () => run(f.name, f.name.split('/').pop(), f.size, stream(f));
    li.append(b);
    list.append(li);
  }
  if (offer.files.length > 1 || offer.files.some((f) => f.name.includes('/'))) {
    const b = document.createElement('button');
    b.id = 'zip';
    b.textContent = 'Download everything (zip)';
    const top = offer.files[0].name.split('/')[0];
    const name = offer.files.every((f) => f.name.split('/')[0] === top) ? `${top}.zip` : 'files.zip';
    b.onclick = () => {
      const entries = offer.files.map((f) => ({ name: f.name, size: f.size, get data() { return stream(f); } }));
      run('Everything', name, total, relay.zip(entries));
    };
    $('all').append(b);
  }
  if (offer.mode === 'plain') {
    const pre = $('curl').querySelector('pre');
    const origin = location.origin;
    pre.textContent = offer.files
      .map((f) => `curl -fLOJ ${origin}${base}/${f.name.split('/').map(encodeURIComponent).join('/')}`)
      .concat(offer.files.length > 1 ? [`curl -fL ${origin}${base}.tar | tar x`] : [])
      .join('\n');
    $('curl').hidden = false;
  }
  document.body.dataset.state = 'ready';
}

async function uploadPage() {
  const raw = keyText ? relay.b64urlDecode(keyText) : null;
  const key = raw ? await relay.importKey(raw) : null;
  if (!key) throw new Error('the link is incomplete: its #key part is missing');
  say('Choose what to send: it is encrypted here, in this browser, before it leaves.');
  const drop = $('drop');
  drop.hidden = false;
  const chosen = [];
  const list = $('files');
  const add = (name, file) => {
    chosen.push({ name, file });
    list.append(row(name, file.size));
    $('send').hidden = false;
  };
  $('pick').onchange = () => {
    for (const f of $('pick').files) add(f.webkitRelativePath || f.name, f);
  };
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((res, rej) => entry.file(res, rej));
      add(prefix + entry.name, file);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const e of batch) await walk(e, `${prefix}${entry.name}/`);
      }
    }
  };
  drop.ondragover = (ev) => { ev.preventDefault(); drop.classList.add('over'); };
  drop.ondragleave = () => drop.classList.remove('over');
  drop.ondrop = async (ev) => {
    ev.preventDefault();
    drop.classList.remove('over');
    const entries = [...ev.dataTransfer.items].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
    for (const e of entries) await walk(e, '');
  };
  $('send').onclick = async () => {
    $('send').disabled = true;
    drop.hidden = true;
    const total = chosen.reduce((a, f) => a + f.file.size, 0);
    let sent = 0;
    const progress = document.createElement('progress');
    progress.max = Math.max(total, 1);
    $('send').after(progress);
    document.body.dataset.state = 'busy';
    try {
      const verdict = await relay.upload(id, key, chosen, (n) => {
        sent += n;
        progress.value = sent;
        say(`Sending: ${Math.floor((100 * sent) / Math.max(total, 1))}% (${relay.human(sent)})`);
      });
      if (!verdict.startsWith('ok')) throw new Error(`the receiver refused: ${verdict}`);
      say(`Sent and verified by the receiver: ${relay.human(sent)}`);
      document.body.dataset.state = 'done';
    } catch (e) {
      fail(e);
    }
  };
  document.body.dataset.state = 'ready';
}

(kind === 'u' ? uploadPage() : downloadPage()).catch(fail);
