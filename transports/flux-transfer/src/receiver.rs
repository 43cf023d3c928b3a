//! The receiving side of one transfer.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flux_wire::{ChunkRange, EntryKind, FEATURE_TEXT, FEATURE_ZSTD, Hash, Message};

use crate::digest::{claim_digest, file_digest};
use bytes::Bytes;

use crate::io::{
    ChunkData, DiskFailure, DiskOp, DiskResult, Event, FrameBuf, OpId, Outbox, Stream,
    TransferError,
};
use crate::manifest::{Assembler, Limits, Manifest};
use crate::sender::{report_failure, truncate};
use crate::{check_hello, hello};

/// Settings of a [`Receiver`].
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Limits on the manifest a sender may offer.
    pub limits: Limits,
    /// Whether existing destination entries may be replaced.
    pub overwrite: bool,
    /// Whether chunks the receiver already holds (an identical existing file, a partial file
    /// from an interrupted transfer) are claimed so the sender skips them. A claim tells the
    /// sender whether the receiver holds those bytes; without it every byte is sent, an
    /// existing file is a conflict (replaced only when `overwrite` is set) and partial files
    /// start over. See [`LocalFile::unskipped`].
    pub skip_identical: bool,
    /// Inactivity after which the transfer fails (not applied while the local user decides).
    pub stall_timeout: Duration,
    /// Verified chunks waiting for the disk before stream reading pauses.
    pub max_pending_writes: usize,
    /// Data lanes the sender may open.
    pub max_lanes: u16,
    /// Times one chunk may fail verification before the transfer fails.
    pub max_corrupt: u32,
    /// Optional features this side advertises in its hello (default: all it implements).
    pub features: u64,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            overwrite: false,
            skip_identical: true,
            stall_timeout: Duration::from_secs(30),
            max_pending_writes: 16,
            max_lanes: 16,
            max_corrupt: 3,
            features: crate::FEATURES,
        }
    }
}

/// What the driver found at the destination for one file before accepting.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum LocalFile {
    /// A partial file whose sidecar and data agree on these chunks.
    Partial(BTreeMap<u32, Hash>),
    /// A complete file of the same size at the final path, with the hashes of all its chunks.
    Existing(Vec<Hash>),
    /// Something at the final path that cannot be the same file (another size, a directory).
    Conflict,
}

impl LocalFile {
    /// What this file counts as when nothing held may be skipped
    /// ([`ReceiverConfig::skip_identical`] off): an existing file is a conflict, and a partial
    /// file is not claimed (`None`), so every byte is sent.
    pub fn unskipped(self) -> Option<LocalFile> {
        match self {
            LocalFile::Partial(_) => None,
            LocalFile::Existing(_) | LocalFile::Conflict => Some(LocalFile::Conflict),
        }
    }
}

/// Receives one share.
///
/// Driving contract: the receiver speaks first (its hello is queued on creation). Feed
/// [`Receiver::handle_stream_data`], [`Receiver::handle_stream_end`],
/// [`Receiver::handle_disk_done`] and [`Receiver::handle_timeout`]; after each, move bytes out of
/// [`Receiver::outbox`], then drain [`Receiver::poll_disk`] and [`Receiver::poll_event`]. On
/// [`Event::ManifestReady`], show [`Receiver::manifest`] and call [`Receiver::accept`] or
/// [`Receiver::reject`]. Read lanes only while [`Receiver::wants_data`] holds: that bounds the
/// memory held here to `(lanes + max_pending_writes) × chunk_size`.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    phase: Phase,
    control: FrameBuf,
    out: Outbox,
    disk: VecDeque<DiskOp>,
    events: VecDeque<Event>,
    next_op: u64,
    assembler: Option<Assembler>,
    manifest: Option<Arc<Manifest>>,
    files: HashMap<u32, FileState>,
    lanes: HashMap<u16, LaneState>,
    /// Writes in flight: file, chunk, plain bytes, wire bytes.
    writes: HashMap<OpId, (u32, u32, u32, u32)>,
    finalizes: HashMap<OpId, u32>,
    unfinished: usize,
    bytes_done: u64,
    files_done: u64,
    since_progress: u32,
    last_activity: Option<Instant>,
    /// Feature bits of the sender's hello.
    peer_features: u64,
    /// Paused by the local user: lanes are not read and silence is no stall.
    paused: bool,
    /// The sender's text (`thru host --text`), once it arrived.
    text: Option<String>,
}

#[derive(Debug, Eq, PartialEq)]
enum Phase {
    AwaitHello,
    AwaitManifest,
    AwaitDecision,
    Receiving,
    Finishing,
    AwaitClose,
    Done,
    Failed,
}

/// One file being received. Its per-chunk state grows with the chunks actually claimed,
/// in flight or verified, never with the size the manifest declares: accepting a share
/// allocates the same for a declared petabyte as for a byte.
#[derive(Debug)]
struct FileState {
    /// Chunks in the file.
    count: u32,
    /// Hashes of the chunks verified so far (received and written, or held and confirmed).
    verified: BTreeMap<u32, Hash>,
    /// Chunks held locally and claimed, awaiting the sender's verdict.
    claimed: BTreeMap<u32, Hash>,
    /// Chunks handed to the disk and not yet written.
    writing: HashMap<u32, Hash>,
    claim_pending: bool,
    existing: bool,
    written: bool,
    digest: Option<Hash>,
    complete: bool,
    corrupt: HashMap<u32, u32>,
    /// A stream ([`EntryKind::Stream`]): `count` is `u32::MAX` until [`Message::StreamEnd`]
    /// gives the size.
    stream: Option<StreamInfo>,
}

/// What a receiver knows of a stream while it arrives.
#[derive(Debug, Default)]
struct StreamInfo {
    /// Its size, once the sender said.
    size: Option<u64>,
    /// The one chunk shorter than the chunk size (the last), once seen: index and length.
    short: Option<(u32, u32)>,
    /// The highest chunk index seen.
    highest: Option<u32>,
}

#[derive(Debug, Default)]
struct LaneState {
    header: FrameBuf,
    current: Option<Incoming>,
}

#[derive(Debug)]
struct Incoming {
    file: u32,
    index: u32,
    offset: u64,
    len: u32,
    /// Payload bytes on the lane: `len`, or the size of the zstd frame.
    wire_len: u32,
    compressed: bool,
    hash: Hash,
    data: ChunkData,
}

impl Receiver {
    /// A receiver; its hello is queued on the control stream at once.
    pub fn new(cfg: ReceiverConfig) -> Self {
        let mut out = Outbox::default();
        out.push_msg(Stream::Control, &hello(cfg.features));
        Self {
            cfg,
            phase: Phase::AwaitHello,
            control: FrameBuf::default(),
            out,
            disk: VecDeque::new(),
            events: VecDeque::new(),
            next_op: 0,
            assembler: None,
            manifest: None,
            files: HashMap::new(),
            lanes: HashMap::new(),
            writes: HashMap::new(),
            finalizes: HashMap::new(),
            unfinished: 0,
            bytes_done: 0,
            files_done: 0,
            since_progress: 0,
            last_activity: None,
            peer_features: 0,
            paused: false,
            text: None,
        }
    }

    /// Bytes arrived on `stream` (copied; [`handle_stream_bytes`](Self::handle_stream_bytes)
    /// keeps owned bytes without a copy).
    pub fn handle_stream_data(&mut self, now: Instant, stream: Stream, data: &[u8]) {
        self.handle_stream_bytes(now, stream, Bytes::copy_from_slice(data));
    }

    /// Owned bytes arrived on `stream`. Chunk data is kept as the pieces it came in (no copy)
    /// until the driver gathers it for verification and writing.
    pub fn handle_stream_bytes(&mut self, now: Instant, stream: Stream, data: Bytes) {
        if self.is_over() {
            return;
        }
        self.last_activity = Some(now);
        match stream {
            Stream::Control => {
                self.control.push(&data);
                loop {
                    match self.control.next() {
                        Ok(Some(m)) => self.on_control(m),
                        Ok(None) => break,
                        Err(e) => return self.fail(e.into()),
                    }
                    if self.is_over() {
                        break;
                    }
                }
            }
            Stream::Lane(n) => {
                if n >= self.cfg.max_lanes {
                    return self.fail(TransferError::Protocol(format!(
                        "more than {} data lanes",
                        self.cfg.max_lanes
                    )));
                }
                self.on_lane_data(n, data);
            }
        }
    }

    /// The peer finished or reset `stream`.
    pub fn handle_stream_end(&mut self, now: Instant, stream: Stream) {
        if self.is_over() {
            return;
        }
        self.last_activity = Some(now);
        match stream {
            Stream::Control => {
                self.fail(TransferError::Protocol("control stream ended early".into()))
            }
            Stream::Lane(n) => {
                let torn = self
                    .lanes
                    .get(&n)
                    .is_some_and(|l| l.current.is_some() || !l.header.is_empty());
                if torn {
                    self.fail(TransferError::Protocol(format!(
                        "data lane {n} ended inside a chunk"
                    )));
                }
            }
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
        if let Some((file, index, len, wire)) = self.writes.remove(&id) {
            if self.is_over() {
                return;
            }
            match res {
                Err(DiskFailure::Corrupt) => return self.on_corrupt(file, index),
                Err(DiskFailure::Decompress(why)) => {
                    let path = self.path(file);
                    return self.fail(TransferError::Protocol(format!(
                        "{path}: compressed chunk {index} is bad: {why}"
                    )));
                }
                Err(e) => return self.fail(self.disk_error(e)),
                Ok(_) => {}
            }
            let Some(f) = self.files.get_mut(&file) else {
                return;
            };
            if let Some(h) = f.writing.remove(&index) {
                f.verified.insert(index, h);
            }
            self.bytes_done += u64::from(len);
            self.events.push_back(Event::ChunkVerified {
                file,
                index,
                len,
                wire,
            });
            self.since_progress += 1;
            if self.since_progress >= 16 {
                self.send_progress();
            }
            self.maybe_complete(file);
        } else if let Some(file) = self.finalizes.remove(&id) {
            if self.is_over() {
                return;
            }
            match res {
                Ok(_) => {
                    self.events.push_back(Event::FileComplete { file });
                    self.entry_done(file);
                }
                Err(DiskFailure::Exists(p)) => self.fail(TransferError::Exists(p)),
                Err(e) => self.fail(self.disk_error(e)),
            }
        } else if self.phase == Phase::Finishing {
            if let Err(e) = res {
                return self.fail(self.disk_error(e));
            }
            self.send_progress();
            self.out.push_msg(Stream::Control, &Message::Complete);
            self.phase = Phase::AwaitClose;
        }
    }

    /// Time has passed; fails the transfer if it stalled.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| now >= t) {
            let what = match self.phase {
                Phase::AwaitHello | Phase::AwaitManifest => "waiting for the sender's manifest",
                _ => "no data from the sender",
            };
            self.fail(TransferError::Timeout(what));
        }
    }

    /// Accepts the share. `local` holds what the driver found at the destination for files that
    /// are partly or wholly present (by manifest index); every other file is fetched whole.
    pub fn accept(&mut self, now: Instant, local: HashMap<u32, LocalFile>) {
        self.accept_chosen(now, local, None);
    }

    /// Accepts only the entries in `chosen` (`None`: all): the sender is told
    /// ([`Message::Select`]) and sends nothing else; what is held of the others is neither
    /// claimed nor touched. The caller includes the directories the chosen entries lie in.
    /// A sender without [`flux_wire::FEATURE_SELECT`] cannot send a subset: the transfer
    /// fails, saying so.
    pub fn accept_chosen(
        &mut self,
        now: Instant,
        mut local: HashMap<u32, LocalFile>,
        chosen: Option<&BTreeSet<u32>>,
    ) {
        if self.phase != Phase::AwaitDecision {
            return;
        }
        if let Some(c) = chosen {
            if self.peer_features & flux_wire::FEATURE_SELECT == 0 {
                return self.fail(TransferError::Protocol(
                    "the sender's thru cannot send a chosen subset (update it, or receive \
                     everything)"
                        .into(),
                ));
            }
            local.retain(|i, _| c.contains(i));
        }
        let wanted = |i: u32| chosen.is_none_or(|c| c.contains(&i));
        self.last_activity = Some(now);
        let Some(m) = self.manifest.clone() else {
            return;
        };
        if !self.cfg.skip_identical {
            local = local
                .into_iter()
                .filter_map(|(i, l)| l.unskipped().map(|l| (i, l)))
                .collect();
        }
        let mut haves = Vec::new();
        for (i, e) in m.entries().iter().enumerate() {
            let i = i as u32;
            if !e.kind.has_data() || !wanted(i) {
                continue;
            }
            let stream = e.kind == EntryKind::Stream;
            let n = if stream { u32::MAX } else { m.chunk_count(i) };
            let mut f = FileState {
                count: n,
                verified: BTreeMap::new(),
                claimed: BTreeMap::new(),
                writing: HashMap::new(),
                claim_pending: false,
                existing: false,
                written: false,
                digest: None,
                complete: false,
                corrupt: HashMap::new(),
                stream: stream.then(StreamInfo::default),
            };
            if stream {
                // Nothing held can be a stream's bytes: its size is not known, and a stream
                // cannot be resumed. Whatever is at its name is in the way.
                if local.remove(&i).is_some() && !self.cfg.overwrite {
                    return self.fail(TransferError::Exists(e.path.clone()));
                }
                self.files.insert(i, f);
                continue;
            }
            let claims: BTreeMap<u32, Hash> = match local.remove(&i) {
                None => BTreeMap::new(),
                Some(LocalFile::Partial(c)) => c.into_iter().filter(|(k, _)| *k < n).collect(),
                Some(LocalFile::Existing(h)) if h.len() == n as usize => {
                    f.existing = true;
                    h.into_iter()
                        .enumerate()
                        .map(|(k, h)| (k as u32, h))
                        .collect()
                }
                Some(LocalFile::Existing(_) | LocalFile::Conflict) => {
                    if !self.cfg.overwrite {
                        return self.fail(TransferError::Exists(e.path.clone()));
                    }
                    f.existing = true;
                    BTreeMap::new()
                }
            };
            if !claims.is_empty() || f.existing {
                f.claim_pending = true;
                haves.push(Message::Have {
                    file: i,
                    ranges: to_ranges(claims.keys().copied()),
                    digest: claim_digest(claims.iter().map(|(k, h)| (*k, h))),
                });
                f.claimed = claims;
            }
            self.files.insert(i, f);
        }
        if let Some(c) = chosen {
            let ranges = to_ranges(c.iter().copied().filter(|&i| (i as usize) < m.len()));
            self.out
                .push_msg(Stream::Control, &Message::Select { ranges });
        }
        self.out.push_msg(Stream::Control, &Message::Accept);
        for h in &haves {
            self.out.push_msg(Stream::Control, h);
        }
        self.out.push_msg(Stream::Control, &Message::HaveDone);
        self.phase = Phase::Receiving;
        self.unfinished = (0..m.len() as u32).filter(|&i| wanted(i)).count();
        // Directories and links need no data: put them in place now.
        for (i, e) in m.entries().iter().enumerate() {
            if !e.kind.has_data() && wanted(i as u32) {
                self.finalize(i as u32);
            }
        }
        self.maybe_finish();
    }

    /// Instead of an answer: the receiver only looked (`thru join --list`). The sender is told
    /// ([`Message::Browsed`], or a refusal saying so to a sender without
    /// [`flux_wire::FEATURE_SELECT`]) and the transfer ends without an error.
    pub fn browse_done(&mut self) {
        if self.phase != Phase::AwaitDecision {
            return;
        }
        if self.peer_features & flux_wire::FEATURE_SELECT == 0 {
            self.out.push_msg(
                Stream::Control,
                &Message::Reject {
                    reason: "the receiver only listed the files".into(),
                },
            );
        } else {
            self.out.push_msg(Stream::Control, &Message::Browsed);
        }
        self.out.finish(Stream::Control);
        self.phase = Phase::Done;
        self.events.push_back(Event::Done);
    }

    /// Pauses (`true`) or resumes the transfer: while paused the data lanes are not read, so
    /// QUIC flow control holds the sender, and neither side counts the silence as a stall.
    /// Returns false (and does nothing) when the sender cannot pause
    /// ([`flux_wire::FEATURE_PAUSE`]) or the transfer is not receiving.
    pub fn set_paused(&mut self, now: Instant, paused: bool) -> bool {
        if self.peer_features & flux_wire::FEATURE_PAUSE == 0
            || !matches!(self.phase, Phase::Receiving | Phase::Finishing)
        {
            return false;
        }
        if self.paused != paused {
            self.paused = paused;
            self.last_activity = Some(now);
            self.out
                .push_msg(Stream::Control, &Message::Pause { paused });
            self.events.push_back(Event::Paused(paused));
        }
        true
    }

    /// Whether the local user paused the transfer.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Declines the share.
    pub fn reject(&mut self, reason: &str) {
        if self.is_over() {
            return;
        }
        self.out.push_msg(
            Stream::Control,
            &Message::Reject {
                reason: truncate(reason),
            },
        );
        self.out.finish(Stream::Control);
        self.phase = Phase::Failed;
        self.events
            .push_back(Event::Failed(TransferError::Declined(reason.to_owned())));
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
        self.disk.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Receiver::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitDecision | Phase::Done | Phase::Failed => None,
            _ if self.paused => None,
            _ => self.last_activity.map(|t| t + self.cfg.stall_timeout),
        }
    }

    /// Whether the driver should read data lanes now (false while the disk lags behind, or
    /// while paused).
    pub fn wants_data(&self) -> bool {
        !self.paused && self.writes.len() < self.cfg.max_pending_writes
    }

    /// The manifest, once complete.
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
    }

    /// The text the sender offered with its manifest (`thru host --text`), if any. Show it
    /// only once the user accepted the offer.
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// The transfer error for a failed disk request: a full device says how much more the
    /// transfer needs.
    fn disk_error(&self, e: DiskFailure) -> TransferError {
        match e {
            DiskFailure::NoSpace(path) => TransferError::NoSpace {
                path,
                needed: self
                    .manifest
                    .as_ref()
                    .map_or(0, |m| m.total_bytes().saturating_sub(self.bytes_done)),
            },
            e => TransferError::Io(e.to_string()),
        }
    }

    /// Verified bytes so far, including those held before the transfer.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    /// Whether the transfer has ended, successfully or not.
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }

    fn on_control(&mut self, m: Message) {
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
                self.peer_features = features;
                self.phase = Phase::AwaitManifest;
            }
            (Phase::AwaitManifest, Message::Text { body })
                if self.assembler.is_none()
                    && self.text.is_none()
                    && self.cfg.features & FEATURE_TEXT != 0 =>
            {
                self.text = Some(body);
            }
            (
                Phase::AwaitManifest,
                Message::ManifestBegin {
                    entry_count,
                    total_bytes,
                    chunk_size,
                },
            ) if self.assembler.is_none() => {
                match Assembler::begin(entry_count, total_bytes, chunk_size, self.cfg.limits) {
                    Ok(a) => self.assembler = Some(a),
                    Err(e) => self.fail(e.into()),
                }
            }
            (Phase::AwaitManifest, Message::ManifestEntries(entries))
                if self.assembler.is_some() =>
            {
                for e in entries {
                    if let Some(a) = self.assembler.as_mut()
                        && let Err(err) = a.push(e)
                    {
                        return self.fail(err.into());
                    }
                }
            }
            (Phase::AwaitManifest, Message::ManifestEnd) if self.assembler.is_some() => {
                if let Some(a) = self.assembler.take() {
                    match a.finish() {
                        Ok(m) => {
                            self.manifest = Some(Arc::new(m));
                            self.phase = Phase::AwaitDecision;
                            self.events.push_back(Event::ManifestReady);
                        }
                        Err(e) => self.fail(e.into()),
                    }
                }
            }
            (
                Phase::Receiving | Phase::Finishing | Phase::AwaitClose,
                Message::Verdict { file, accepted },
            ) => self.on_verdict(file, accepted),
            (
                Phase::Receiving | Phase::Finishing | Phase::AwaitClose,
                Message::FileDone { file, digest },
            ) => {
                let Some(f) = self.files.get_mut(&file) else {
                    return self.fail(TransferError::Protocol(format!(
                        "file-done for entry {file}, which is not a file"
                    )));
                };
                if f.digest.is_some() {
                    return self.fail(TransferError::Protocol(format!(
                        "second file-done for entry {file}"
                    )));
                }
                f.digest = Some(digest);
                self.maybe_complete(file);
            }
            (
                Phase::Receiving | Phase::Finishing | Phase::AwaitClose,
                Message::StreamEnd { file, size },
            ) => self.on_stream_end(file, size),
            (Phase::AwaitClose, Message::Close) => {
                self.phase = Phase::Done;
                self.out.finish(Stream::Control);
                self.events.push_back(Event::Done);
            }
            (phase, m) => {
                let detail = format!("unexpected {:?} while {phase:?}", m.message_type());
                self.fail(TransferError::Protocol(detail));
            }
        }
    }

    /// The sender read the stream to its end: `size` fixes the chunk count, and what arrived
    /// must fit it.
    fn on_stream_end(&mut self, file: u32, size: u64) {
        let cs = self.manifest.as_ref().map_or(0, |m| m.chunk_size());
        let max = self.cfg.limits.max_total_bytes;
        let path = self.path(file);
        let Some(f) = self.files.get_mut(&file) else {
            return self.fail(TransferError::Protocol(format!(
                "stream end for entry {file}, which is not being received"
            )));
        };
        let Some(st) = f.stream.as_mut().filter(|s| s.size.is_none()) else {
            return self.fail(TransferError::Protocol(format!(
                "stream end for {path}, which is not a stream or has ended already"
            )));
        };
        let count = u64::from(crate::manifest::chunks_for(size, cs));
        let fits = count * u64::from(cs) >= size
            && st.highest.is_none_or(|h| u64::from(h) < count)
            && st
                .short
                .is_none_or(|(i, len)| u64::from(i) * u64::from(cs) + u64::from(len) == size);
        if size > max {
            return self.fail(TransferError::Protocol(format!(
                "the stream {path} ended at {size} bytes, over the limit of {max}"
            )));
        }
        if !fits {
            return self.fail(TransferError::Protocol(format!(
                "the stream {path} ended at {size} bytes, which does not fit the chunks it sent"
            )));
        }
        st.size = Some(size);
        f.count = count as u32;
        self.events.push_back(Event::StreamEnded { size });
        self.maybe_complete(file);
    }

    fn on_verdict(&mut self, file: u32, accepted: bool) {
        let overwrite = self.cfg.overwrite;
        let path = self.path(file);
        let Some(f) = self.files.get_mut(&file).filter(|f| f.claim_pending) else {
            return self.fail(TransferError::Protocol(format!(
                "verdict for entry {file}, which had no claim"
            )));
        };
        f.claim_pending = false;
        let claimed = std::mem::take(&mut f.claimed);
        let mut held = Vec::new();
        if accepted {
            held.extend(claimed.keys().copied());
            f.verified.extend(claimed);
        }
        if !accepted && f.existing && !overwrite {
            return self.fail(TransferError::Exists(path));
        }
        if let Some(m) = &self.manifest {
            let bytes: u64 = held
                .iter()
                .filter_map(|&k| m.chunk_span(file, k))
                .map(|(_, l)| u64::from(l))
                .sum();
            self.bytes_done += bytes;
        }
        self.maybe_complete(file);
    }

    fn on_lane_data(&mut self, lane: u16, data: Bytes) {
        let mut pos = 0;
        while pos < data.len() {
            let state = self.lanes.entry(lane).or_default();
            if let Some(inc) = state.current.as_mut() {
                let take = (inc.wire_len as usize - inc.data.len()).min(data.len() - pos);
                inc.data.push(data.slice(pos..pos + take));
                pos += take;
                if inc.data.len() == inc.wire_len as usize {
                    if let Some(inc) = state.current.take() {
                        self.on_chunk(inc);
                    }
                    if self.is_over() {
                        return;
                    }
                }
                continue;
            }
            if state.header.is_empty() {
                match flux_wire::decode_frame(&data[pos..]) {
                    Ok(Some((m, used))) => {
                        pos += used;
                        self.start_chunk(lane, m);
                        if self.is_over() {
                            return;
                        }
                    }
                    Ok(None) => {
                        state.header.push(&data[pos..]);
                        return;
                    }
                    Err(e) => return self.fail(e.into()),
                }
            } else {
                state.header.push(&data[pos..]);
                match state.header.next() {
                    Ok(Some(m)) => {
                        let rest = state.header.take_rest();
                        self.start_chunk(lane, m);
                        if !self.is_over() {
                            self.on_lane_data(lane, Bytes::from(rest));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => self.fail(e.into()),
                }
                return;
            }
        }
    }

    fn start_chunk(&mut self, lane: u16, m: Message) {
        let (file, index, len, wire_len, compressed, hash) = match m {
            Message::ChunkHeader {
                file,
                index,
                len,
                hash,
            } => (file, index, len, len, false, hash),
            Message::ZChunkHeader {
                file,
                index,
                len,
                wire_len,
                hash,
            } if self.cfg.features & FEATURE_ZSTD != 0 => (file, index, len, wire_len, true, hash),
            m => {
                return self.fail(TransferError::Protocol(format!(
                    "{:?} on a data lane",
                    m.message_type()
                )));
            }
        };
        if !matches!(self.phase, Phase::Receiving) {
            return self.fail(TransferError::Protocol(
                "chunk data before the share was accepted".into(),
            ));
        }
        let Some(m) = &self.manifest else { return };
        let Some(entry) = m.entry(file).filter(|e| e.kind.has_data()) else {
            return self.fail(TransferError::Protocol(format!(
                "chunk for entry {file}, which is not a file"
            )));
        };
        let span = match self.files.get(&file).and_then(|f| f.stream.as_ref()) {
            Some(st) => match stream_span(m.chunk_size(), st, index, len) {
                Ok(span) => Some(span),
                Err(why) => {
                    let path = entry.path.clone();
                    return self.fail(TransferError::Protocol(format!(
                        "chunk {index} of the stream {path}: {why}"
                    )));
                }
            },
            None => m.chunk_span(file, index),
        };
        let Some((offset, expected)) = span else {
            return self.fail(TransferError::Protocol(format!(
                "chunk {index} lies beyond the end of {} ({} bytes)",
                entry.path, entry.size
            )));
        };
        if len != expected {
            return self.fail(TransferError::Protocol(format!(
                "chunk {index} of {} announces {len} bytes but the manifest implies {expected}",
                entry.path
            )));
        }
        // A frame never needs more room than the plain bytes (the sender sends those instead):
        // what a lane holds stays bounded by the chunk size.
        if compressed && (wire_len == 0 || wire_len > len) {
            return self.fail(TransferError::Protocol(format!(
                "compressed chunk {index} of {} announces {wire_len} bytes on the wire for {len} \
                 plain bytes",
                entry.path
            )));
        }
        let max = self.cfg.limits.max_total_bytes;
        if let Some(st) = self.files.get_mut(&file).and_then(|f| f.stream.as_mut()) {
            if offset + u64::from(len) > max {
                return self.fail(TransferError::Protocol(format!(
                    "the stream passed the limit of {max} bytes"
                )));
            }
            st.highest = st.highest.max(Some(index));
            if len < m.chunk_size() {
                st.short = Some((index, len));
            }
        }
        if let Some(state) = self.lanes.get_mut(&lane) {
            state.current = Some(Incoming {
                file,
                index,
                offset,
                len,
                wire_len,
                compressed,
                hash,
                data: ChunkData::default(),
            });
            if wire_len == 0
                && let Some(inc) = state.current.take()
            {
                self.on_chunk(inc);
            }
        }
    }

    fn on_chunk(&mut self, inc: Incoming) {
        let Some(f) = self.files.get_mut(&inc.file) else {
            return;
        };
        if f.writing.contains_key(&inc.index) || f.verified.contains_key(&inc.index) {
            // A refetched chunk can arrive twice; the first good copy counts.
            return;
        }
        // The driver hashes the bytes and writes them only if they match (DiskOp::WriteChunk).
        f.claimed.remove(&inc.index);
        f.writing.insert(inc.index, inc.hash);
        f.written = true;
        let id = self.op_id();
        self.writes
            .insert(id, (inc.file, inc.index, inc.len, inc.wire_len));
        self.disk.push_back(DiskOp::WriteChunk {
            id,
            file: inc.file,
            index: inc.index,
            offset: inc.offset,
            hash: inc.hash,
            data: inc.data,
            compressed: inc.compressed.then_some(inc.len),
        });
    }

    /// The driver found a chunk's bytes did not match their hash: ask for it again, or give up
    /// after `max_corrupt` bad copies.
    fn on_corrupt(&mut self, file: u32, index: u32) {
        let max = self.cfg.max_corrupt;
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        f.writing.remove(&index);
        let times = f.corrupt.entry(index).or_insert(0);
        *times += 1;
        let times = *times;
        if times > max {
            return self.fail(TransferError::Integrity { file, index, times });
        }
        self.events.push_back(Event::ChunkCorrupt { file, index });
        self.out
            .push_msg(Stream::Control, &Message::Refetch { file, index });
    }

    fn maybe_complete(&mut self, file: u32) {
        let Some(m) = self.manifest.clone() else {
            return;
        };
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        if f.complete || f.verified.len() < f.count as usize || f.claim_pending {
            return;
        }
        let Some(digest) = f.digest else { return };
        let size = match &f.stream {
            Some(st) => st.size.unwrap_or(0),
            None => m.entry(file).map_or(0, |e| e.size),
        };
        if file_digest(size, m.chunk_size(), f.verified.values()) != digest {
            let path = self.path(file);
            return self.fail(TransferError::Protocol(format!(
                "whole-file digest of {path} does not match its chunks"
            )));
        }
        f.complete = true;
        if f.existing && !f.written {
            self.events.push_back(Event::FileSkipped { file });
            self.entry_done(file);
        } else {
            self.finalize(file);
        }
    }

    fn finalize(&mut self, file: u32) {
        let id = self.op_id();
        self.finalizes.insert(id, file);
        let size = self
            .files
            .get(&file)
            .and_then(|f| f.stream.as_ref())
            .and_then(|s| s.size);
        self.disk.push_back(DiskOp::Finalize {
            id,
            file,
            replace: self.cfg.overwrite,
            size,
        });
    }

    fn entry_done(&mut self, file: u32) {
        if self.files.contains_key(&file) {
            self.files_done += 1;
            self.send_progress();
        }
        self.unfinished -= 1;
        self.maybe_finish();
    }

    fn maybe_finish(&mut self) {
        if self.phase == Phase::Receiving && self.unfinished == 0 {
            self.phase = Phase::Finishing;
            let id = self.op_id();
            self.disk.push_back(DiskOp::Finish { id });
        }
    }

    fn send_progress(&mut self) {
        self.since_progress = 0;
        self.out.push_msg(
            Stream::Control,
            &Message::Progress {
                bytes_done: self.bytes_done,
                files_done: self.files_done,
            },
        );
    }

    fn op_id(&mut self) -> OpId {
        self.next_op += 1;
        OpId(self.next_op)
    }

    fn path(&self, file: u32) -> String {
        self.manifest
            .as_ref()
            .and_then(|m| m.entry(file))
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

/// Offset and length chunk `index` of a stream must have, given what is known of the stream
/// (`len` is what its header announces): whole chunks before a short last one, and nothing
/// past its end once that is known.
fn stream_span(cs: u32, st: &StreamInfo, index: u32, len: u32) -> Result<(u64, u32), String> {
    let offset = u64::from(index) * u64::from(cs);
    if let Some(size) = st.size {
        if offset >= size {
            return Err(format!("it lies past the stream's end ({size} bytes)"));
        }
        return Ok((offset, (size - offset).min(u64::from(cs)) as u32));
    }
    if len == 0 || len > cs {
        return Err(format!(
            "{len} bytes, where a stream's chunks hold 1 to {cs}"
        ));
    }
    match st.short {
        Some((i, _)) if index > i => Err(format!("it follows the stream's last chunk, {i}")),
        Some((i, _)) if len < cs && index != i => {
            Err("a second short chunk (only the last may be short)".into())
        }
        _ => Ok((offset, len)),
    }
}

/// Compresses ascending chunk indices into ranges.
fn to_ranges(indices: impl IntoIterator<Item = u32>) -> Vec<ChunkRange> {
    let mut out: Vec<ChunkRange> = Vec::new();
    for i in indices {
        match out.last_mut() {
            Some(r) if r.start + r.len == i => r.len += 1,
            _ => out.push(ChunkRange { start: i, len: 1 }),
        }
    }
    out
}
