//! The sending side of one transfer (one receiver).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flux_wire::{
    ChunkRange, FEATURE_IN_ORDER, FEATURE_STREAM, FEATURE_TEXT, FEATURE_ZSTD, Hash, Message,
};

use crate::digest::{claim_digest, file_digest};
use crate::io::{
    DiskFailure, DiskOp, DiskResult, Event, FrameBuf, OpId, Outbox, Stream, TransferError,
};
use crate::manifest::Manifest;
use crate::{check_hello, hello};

/// Settings of a [`Sender`].
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Files (or ranges of one large file) in flight at once, each on its own lane: 1..=8.
    pub parallel_files: u16,
    /// Chunks each lane may have read ahead of the network; the bytes read ahead across all
    /// lanes together stay within `read_ahead × chunk_size` too. Everything read ahead waits
    /// in line before QUIC, so this bound is also what bounds chunk latency.
    pub read_ahead: u32,
    /// Chunks per range when a large file is split across lanes.
    pub range_chunks: u32,
    /// Inactivity after which the transfer fails (not applied while the receiver's user decides).
    pub stall_timeout: Duration,
    /// Times one chunk may be requested again before the transfer fails.
    pub max_refetch: u32,
    /// Optional features this side advertises in its hello (default: all it implements).
    pub features: u64,
    /// Whether chunks are sent zstd-compressed (only to a receiver that advertises it).
    pub compress: Compress,
    /// The zstd level asked for (1 is fast; see [`Sender::set_compress_level`]).
    pub compress_level: i32,
    /// A short text offered before the manifest (`thru host --text`); the receiver must
    /// advertise [`flux_wire::FEATURE_TEXT`] or the transfer fails naming the problem.
    pub text: Option<Arc<str>>,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            parallel_files: 4,
            read_ahead: 4,
            range_chunks: 32,
            stall_timeout: Duration::from_secs(30),
            max_refetch: 3,
            features: crate::FEATURES,
            compress: Compress::Auto,
            compress_level: 1,
            text: None,
        }
    }
}

/// When the sender compresses a file's chunks.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Compress {
    /// Never.
    Off,
    /// Where it pays: a file is sampled with its first chunks and compressed only while the
    /// frames come out at most [`AUTO_MAX_RATIO`] of the plain size; files whose names say
    /// they are compressed already (media, archives) are never tried.
    #[default]
    Auto,
    /// Every chunk whose frame is smaller than its plain bytes.
    On,
}

/// [`Compress::Auto`] keeps compressing a file only while frames are at most this share of the
/// plain bytes: below ~10 % saved, the CPU on both ends costs more than the bytes it saves on
/// any path this tool targets.
pub const AUTO_MAX_RATIO: f64 = 0.9;

/// Sends one share to one receiver.
///
/// Driving contract: feed [`Sender::handle_stream_data`], [`Sender::handle_disk_done`] and
/// [`Sender::handle_timeout`]; after each, move bytes out of [`Sender::outbox`], then drain
/// [`Sender::poll_disk`] and [`Sender::poll_event`] until both return `None`. Reads are requested
/// only while a lane has room, so the bytes held here never exceed
/// `(read_ahead + 1) × chunk_size` plus control messages.
#[derive(Debug)]
pub struct Sender {
    manifest: Arc<Manifest>,
    cfg: SenderConfig,
    phase: Phase,
    control: FrameBuf,
    out: Outbox,
    disk: VecDeque<DiskOp>,
    events: VecDeque<Event>,
    next_op: u64,
    reads: HashMap<OpId, Read>,
    files: HashMap<u32, FileState>,
    work: VecDeque<Work>,
    lanes: Vec<Lane>,
    /// Claims being verified, in order.
    verify: VecDeque<(u32, u32)>,
    verify_inflight: usize,
    /// Chunk reads allowed in flight across all lanes: starts at one and grows by one per
    /// chunk read, up to the lanes' whole read-ahead, so the first chunk is read (and hashed)
    /// alone and reaches the receiver without waiting behind a burst of reads.
    read_ramp: u32,
    /// Bytes of chunk reads in flight, all lanes.
    reading_bytes: u64,
    last_activity: Option<Instant>,
    /// The entries the receiver chose ([`Message::Select`]); `None`: all of them.
    chosen: Option<BTreeSet<u32>>,
    /// The receiver paused the transfer: its silence is no stall.
    paused: bool,
    /// Whether the receiver takes compressed chunks (its hello said so).
    peer_zstd: bool,
    /// Whether the receiver writes to a pipe and wants chunks in file order, on one lane.
    in_order: bool,
    compress_level: i32,
    /// The share is a stream ([`EntryKind::Stream`]): its chunks are read in order, one
    /// after another, until a short read ends it.
    stream: Option<StreamState>,
    /// Plain and frame bytes of the compressed chunks sent so far (the ratio the level
    /// choice weighs).
    z_plain: u64,
    z_wire: u64,
}

/// How far a stream has been read.
#[derive(Debug, Default)]
struct StreamState {
    /// The next chunk to ask for.
    next: u32,
    /// The stream's size, once a short read found its end.
    size: Option<u64>,
}

#[derive(Debug, Eq, PartialEq)]
enum Phase {
    AwaitHello,
    AwaitDecision,
    AwaitHaves,
    Sending,
    Done,
    Failed,
}

#[derive(Debug)]
struct Read {
    file: u32,
    index: u32,
    len: u32,
    /// `Some(lane)` for a chunk to send, `None` for a resume check.
    lane: Option<usize>,
}

#[derive(Debug, Default)]
struct FileState {
    hashes: Vec<Option<Hash>>,
    unknown: u32,
    /// Chunks still to read for sending (including refetches).
    to_send: u32,
    claim: Option<Claim>,
    done_sent: bool,
    refetches: HashMap<u32, u32>,
    zstd: Zstd,
}

/// A file's compression state.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
enum Zstd {
    /// Not compressed.
    #[default]
    No,
    /// Being sampled (auto): compressed while frames pay.
    Try,
    /// Compressed wherever a frame is smaller.
    Yes,
}

#[derive(Debug)]
struct Claim {
    chunks: Vec<u32>,
    digest: Hash,
    pending: u32,
}

#[derive(Debug)]
struct Work {
    file: u32,
    chunks: VecDeque<u32>,
}

#[derive(Debug, Default)]
struct Lane {
    work: Option<Work>,
    inflight: u32,
}

impl Sender {
    /// A sender for `manifest`. It waits for the receiver's hello on the control stream.
    pub fn new(manifest: Arc<Manifest>, mut cfg: SenderConfig) -> Self {
        cfg.parallel_files = cfg.parallel_files.clamp(1, 8);
        cfg.read_ahead = cfg.read_ahead.max(1);
        cfg.range_chunks = cfg.range_chunks.max(1);
        let lanes = (0..cfg.parallel_files).map(|_| Lane::default()).collect();
        Self {
            phase: Phase::AwaitHello,
            control: FrameBuf::default(),
            out: Outbox::default(),
            disk: VecDeque::new(),
            events: VecDeque::new(),
            next_op: 0,
            reads: HashMap::new(),
            files: HashMap::new(),
            work: VecDeque::new(),
            lanes,
            verify: VecDeque::new(),
            verify_inflight: 0,
            read_ramp: 1,
            reading_bytes: 0,
            last_activity: None,
            chosen: None,
            paused: false,
            peer_zstd: false,
            in_order: false,
            compress_level: cfg.compress_level,
            stream: manifest.stream().map(|_| StreamState::default()),
            z_plain: 0,
            z_wire: 0,
            manifest,
            cfg,
        }
    }

    /// Bytes read from the stream so far and whether it has ended, for a stream share.
    pub fn stream_progress(&self) -> Option<(u64, bool)> {
        let s = self.stream.as_ref()?;
        let cs = u64::from(self.manifest.chunk_size());
        Some(match s.size {
            Some(n) => (n, true),
            None => (u64::from(s.next) * cs, false),
        })
    }

    /// Sets the zstd level for chunks read from now on (see [`Sender::set_path_rate`], which
    /// sets it from the path's rate).
    pub fn set_compress_level(&mut self, level: i32) {
        self.compress_level = level;
    }

    /// The path carries about `bytes_per_sec` now: the zstd level follows it. The plain bytes
    /// compression must deliver to keep the path full are the path's rate over the frames'
    /// size ratio so far; the level is the strongest whose speed still covers that
    /// ([`level_for`]), so a fast path keeps level 1 and a slow one spends spare CPU on
    /// smaller frames.
    pub fn set_path_rate(&mut self, bytes_per_sec: u64) {
        if self.cfg.compress == Compress::Off || !self.peer_zstd {
            return;
        }
        // Before any frame: assume text-like data halves.
        let ratio = if self.z_plain == 0 {
            0.5
        } else {
            self.z_wire as f64 / self.z_plain as f64
        };
        self.compress_level = level_for(bytes_per_sec as f64 / ratio.max(0.01));
    }

    /// The zstd level in use for chunks read from now on.
    pub fn compress_level(&self) -> i32 {
        self.compress_level
    }

    /// Owned bytes arrived on `stream`; the sender keeps none, so this is
    /// [`handle_stream_data`](Self::handle_stream_data).
    pub fn handle_stream_bytes(&mut self, now: Instant, stream: Stream, data: bytes::Bytes) {
        self.handle_stream_data(now, stream, &data);
    }

    /// Bytes arrived on `stream` (only the control stream carries anything to a sender).
    pub fn handle_stream_data(&mut self, now: Instant, stream: Stream, data: &[u8]) {
        if self.is_over() {
            return;
        }
        self.last_activity = Some(now);
        if stream != Stream::Control {
            return self.fail(TransferError::Protocol(
                "data on a receiver-opened lane".into(),
            ));
        }
        self.control.push(data);
        loop {
            match self.control.next() {
                Ok(Some(m)) => self.on_message(m),
                Ok(None) => break,
                Err(e) => return self.fail(e.into()),
            }
            if self.is_over() {
                break;
            }
        }
    }

    /// The peer finished or reset `stream`.
    pub fn handle_stream_end(&mut self, now: Instant, stream: Stream) {
        self.last_activity = Some(now);
        if stream == Stream::Control && !self.is_over() {
            self.fail(TransferError::Protocol("control stream ended early".into()));
        }
    }

    /// A disk request completed.
    pub fn handle_disk_done(
        &mut self,
        now: Instant,
        id: OpId,
        res: Result<DiskResult, DiskFailure>,
    ) {
        self.last_activity = Some(now);
        let Some(read) = self.reads.remove(&id) else {
            return;
        };
        if let Some(lane) = read.lane {
            self.lanes[lane].inflight -= 1;
            self.reading_bytes -= u64::from(read.len);
            self.read_ramp = self.read_ramp.saturating_add(1);
        } else {
            self.verify_inflight -= 1;
        }
        if self.is_over() {
            return;
        }
        let mut read = read;
        let res = match self.stream_read(&mut read, res) {
            Some(res) => res,
            None => return self.maybe_file_done(read.file),
        };
        let (data, hash, compressed) = match res {
            Ok(DiskResult::Read {
                data,
                hash,
                compressed,
            }) if data.len() == read.len as usize => (data, hash, compressed),
            Ok(DiskResult::Read { data: b, .. }) => {
                return self.fail(TransferError::Io(format!(
                    "{}: read {} bytes at chunk {} where {} were expected (file changed while sending?)",
                    self.path(read.file),
                    b.len(),
                    read.index,
                    read.len
                )));
            }
            Ok(DiskResult::Done) => {
                return self.fail(TransferError::Io("read returned no data".into()));
            }
            Err(e) => {
                return self.fail(TransferError::Io(format!("{}: {e}", self.path(read.file))));
            }
        };
        let manifest = Arc::clone(&self.manifest);
        let Some(f) = self.files.get_mut(&read.file) else {
            return;
        };
        if f.hashes.len() <= read.index as usize {
            // A stream's chunks become known as they are read.
            let grow = read.index as usize + 1 - f.hashes.len();
            f.hashes.resize(read.index as usize + 1, None);
            f.unknown += grow as u32;
        }
        let slot = &mut f.hashes[read.index as usize];
        if let Some(prev) = slot {
            if *prev != hash {
                let path = manifest.entry(read.file).map_or("?", |e| e.path.as_str());
                return self.fail(TransferError::Io(format!(
                    "{path}: file changed while sending"
                )));
            }
        } else {
            *slot = Some(hash);
            f.unknown -= 1;
        }
        match read.lane {
            Some(lane) => {
                f.to_send -= 1;
                if compressed.is_none() && f.zstd == Zstd::Try {
                    // A frame that came out no smaller is not returned at all: that sampled
                    // chunk did not pay either, and without this every chunk of random data
                    // would be compressed and thrown away.
                    f.zstd = Zstd::No;
                }
                let frame = compressed.filter(|c| match f.zstd {
                    Zstd::No => false,
                    Zstd::Yes => c.len() < data.len(),
                    Zstd::Try => {
                        let pays = (c.len() as f64) <= data.len() as f64 * AUTO_MAX_RATIO;
                        // One chunk that does not pay ends the sampling: media and random
                        // data cost one chunk's compression, then go plain.
                        f.zstd = if pays { Zstd::Try } else { Zstd::No };
                        pays
                    }
                });
                let stream = Stream::Lane(lane as u16);
                let wire = match frame {
                    Some(c) => {
                        let wire = c.len() as u32;
                        self.z_plain += u64::from(read.len);
                        self.z_wire += u64::from(wire);
                        let header = Message::ZChunkHeader {
                            file: read.file,
                            index: read.index,
                            len: read.len,
                            wire_len: wire,
                            hash,
                        };
                        self.out.push_msg(stream, &header);
                        self.out.push(stream, c);
                        wire
                    }
                    None => {
                        let header = Message::ChunkHeader {
                            file: read.file,
                            index: read.index,
                            len: read.len,
                            hash,
                        };
                        self.out.push_msg(stream, &header);
                        self.out.push(stream, data);
                        read.len
                    }
                };
                self.events.push_back(Event::ChunkSent {
                    file: read.file,
                    index: read.index,
                    len: read.len,
                    wire,
                });
            }
            None => {
                if let Some(c) = f.claim.as_mut() {
                    c.pending -= 1;
                    if c.pending == 0 {
                        self.finish_claim(read.file);
                    }
                }
            }
        }
        self.maybe_file_done(read.file);
    }

    /// A read of a stream chunk: a short read is the stream's end (announced with
    /// [`Message::StreamEnd`]), and reads past the end carry nothing. Returns the result to
    /// go on with as a chunk (`read.len` set to what was read), or `None` when there is no
    /// chunk to send.
    fn stream_read(
        &mut self,
        read: &mut Read,
        res: Result<DiskResult, DiskFailure>,
    ) -> Option<Result<DiskResult, DiskFailure>> {
        let (Some(st), Some(_)) = (self.stream.as_mut(), read.lane) else {
            return Some(res);
        };
        let Ok(DiskResult::Read { data, .. }) = &res else {
            return Some(res);
        };
        let got = data.len() as u32;
        let f = self.files.get_mut(&read.file)?;
        if st.size.is_some() {
            // Asked for before the end was known: there is nothing there.
            f.to_send -= 1;
            return None;
        }
        if got < read.len {
            let cs = u64::from(self.manifest.chunk_size());
            let size = u64::from(read.index) * cs + u64::from(got);
            st.size = Some(size);
            let count = crate::manifest::chunks_for(size, self.manifest.chunk_size());
            f.hashes.truncate(count as usize);
            f.unknown = f.hashes.iter().filter(|h| h.is_none()).count() as u32;
            self.out.push_msg(
                Stream::Control,
                &Message::StreamEnd {
                    file: read.file,
                    size,
                },
            );
            self.events.push_back(Event::StreamEnded { size });
            if got == 0 {
                f.to_send -= 1;
                return None;
            }
            read.len = got;
        }
        Some(res)
    }

    /// Time has passed; fails the transfer if it stalled.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| now >= t) {
            self.fail(TransferError::Timeout("no progress from the receiver"));
        }
    }

    /// Ends the transfer at the local user's request.
    pub fn cancel(&mut self) {
        self.fail(TransferError::Cancelled);
    }

    /// Ends the transfer at the local user's request, telling the peer `reason`.
    pub fn stop(&mut self, reason: &str) {
        self.fail(TransferError::Stopped(truncate(reason)));
    }

    /// Outgoing stream bytes.
    pub fn outbox(&mut self) -> &mut Outbox {
        &mut self.out
    }

    /// The next disk request.
    pub fn poll_disk(&mut self) -> Option<DiskOp> {
        if self.disk.is_empty() && self.phase == Phase::Sending {
            self.schedule();
        }
        self.disk.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Sender::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitDecision | Phase::Done | Phase::Failed => None,
            _ if self.paused => None,
            _ => self.last_activity.map(|t| t + self.cfg.stall_timeout),
        }
    }

    /// The share being sent.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Whether the transfer has ended, successfully or not.
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }

    fn on_message(&mut self, m: Message) {
        match (&self.phase, m) {
            (_, Message::Error { code, message, .. }) => {
                self.phase = Phase::Failed;
                self.events
                    .push_back(Event::Failed(TransferError::Peer { code, message }));
            }
            (
                Phase::AwaitHello,
                Message::Hello {
                    min_version,
                    max_version,
                    features,
                },
            ) => {
                if let Err(e) = check_hello(min_version, max_version) {
                    return self.fail(e);
                }
                let common = features & self.cfg.features;
                self.out
                    .push_msg(Stream::Control, &hello(self.cfg.features));
                if let Some(text) = &self.cfg.text {
                    if common & FEATURE_TEXT == 0 {
                        return self.fail(TransferError::Unsupported(
                            "the receiver's thru is too old to receive a text (--text); it \
                             needs to be updated"
                                .into(),
                        ));
                    }
                    let body = text.to_string();
                    self.out.push_msg(Stream::Control, &Message::Text { body });
                }
                if self.stream.is_some() && common & FEATURE_STREAM == 0 {
                    return self.fail(TransferError::Unsupported(
                        "the receiver's thru is too old to receive a stream (thru host -); it \
                         needs to be updated"
                            .into(),
                    ));
                }
                self.peer_zstd = common & FEATURE_ZSTD != 0;
                // A stream is read once, in order: its chunks go in order on one lane.
                self.in_order = features & FEATURE_IN_ORDER != 0 || self.stream.is_some();
                for m in self.manifest.to_messages() {
                    self.out.push_msg(Stream::Control, &m);
                }
                self.phase = Phase::AwaitDecision;
            }
            (Phase::AwaitDecision, Message::Select { ranges }) if self.chosen.is_none() => {
                let n = self.manifest.len() as u64;
                let mut chosen = BTreeSet::new();
                for r in ranges {
                    let end = u64::from(r.start) + u64::from(r.len);
                    if end > n || chosen.last().is_some_and(|l| *l >= r.start) {
                        return self.fail(TransferError::Protocol(
                            "selection beyond the manifest or out of order".into(),
                        ));
                    }
                    chosen.extend(r.start..r.start + r.len);
                }
                self.chosen = Some(chosen);
            }
            (Phase::AwaitDecision, Message::Browsed) => {
                self.phase = Phase::Done;
                self.events.push_back(Event::Browsed);
                self.out.finish(Stream::Control);
            }
            (Phase::AwaitDecision, Message::Accept) => {
                self.phase = Phase::AwaitHaves;
                self.init_files();
                if let Some(c) = &self.chosen {
                    self.events.push_back(Event::Selected(c.clone()));
                }
                self.events.push_back(Event::Accepted);
            }
            (Phase::AwaitHaves | Phase::Sending, Message::Pause { paused }) => {
                // `last_activity` is now: the stall clock starts afresh on resume.
                self.paused = paused;
                self.events.push_back(Event::Paused(paused));
            }
            (Phase::AwaitDecision, Message::Reject { reason }) => {
                self.phase = Phase::Failed;
                self.events
                    .push_back(Event::Failed(TransferError::Declined(reason)));
                self.out.finish(Stream::Control);
            }
            (
                Phase::AwaitHaves,
                Message::Have {
                    file,
                    ranges,
                    digest,
                },
            ) => self.on_have(file, ranges, digest),
            (Phase::AwaitHaves, Message::HaveDone) => {
                self.phase = Phase::Sending;
                let mut all: Vec<u32> = self.files.keys().copied().collect();
                all.sort_unstable();
                for &file in &all {
                    if self.files.get(&file).is_some_and(|f| f.claim.is_none()) {
                        self.enqueue_all(file, None);
                    }
                }
                for file in all {
                    self.maybe_file_done(file);
                }
            }
            (Phase::Sending, Message::Refetch { file, index }) => self.on_refetch(file, index),
            (
                Phase::Sending,
                Message::Progress {
                    bytes_done,
                    files_done,
                },
            ) => {
                self.events.push_back(Event::PeerProgress {
                    bytes_done,
                    files_done,
                });
            }
            (Phase::Sending, Message::Complete) => {
                if let Some(file) = self
                    .files
                    .iter()
                    .find(|(_, f)| !f.done_sent)
                    .map(|(i, _)| *i)
                {
                    let path = self.path(file);
                    return self.fail(TransferError::Protocol(format!(
                        "receiver claimed completion before {path} was sent"
                    )));
                }
                self.out.push_msg(Stream::Control, &Message::Close);
                self.out.finish(Stream::Control);
                for lane in 0..self.lanes.len() {
                    if self.out.queued(Stream::Lane(lane as u16)) > 0 {
                        self.out.finish(Stream::Lane(lane as u16));
                    }
                }
                self.phase = Phase::Done;
                self.events.push_back(Event::Done);
            }
            (phase, m) => {
                let detail = format!("unexpected {:?} while {phase:?}", m.message_type());
                self.fail(TransferError::Protocol(detail));
            }
        }
    }

    fn init_files(&mut self) {
        for (i, e) in self.manifest.entries().iter().enumerate() {
            if !e.kind.has_data()
                || self
                    .chosen
                    .as_ref()
                    .is_some_and(|c| !c.contains(&(i as u32)))
            {
                continue;
            }
            let n = self.manifest.chunk_count(i as u32);
            let zstd = match self.cfg.compress {
                _ if !self.peer_zstd => Zstd::No,
                Compress::Off => Zstd::No,
                Compress::On => Zstd::Yes,
                Compress::Auto if precompressed(&e.path) => Zstd::No,
                Compress::Auto => Zstd::Try,
            };
            self.files.insert(
                i as u32,
                FileState {
                    hashes: vec![None; n as usize],
                    unknown: n,
                    zstd,
                    ..FileState::default()
                },
            );
        }
    }

    fn on_have(&mut self, file: u32, ranges: Vec<ChunkRange>, digest: Hash) {
        let n = self.manifest.chunk_count(file);
        let Some(f) = self.files.get_mut(&file) else {
            return self.fail(TransferError::Protocol(format!(
                "resume claim for entry {file}, which is not a file"
            )));
        };
        if f.claim.is_some() {
            return self.fail(TransferError::Protocol(format!(
                "second resume claim for entry {file}"
            )));
        }
        let mut chunks = Vec::new();
        for r in ranges {
            let end = r.start.checked_add(r.len).filter(|e| *e <= n);
            let Some(end) = end else {
                return self.fail(TransferError::Protocol(format!(
                    "resume claim beyond the end of entry {file}"
                )));
            };
            if chunks.last().is_some_and(|l| *l >= r.start) {
                return self.fail(TransferError::Protocol(format!(
                    "resume claim ranges out of order for entry {file}"
                )));
            }
            chunks.extend(r.start..end);
        }
        let pending = chunks.len() as u32;
        for &c in &chunks {
            self.verify.push_back((file, c));
        }
        f.claim = Some(Claim {
            chunks,
            digest,
            pending,
        });
        if pending == 0 {
            self.finish_claim(file);
        }
    }

    /// Every claimed chunk is hashed: compare, answer, and queue what the receiver lacks.
    fn finish_claim(&mut self, file: u32) {
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        let Some(c) = f.claim.as_ref() else { return };
        let ours = claim_digest(
            c.chunks
                .iter()
                .filter_map(|&i| f.hashes[i as usize].as_ref().map(|h| (i, h))),
        );
        let accepted = ours == c.digest;
        let held: Vec<u32> = if accepted {
            c.chunks.clone()
        } else {
            Vec::new()
        };
        let bytes = held
            .iter()
            .filter_map(|&i| self.manifest.chunk_span(file, i))
            .map(|(_, l)| u64::from(l))
            .sum();
        self.out
            .push_msg(Stream::Control, &Message::Verdict { file, accepted });
        self.events.push_back(Event::ResumeChecked {
            file,
            accepted,
            bytes,
        });
        self.enqueue_all(file, Some(&held));
        if self.phase == Phase::Sending {
            self.maybe_file_done(file);
        }
    }

    /// Queues every chunk of `file` not in `held`, split into ranges for the lanes.
    fn enqueue_all(&mut self, file: u32, held: Option<&[u32]>) {
        let n = self.manifest.chunk_count(file);
        let held = held.unwrap_or(&[]);
        let mut hi = 0;
        let mut missing = Vec::new();
        for c in 0..n {
            while hi < held.len() && held[hi] < c {
                hi += 1;
            }
            if hi < held.len() && held[hi] == c {
                continue;
            }
            missing.push(c);
        }
        if let Some(f) = self.files.get_mut(&file) {
            f.to_send += missing.len() as u32;
        }
        // A receiver writing to a pipe takes the file in order: one range, on one lane.
        let range = if self.in_order {
            missing.len().max(1)
        } else {
            self.cfg.range_chunks as usize
        };
        for part in missing.chunks(range) {
            self.work.push_back(Work {
                file,
                chunks: part.iter().copied().collect(),
            });
        }
    }

    fn on_refetch(&mut self, file: u32, index: u32) {
        let max = self.cfg.max_refetch;
        let Some(f) = self.files.get_mut(&file) else {
            return self.fail(TransferError::Protocol(format!(
                "refetch of entry {file}, which is not a file"
            )));
        };
        if f.hashes.get(index as usize).is_none_or(Option::is_none) {
            return self.fail(TransferError::Protocol(format!(
                "refetch of chunk {index} of entry {file}, which was not sent"
            )));
        }
        if self.stream.is_some() {
            return self.fail(TransferError::Io(format!(
                "the receiver asked for chunk {index} of the stream again, but a stream is read \
                 once and cannot be sent again (a stream cannot be resumed either)"
            )));
        }
        let times = f.refetches.entry(index).or_insert(0);
        *times += 1;
        if *times > max {
            let times = *times;
            return self.fail(TransferError::Integrity { file, index, times });
        }
        f.to_send += 1;
        self.work.push_front(Work {
            file,
            chunks: VecDeque::from([index]),
        });
    }

    fn maybe_file_done(&mut self, file: u32) {
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        if f.done_sent || f.unknown > 0 || f.to_send > 0 || self.phase != Phase::Sending {
            return;
        }
        if f.claim.as_ref().is_some_and(|c| c.pending > 0) {
            return;
        }
        let size = match &self.stream {
            Some(StreamState { size: Some(n), .. }) => *n,
            // The stream has not ended: more chunks will come.
            Some(_) => return,
            None => self.manifest.entry(file).map_or(0, |e| e.size),
        };
        let hashes: Option<Vec<Hash>> = f.hashes.iter().copied().collect();
        let Some(hashes) = hashes else { return };
        f.done_sent = true;
        let digest = file_digest(size, self.manifest.chunk_size(), &hashes);
        self.out
            .push_msg(Stream::Control, &Message::FileDone { file, digest });
    }

    /// Issues reads while lanes have room: claim checks first (a few at a time), then chunks.
    fn schedule(&mut self) {
        const VERIFY_INFLIGHT: usize = 4;
        while self.verify_inflight < VERIFY_INFLIGHT {
            let Some((file, index)) = self.verify.pop_front() else {
                break;
            };
            if let Some((offset, len)) = self.manifest.chunk_span(file, index) {
                self.issue_read(file, index, offset, len, None);
                self.verify_inflight += 1;
            }
        }
        let chunk = u64::from(self.manifest.chunk_size());
        let budget = chunk * u64::from(self.cfg.read_ahead);
        let mut reading: u32 = self.lanes.iter().map(|l| l.inflight).sum();
        let mut ahead: u64 = self.reading_bytes
            + (0..self.lanes.len())
                .map(|l| self.out.queued(Stream::Lane(l as u16)) as u64)
                .sum::<u64>();
        let lanes = if self.in_order { 1 } else { self.lanes.len() };
        for lane in 0..lanes {
            loop {
                if reading >= self.read_ramp || (reading > 0 && ahead >= budget) {
                    return;
                }
                let queued = self.out.queued(Stream::Lane(lane as u16)) as u64;
                if queued + u64::from(self.lanes[lane].inflight) * chunk >= budget {
                    break;
                }
                if self.lanes[lane]
                    .work
                    .as_ref()
                    .is_none_or(|w| w.chunks.is_empty())
                {
                    self.lanes[lane].work = self.work.pop_front().or_else(|| self.stream_work());
                }
                let Some(w) = self.lanes[lane].work.as_mut() else {
                    break;
                };
                let Some(index) = w.chunks.pop_front() else {
                    break;
                };
                let file = w.file;
                let span = match self.stream {
                    Some(_) => Some(self.manifest.stream_chunk_span(index)),
                    None => self.manifest.chunk_span(file, index),
                };
                if let Some((offset, len)) = span {
                    self.lanes[lane].inflight += 1;
                    reading += 1;
                    ahead += u64::from(len);
                    self.reading_bytes += u64::from(len);
                    self.issue_read(file, index, offset, len, Some(lane));
                }
            }
        }
    }

    /// The next chunk of a stream that has not ended, once the receiver's answer is in.
    fn stream_work(&mut self) -> Option<Work> {
        let file = self.manifest.stream()?;
        let st = self.stream.as_mut().filter(|s| s.size.is_none())?;
        let f = self.files.get_mut(&file)?;
        let index = st.next;
        st.next = st.next.checked_add(1)?;
        f.to_send += 1;
        Some(Work {
            file,
            chunks: VecDeque::from([index]),
        })
    }

    fn issue_read(&mut self, file: u32, index: u32, offset: u64, len: u32, lane: Option<usize>) {
        // Resume checks are hashed only; chunks to send are compressed while the file's state
        // says so.
        let compress = lane
            .and_then(|_| self.files.get(&file))
            .filter(|f| f.zstd != Zstd::No)
            .map(|_| self.compress_level);
        let id = OpId(self.next_op);
        self.next_op += 1;
        self.reads.insert(
            id,
            Read {
                file,
                index,
                len,
                lane,
            },
        );
        self.disk.push_back(DiskOp::Read {
            id,
            file,
            offset,
            len,
            compress,
        });
    }

    fn path(&self, file: u32) -> String {
        self.manifest
            .entry(file)
            .map_or_else(|| format!("entry {file}"), |e| e.path.clone())
    }

    fn fail(&mut self, e: TransferError) {
        if self.is_over() {
            return;
        }
        self.phase = Phase::Failed;
        report_failure(&mut self.out, &mut self.events, e);
    }
}

/// The zstd level for a compressor that must turn out `plain_bytes_per_sec`: the strongest
/// whose single-core speed still covers it with room to spare (for hashing beside it, and a
/// slower machine). `zstd -b` on a web access log on this project's 2-core VM gave, in MB/s:
/// level 1: 411, 3: 236, 6: 76, 9: 39, 12: 14. Decompression costs about the same at every
/// level.
pub fn level_for(plain_bytes_per_sec: f64) -> i32 {
    const MB: f64 = 1e6;
    match plain_bytes_per_sec {
        r if r > 150.0 * MB => 1,
        r if r > 50.0 * MB => 3,
        r if r > 20.0 * MB => 6,
        r if r > 8.0 * MB => 9,
        _ => 12,
    }
}

/// Whether a file's name says its bytes are compressed already (media, archives, packages):
/// [`Compress::Auto`] does not spend a chunk's compression to find out.
fn precompressed(path: &str) -> bool {
    const EXT: &[&str] = &[
        "7z", "aac", "apk", "avi", "avif", "br", "bz2", "deb", "docx", "flac", "gif", "gz", "heic",
        "jar", "jpeg", "jpg", "lz", "lz4", "lzma", "m4a", "m4v", "mkv", "mov", "mp3", "mp4", "odt",
        "ogg", "opus", "png", "pptx", "rar", "rpm", "tbz", "tgz", "txz", "webm", "webp", "whl",
        "xlsx", "xz", "zip", "zst",
    ];
    path.rsplit_once('.')
        .is_some_and(|(_, ext)| EXT.iter().any(|e| ext.eq_ignore_ascii_case(e)))
}

/// Ends a machine's side of the transfer on `e`: tells the peer why (unless the peer itself
/// reported it), closes the control stream and raises [`Event::Failed`].
pub(crate) fn report_failure(out: &mut Outbox, events: &mut VecDeque<Event>, e: TransferError) {
    tracing::debug!(error = %e, "transfer failed");
    if !matches!(e, TransferError::Peer { .. }) {
        out.push_msg(
            Stream::Control,
            &Message::Error {
                code: e.code(),
                file: None,
                message: truncate(&e.to_string()),
            },
        );
    }
    out.finish(Stream::Control);
    events.push_back(Event::Failed(e));
}

/// Cuts error text to what the wire carries.
pub(crate) fn truncate(s: &str) -> String {
    let mut end = s.len().min(flux_wire::MAX_TEXT_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
// Tests are drivers: they may read the clock the machine takes as input.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn the_level_rises_as_the_path_slows() {
        let mb = 1e6;
        let levels: Vec<i32> = [1000.0, 100.0, 30.0, 10.0, 1.0]
            .iter()
            .map(|r| level_for(r * mb))
            .collect();
        assert_eq!(levels, [1, 3, 6, 9, 12]);
    }

    fn sender(compress: Compress, peer_features: u64) -> Sender {
        let m = Manifest::new(Vec::new(), 1 << 20).expect("empty manifest");
        let mut s = Sender::new(
            Arc::new(m),
            SenderConfig {
                compress,
                ..SenderConfig::default()
            },
        );
        let mut hello_frame = Vec::new();
        crate::hello(peer_features).encode(&mut hello_frame);
        s.handle_stream_data(Instant::now(), Stream::Control, &hello_frame);
        s
    }

    #[test]
    fn the_path_rate_sets_the_level_only_when_compressing() {
        let mut s = sender(Compress::Auto, FEATURE_ZSTD);
        // Before any frame the ratio is taken as 1:2: 1 MB/s of path needs 2 MB/s of plain.
        s.set_path_rate(1_000_000);
        assert_eq!(s.compress_level(), 12);
        s.set_path_rate(1_000_000_000);
        assert_eq!(s.compress_level(), 1);
        let mut off = sender(Compress::Off, FEATURE_ZSTD);
        off.set_path_rate(1_000_000);
        assert_eq!(off.compress_level(), 1);
        // A receiver without zstd gets plain chunks: nothing to tune.
        let mut old = sender(Compress::On, 0);
        old.set_path_rate(1_000_000);
        assert_eq!(old.compress_level(), 1);
    }
}
