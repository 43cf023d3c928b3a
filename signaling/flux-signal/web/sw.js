// Thruflux relay Service Worker: turns a stream the page produces (decrypted chunk by
// chunk) into a browser download. It answers only /w/dl/ID requests that the page set up
// with a message, and pulls one chunk at a time over a MessagePort, so memory stays bounded
// however large the file.
const waiting = new Map();

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (ev) => ev.waitUntil(self.clients.claim()));

self.addEventListener('message', (ev) => {
  const d = ev.data;
  if (!d || d.type !== 'download' || !ev.ports[0]) return;
  waiting.set(d.id, { port: ev.ports[0], filename: String(d.filename), size: d.size });
  ev.ports[0].postMessage({ ready: true });
});

function disposition(name) {
  const ascii = name.replace(/[^\x20-\x7e]|["\\]/g, '_');
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encodeURIComponent(name)}`;
}

self.addEventListener('fetch', (ev) => {
  const m = new URL(ev.request.url).pathname.match(/^\/w\/dl\/([A-Za-z0-9_-]+)$/);
  if (!m) return;
  const d = waiting.get(m[1]);
  if (!d) {
    ev.respondWith(new Response('download expired', { status: 404 }));
    return;
  }
  waiting.delete(m[1]);
  const port = d.port;
  const stream = new ReadableStream({
    pull(ctrl) {
      return new Promise((resolve) => {
        port.onmessage = (msg) => {
          const x = msg.data;
          if (x.chunk) ctrl.enqueue(new Uint8Array(x.chunk));
          else if (x.done) ctrl.close();
          else if (x.error) ctrl.error(new Error(x.error));
          resolve();
        };
        port.postMessage({ pull: true });
      });
    },
    cancel() { port.postMessage({ cancel: true }); },
  }, { highWaterMark: 1 });
  const headers = {
    'Content-Type': 'application/octet-stream',
    'Content-Disposition': disposition(d.filename),
    'Cache-Control': 'no-store',
  };
  ev.respondWith(new Response(stream, { headers }));
});
