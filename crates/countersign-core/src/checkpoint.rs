//! Signed audit checkpoints and the offline verifier of an exported audit log.
//!
//! A checkpoint is an Ed25519 signature by the gateway's audit key over an org's chain head: "the event at
//! `seq` of `org_id` has hash `head_hash`, as of `time_us`". Anyone holding the public key can check an
//! exported log without the gateway, and a retained log whose prefix was deleted stays verifiable because a
//! checkpoint at the last deleted seq vouches for the `prev_hash` of the first kept event.
//!
//! # What is signed
//!
//! The signed message is the UTF-8 bytes of the canonical JSON ([`canonical_json`]: compact, keys sorted) of
//! exactly these four fields, with no trailing newline:
//!
//! ```text
//! {"head_hash":"<64 lowercase hex>","org_id":"<org id>","seq":<integer>,"time_us":<integer>}
//! ```
//!
//! `head_hash` is the `hash` of the event at `seq`; `time_us` is microseconds since the Unix epoch (UTC), the
//! same representation as [`AuditEvent::time_us`]. The signature is Ed25519 (RFC 8032, pure, no context) in
//! standard base64 with padding; the public key is its 32 bytes in standard base64; `key_id` is the first 16
//! lowercase hex characters of SHA-256 of those 32 public-key bytes. `key_id` and `signature` are not part of
//! the signed message.
//!
//! # Export format
//!
//! JSON Lines. Each non-blank line is either an [`AuditEvent`] exactly as it serializes, or a checkpoint line
//! `{"checkpoint": {…}}` holding a serialized [`Checkpoint`] (see [`CheckpointLine`]). [`verify_export`]
//! states the rules an export must meet.
//!
//! Besides pure functions, this module has [`load_or_create`], which reads or writes the key file.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::Rng;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

use crate::audit::{AuditEvent, GENESIS_HASH, RETENTION_APPLIED, canonical_json};

/// A signed statement of an org's chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub org_id: String,
    pub seq: i64,
    pub head_hash: String,
    /// Microseconds since the Unix epoch, as in [`AuditEvent::time_us`].
    pub time_us: i64,
    /// First 16 hex characters of SHA-256 of the signing public key's 32 bytes.
    pub key_id: String,
    /// Ed25519 signature of [`Checkpoint::signed_message`], standard base64.
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes that are signed (as a string): see the module documentation.
    pub fn signed_message(&self) -> String {
        canonical_json(&serde_json::json!({
            "org_id": self.org_id,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "time_us": self.time_us,
        }))
    }
}

/// One checkpoint line of an export: `{"checkpoint": {…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointLine {
    pub checkpoint: Checkpoint,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("audit signing key file {}: {source}", .path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit signing key file {}: {message}", .path.display())]
    KeyFileContents { path: PathBuf, message: String },
    #[error("malformed audit signing key: {0}")]
    MalformedSigningKey(String),
    #[error("malformed public key: {0}")]
    MalformedPublicKey(String),
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    #[error("signed by key {found}, not by the given key {expected}")]
    KeyMismatch { expected: String, found: String },
    #[error("the signature does not verify with the given public key")]
    BadSignature,
    #[error("reading the export: {0}")]
    Read(#[source] std::io::Error),
}

/// The gateway's audit signing key.
pub struct AuditSigner {
    key: SigningKey,
}

impl std::fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSigner").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

impl AuditSigner {
    /// A new key from 32 random bytes.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let key = SigningKey::from_bytes(&bytes);
        bytes.fill(0);
        AuditSigner { key }
    }

    /// Reads a key file's contents: the 32 secret bytes in standard base64 on one line (surrounding
    /// whitespace is ignored).
    pub fn from_file_contents(contents: &str) -> Result<Self, CheckpointError> {
        let mut bytes = STANDARD
            .decode(contents.trim())
            .map_err(|e| CheckpointError::MalformedSigningKey(format!("not base64: {e}")))?;
        let secret: Result<[u8; 32], _> = bytes.as_slice().try_into();
        let len = bytes.len();
        bytes.fill(0);
        match secret {
            Ok(mut secret) => {
                let key = SigningKey::from_bytes(&secret);
                secret.fill(0);
                Ok(AuditSigner { key })
            }
            Err(_) => Err(CheckpointError::MalformedSigningKey(format!("expected 32 bytes, found {len}"))),
        }
    }

    /// The key file's contents: the 32 secret bytes in standard base64 and a newline.
    pub fn to_file_contents(&self) -> String {
        format!("{}\n", STANDARD.encode(self.key.as_bytes()))
    }

    /// The 32 public-key bytes in standard base64: what a verifier needs.
    pub fn public_key_base64(&self) -> String {
        STANDARD.encode(self.key.verifying_key().as_bytes())
    }

    pub fn key_id(&self) -> String {
        key_id_of(&self.key.verifying_key())
    }

    /// Signs the statement that the event at `seq` of `org_id` has hash `head_hash`, as of `time_us`.
    pub fn sign(&self, org_id: &str, seq: i64, head_hash: &str, time_us: i64) -> Checkpoint {
        let mut checkpoint = Checkpoint {
            org_id: org_id.to_owned(),
            seq,
            head_hash: head_hash.to_owned(),
            time_us,
            key_id: self.key_id(),
            signature: String::new(),
        };
        let signature: Signature = self.key.sign(checkpoint.signed_message().as_bytes());
        checkpoint.signature = STANDARD.encode(signature.to_bytes());
        checkpoint
    }
}

fn key_id_of(key: &VerifyingKey) -> String {
    let mut id = hex::encode(Sha256::digest(key.as_bytes()));
    id.truncate(16);
    id
}

fn parse_public_key(public_key_base64: &str) -> Result<VerifyingKey, CheckpointError> {
    let bytes = STANDARD
        .decode(public_key_base64.trim())
        .map_err(|e| CheckpointError::MalformedPublicKey(format!("not base64: {e}")))?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| CheckpointError::MalformedPublicKey(format!("expected 32 bytes, found {}", bytes.len())))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| CheckpointError::MalformedPublicKey("not a valid Ed25519 public key".into()))
}

/// The `key_id` of a public key given in standard base64.
pub fn public_key_id(public_key_base64: &str) -> Result<String, CheckpointError> {
    parse_public_key(public_key_base64).map(|key| key_id_of(&key))
}

/// Checks that `cp` was signed by the key whose public half is `public_key_base64` (standard base64 of 32
/// bytes). Its `key_id` must name that key and its signature must verify (strictly) over
/// [`Checkpoint::signed_message`].
pub fn verify_checkpoint(cp: &Checkpoint, public_key_base64: &str) -> Result<(), CheckpointError> {
    let key = parse_public_key(public_key_base64)?;
    verify_with(cp, &key, &key_id_of(&key))
}

fn verify_with(cp: &Checkpoint, key: &VerifyingKey, key_id: &str) -> Result<(), CheckpointError> {
    if cp.key_id != key_id {
        return Err(CheckpointError::KeyMismatch { expected: key_id.to_owned(), found: cp.key_id.clone() });
    }
    let bytes =
        STANDARD.decode(&cp.signature).map_err(|e| CheckpointError::MalformedSignature(format!("not base64: {e}")))?;
    let bytes: [u8; 64] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| CheckpointError::MalformedSignature(format!("expected 64 bytes, found {}", bytes.len())))?;
    let signature = Signature::from_bytes(&bytes);
    key.verify_strict(cp.signed_message().as_bytes(), &signature).map_err(|_| CheckpointError::BadSignature)
}

/// Reads the audit signing key at `path`, or, if there is no file there, generates one and writes it (on
/// unix with mode 0600, never replacing an existing file). The parent directory must exist.
pub fn load_or_create(path: &Path) -> Result<AuditSigner, CheckpointError> {
    load_or_install(path, || Ok(AuditSigner::generate()))
}

/// The audit signing key at `path`, or `None` if there is no file there.
pub fn load_if_present(path: &Path) -> Result<Option<AuditSigner>, CheckpointError> {
    match read_key_file(path) {
        Err(CheckpointError::KeyFile { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => other.map(Some),
    }
}

/// Reads the audit signing key at `path`, or, if there is no file there, writes the key `make` answers to it
/// (as [`load_or_create`] writes a new one).
pub fn load_or_install(
    path: &Path,
    make: impl FnOnce() -> Result<AuditSigner, CheckpointError>,
) -> Result<AuditSigner, CheckpointError> {
    let io_err = |source: std::io::Error| CheckpointError::KeyFile { path: path.to_owned(), source };
    if let Some(signer) = load_if_present(path)? {
        return Ok(signer);
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = match options.open(path) {
        Ok(file) => file,
        // Another process created it between our read and our create: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read_key_file(path),
        Err(e) => return Err(io_err(e)),
    };
    let signer = match make() {
        Ok(signer) => signer,
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    };
    let written = file.write_all(signer.to_file_contents().as_bytes()).and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io_err(e));
    }
    Ok(signer)
}

fn read_key_file(path: &Path) -> Result<AuditSigner, CheckpointError> {
    let mut contents = String::new();
    std::fs::File::open(path)
        .and_then(|mut file| file.read_to_string(&mut contents))
        .map_err(|source| CheckpointError::KeyFile { path: path.to_owned(), source })?;
    let signer = AuditSigner::from_file_contents(&contents)
        .map_err(|e| CheckpointError::KeyFileContents { path: path.to_owned(), message: e.to_string() });
    contents.clear();
    signer
}

/// The outcome of [`verify_export`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    pub ok: bool,
    /// The org the export's events belong to (the first one read): one instance signs every org's log with
    /// the same key, so a whole export of another org would verify as well; the reader must check it.
    #[serde(default)]
    pub org_id: Option<String>,
    /// Event lines read.
    pub events: u64,
    /// Checkpoint lines read.
    pub checkpoints: u64,
    /// Seq of the first event in the file.
    pub first_seq: Option<i64>,
    /// Seq of the last event in the file.
    pub last_seq: Option<i64>,
    /// Hash of the last event in the file (trustworthy only when `ok`).
    pub head_hash: Option<String>,
    /// Where the first failure is: the seq of the first broken event, or of a bad checkpoint; `None` for a
    /// malformed line (its line number is in `reason`) and for an export without events.
    pub first_broken_seq: Option<i64>,
    /// What the first failure is, for a person.
    pub reason: Option<String>,
}

/// Verifies an exported audit log (JSON Lines, see the module documentation) with the audit public key
/// (standard base64 of 32 bytes).
///
/// The rules, checked in file order; the first failure is reported and later lines are only counted:
/// - every non-blank line is an audit event or a checkpoint line, else the failure names the line number;
///   a line holds exactly the fields the exporter writes (none unknown, none missing, each read back as it
///   is written) and no object in it repeats a key, since the hash and signatures cover only what is parsed;
/// - the file holds at least one event;
/// - all events and checkpoints belong to one org;
/// - events come in seq order without gaps or repeats, each `prev_hash` is the previous event's `hash`, and
///   each `hash` recomputes ([`AuditEvent::compute_hash`]), as in [`crate::audit::ChainVerifier`];
/// - the first event has seq 1 and `prev_hash` [`GENESIS_HASH`]; or, for a retained export whose prefix was
///   deleted, a correctly signed checkpoint at its seq − 1 appears before it and its `head_hash` equals the
///   first event's `prev_hash`, and the file holds retention's record of that cut (a system
///   [`crate::audit::RETENTION_APPLIED`] event whose `upto_seq` is that seq − 1), so a beginning cut off
///   behind any other signed checkpoint fails;
/// - no checkpoint's seq is past the last event (its end was cut off behind a checkpoint that outlives it);
/// - every checkpoint's `key_id` names the given key and its signature verifies; where its seq is covered by
///   the file (from the first event's seq − 1, through the `prev_hash`, to the last event's seq), its
///   `head_hash` equals the hash at that seq. A bad checkpoint is reported at its own seq.
///
/// An error is returned only when the public key is malformed or the reader fails; every verdict about the
/// contents is in the report.
pub fn verify_export(reader: impl BufRead, public_key_base64: &str) -> Result<ExportReport, CheckpointError> {
    verify_export_expecting(reader, public_key_base64, &Expected::default())
}

/// What the reader of an export knows of the log from elsewhere: the org it asked for, and a head it saw
/// before (from an earlier export's report, an export job's result or `GET /v1/audit/verify`). A signed
/// export can be cut short at any earlier checkpoint and still verify on its own; one that must reach a
/// known head cannot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    pub org: Option<String>,
    /// The hash of an event the export must hold, and its seq when known.
    pub head: Option<(Option<i64>, String)>,
}

impl Expected {
    /// Parses a head as given on a command line: `HASH` or `SEQ:HASH`.
    pub fn parse_head(text: &str) -> Result<(Option<i64>, String), String> {
        let (seq, hash) = match text.split_once(':') {
            Some((seq, hash)) => {
                let seq = seq.trim().parse::<i64>().ok().filter(|s| *s >= 1);
                (Some(seq.ok_or_else(|| format!("`{text}`: the seq before `:` must be a positive number"))?), hash)
            }
            None => (None, text),
        };
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{text}`: a head is HASH or SEQ:HASH, the hash 64 hex digits"));
        }
        Ok((seq, hash))
    }
}

/// [`verify_export`], and then that the export agrees with what the reader expects ([`Expected`]).
pub fn verify_export_expecting(
    mut reader: impl BufRead,
    public_key_base64: &str,
    expected: &Expected,
) -> Result<ExportReport, CheckpointError> {
    let key = parse_public_key(public_key_base64)?;
    let mut verifier = ExportVerifier::new(key);
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf).map_err(CheckpointError::Read)?;
        if read == 0 {
            break;
        }
        line_no += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(&buf) {
            Ok(ExportLine::Event(event)) => verifier.event(line_no, &event),
            Ok(ExportLine::Checkpoint(cp)) => verifier.checkpoint(line_no, &cp),
            Err(message) => verifier.fail(None, format!("line {line_no}: {message}")),
        }
    }
    Ok(verifier.finish(expected))
}

enum ExportLine {
    Event(Box<AuditEvent>),
    Checkpoint(Checkpoint),
}

/// Parses one line, refusing any the exporter could not have written: a key repeated in an object, or a
/// field the event or checkpoint does not have (or lacks). The hash and signature cover the parsed values,
/// so a line must hold those and nothing else, or a reader could see what they do not cover.
fn parse_line(bytes: &[u8]) -> Result<ExportLine, String> {
    let value = parse_with_unique_keys(bytes)?;
    let is_checkpoint = value.as_object().is_some_and(|map| map.contains_key("checkpoint"));
    if is_checkpoint {
        let line = CheckpointLine::deserialize(&value).map_err(|e| format!("not a checkpoint line: {e}"))?;
        same_fields(&value, &line, "a checkpoint line")?;
        Ok(ExportLine::Checkpoint(line.checkpoint))
    } else {
        let event = AuditEvent::deserialize(&value).map_err(|e| format!("not an audit event: {e}"))?;
        same_fields(&value, &event, "an audit event")?;
        Ok(ExportLine::Event(Box::new(event)))
    }
}

/// Parses JSON as [`Value`] does, but refuses an object that repeats a key (after unescaping), at any depth:
/// serde_json silently keeps the last of the repeated values, while another reader may show the first.
fn parse_with_unique_keys(bytes: &[u8]) -> Result<Value, String> {
    serde_json::from_slice::<UniqueKeysValue>(bytes).map(|parsed| parsed.0).map_err(|e| {
        if e.is_data() {
            // Our own refusal: its position is within the line, so say the column only.
            let message = e.to_string();
            let message =
                message.strip_suffix(&format!(" at line {} column {}", e.line(), e.column())).unwrap_or(&message);
            format!("{message} (column {})", e.column())
        } else {
            format!("not valid JSON: {e}")
        }
    })
}

struct UniqueKeysValue(Value);

impl<'de> Deserialize<'de> for UniqueKeysValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor).map(UniqueKeysValue)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Number::from_f64(value).map(Value::Number).ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        UniqueKeysValue::deserialize(deserializer).map(|parsed| parsed.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeysValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("the key {key:?} appears twice in one object")));
            }
            let UniqueKeysValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Checks that `line` (the parsed JSON) holds exactly the fields of `parsed` (what was read from it), as the
/// exporter writes them: none more, none fewer, each reading back to what it says. Key order and spacing are
/// free.
fn same_fields<T: Serialize>(line: &Value, parsed: &T, what: &str) -> Result<(), String> {
    let written = serde_json::to_value(parsed).map_err(|e| format!("cannot encode {what} again: {e}"))?;
    match first_difference(line, &written, "") {
        None => Ok(()),
        Some(Difference::Unknown(field)) => Err(format!("{what} has no field {field:?}")),
        Some(Difference::Missing(field)) => Err(format!("the field {field:?} of {what} is missing")),
        Some(Difference::Changed(field)) => Err(format!("the field {field:?} of {what} does not read back as written")),
    }
}

enum Difference {
    Unknown(String),
    Missing(String),
    Changed(String),
}

/// The first place where `line` and `written` differ, as a dotted path (array items by index).
fn first_difference(line: &Value, written: &Value, path: &str) -> Option<Difference> {
    if line == written {
        return None;
    }
    let at = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    match (line, written) {
        (Value::Object(line), Value::Object(written)) => {
            if let Some(key) = line.keys().find(|key| !written.contains_key(*key)) {
                return Some(Difference::Unknown(at(key)));
            }
            if let Some(key) = written.keys().find(|key| !line.contains_key(*key)) {
                return Some(Difference::Missing(at(key)));
            }
            line.iter().find_map(|(key, value)| first_difference(value, written.get(key)?, &at(key)))
        }
        (Value::Array(line), Value::Array(written)) if line.len() == written.len() => line
            .iter()
            .zip(written)
            .enumerate()
            .find_map(|(index, (line, written))| first_difference(line, written, &at(&index.to_string()))),
        _ => Some(Difference::Changed(path.to_owned())),
    }
}

struct ExportVerifier {
    key: VerifyingKey,
    key_id: String,
    org: Option<String>,
    events: u64,
    checkpoints: u64,
    first_seq: Option<i64>,
    last_seq: Option<i64>,
    head_hash: Option<String>,
    /// `prev_hash` of the first event: the hash at `first_seq - 1`.
    start_hash: String,
    /// Hashes of the verified events, index 0 being `first_seq`.
    hashes: Vec<[u8; 32]>,
    /// Checkpoints whose seq no event has reached yet: seq → (line, head_hash).
    pending: BTreeMap<i64, Vec<(usize, String)>>,
    /// The highest seq a valid checkpoint vouches for.
    signed_upto: Option<i64>,
    /// For an export that begins after seq 1: whether it holds retention's record of that cut.
    cut_recorded: bool,
    failure: Option<(Option<i64>, String)>,
}

impl ExportVerifier {
    fn new(key: VerifyingKey) -> Self {
        ExportVerifier {
            key_id: key_id_of(&key),
            key,
            org: None,
            events: 0,
            checkpoints: 0,
            first_seq: None,
            last_seq: None,
            head_hash: None,
            start_hash: String::new(),
            hashes: Vec::new(),
            pending: BTreeMap::new(),
            signed_upto: None,
            cut_recorded: false,
            failure: None,
        }
    }

    fn fail(&mut self, seq: Option<i64>, reason: String) {
        if self.failure.is_none() {
            self.failure = Some((seq, reason));
        }
    }

    /// Checks that `org` is the export's org (the first one seen), naming what carries it otherwise.
    fn same_org(&mut self, org: &str, seq: i64, what: String) -> bool {
        match &self.org {
            None => {
                self.org = Some(org.to_owned());
                true
            }
            Some(expected) if expected == org => true,
            Some(expected) => {
                let reason = format!("{what} belongs to org {org}, but the export is of org {expected}");
                self.fail(Some(seq), reason);
                false
            }
        }
    }

    /// The verified hash at `seq`, if the file covers it.
    fn hash_at(&self, seq: i64) -> Option<String> {
        let first = self.first_seq?;
        if seq == first - 1 {
            return Some(self.start_hash.clone());
        }
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.hashes.get(index).map(hex::encode)
    }

    fn event(&mut self, line: usize, event: &AuditEvent) {
        self.events += 1;
        self.last_seq = Some(event.seq);
        self.head_hash = Some(event.hash.clone());
        if self.failure.is_some() {
            return;
        }
        let seq = event.seq;
        if !self.same_org(event.org_id.as_str(), seq, format!("line {line}: the event at seq {seq}")) {
            return;
        }
        let expected_seq = match self.first_seq {
            None => {
                if !self.start(line, event) {
                    return;
                }
                seq
            }
            Some(_) => self.last_verified_seq().map_or(seq, |s| s + 1),
        };
        if seq != expected_seq {
            let reason = if seq > expected_seq {
                format!("seq {expected_seq} is missing: line {line} has seq {seq}")
            } else {
                format!("line {line}: seq {seq} is out of order, expected seq {expected_seq}")
            };
            self.fail(Some(expected_seq), reason);
            return;
        }
        let prev_hash = match self.hash_at(seq - 1) {
            Some(hash) => hash,
            None => {
                self.fail(Some(seq), format!("line {line}: no hash known for seq {}", seq - 1));
                return;
            }
        };
        if event.prev_hash != prev_hash {
            let reason =
                format!("line {line}: the event at seq {seq} has a prev_hash that is not the hash of seq {}", seq - 1);
            self.fail(Some(seq), reason);
            return;
        }
        let computed = event.compute_hash();
        let digest = match hex::decode(&computed).ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()) {
            Some(digest) if computed == event.hash => digest,
            _ => {
                let reason = format!(
                    "line {line}: the event at seq {seq} does not match its hash (its content or hash was altered)"
                );
                self.fail(Some(seq), reason);
                return;
            }
        };
        self.hashes.push(digest);
        if let Some(first) = self.first_seq
            && first > 1
            && event.records_retention_upto(first - 1)
        {
            self.cut_recorded = true;
        }
        for (cp_line, head_hash) in self.pending.remove(&seq).unwrap_or_default() {
            if head_hash != event.hash {
                self.fail(Some(seq), checkpoint_mismatch(cp_line, seq, &head_hash, &event.hash));
                return;
            }
            self.vouched(seq);
        }
    }

    fn last_verified_seq(&self) -> Option<i64> {
        let first = self.first_seq?;
        Some(first - 1 + i64::try_from(self.hashes.len()).ok()?)
    }

    /// Anchors the chain at the first event: at genesis for seq 1, else at a signed checkpoint before it.
    fn start(&mut self, line: usize, event: &AuditEvent) -> bool {
        let seq = event.seq;
        if seq < 1 {
            self.fail(Some(seq), format!("line {line}: seq {seq} is not positive"));
            return false;
        }
        if seq == 1 {
            if event.prev_hash != GENESIS_HASH {
                self.fail(Some(1), format!("line {line}: the event at seq 1 does not start from the genesis hash"));
                return false;
            }
        } else {
            let vouching = self.pending.get(&(seq - 1)).cloned().unwrap_or_default();
            let disagreeing = vouching.iter().find(|(_, head_hash)| *head_hash != event.prev_hash);
            let reason = if vouching.is_empty() {
                Some(format!(
                    "no signed checkpoint vouches for the start at seq {seq}: the export begins after a deleted \
                     prefix, and no checkpoint at seq {} precedes line {line}",
                    seq - 1
                ))
            } else {
                disagreeing.map(|(cp_line, head_hash)| {
                    format!(
                        "no signed checkpoint vouches for the start at seq {seq}: the checkpoint at seq {} (line \
                         {cp_line}) has head hash {head_hash}, but the event's prev_hash is {}",
                        seq - 1,
                        event.prev_hash
                    )
                })
            };
            if let Some(reason) = reason {
                self.fail(Some(seq), reason);
                return false;
            }
        }
        if seq > 1 {
            self.vouched(seq - 1);
        }
        self.first_seq = Some(seq);
        self.start_hash = event.prev_hash.clone();
        // Checkpoints before the start are outside the file's coverage (the one at seq - 1 was just checked).
        self.pending = self.pending.split_off(&seq);
        true
    }

    fn checkpoint(&mut self, line: usize, cp: &Checkpoint) {
        self.checkpoints += 1;
        if self.failure.is_some() {
            return;
        }
        let seq = cp.seq;
        if let Err(e) = verify_with(cp, &self.key, &self.key_id) {
            self.fail(Some(seq), format!("line {line}: the checkpoint at seq {seq} is not valid: {e}"));
            return;
        }
        if !self.same_org(&cp.org_id, seq, format!("line {line}: the checkpoint at seq {seq}")) {
            return;
        }
        let Some(first) = self.first_seq else {
            self.pending.entry(seq).or_default().push((line, cp.head_hash.clone()));
            return;
        };
        if seq < first - 1 {
            return;
        }
        match self.hash_at(seq) {
            Some(hash) if hash == cp.head_hash => self.vouched(seq),
            Some(hash) => self.fail(Some(seq), checkpoint_mismatch(line, seq, &cp.head_hash, &hash)),
            None => self.pending.entry(seq).or_default().push((line, cp.head_hash.clone())),
        }
    }

    fn vouched(&mut self, seq: i64) {
        self.signed_upto = Some(self.signed_upto.map_or(seq, |s| s.max(seq)));
    }

    /// Checks what the reader expects, once every line is read (and only if nothing failed before).
    fn expect(&mut self, expected: &Expected) {
        if self.failure.is_some() {
            return;
        }
        if let (Some(want), Some(org)) = (&expected.org, &self.org)
            && want != org
        {
            let reason = format!("the export is of org {org}, not of the expected org {want}");
            self.fail(self.first_seq, reason);
            return;
        }
        let Some((seq, hash)) = &expected.head else { return };
        let (Some(first), Some(last)) = (self.first_seq, self.last_verified_seq()) else { return };
        let found = match seq {
            Some(seq) => self.hash_at(*seq).map(|at| (*seq, at)),
            None => self
                .hashes
                .iter()
                .position(|digest| hex::encode(digest) == *hash)
                .and_then(|index| i64::try_from(index).ok())
                .map(|index| (first + index, hash.clone())),
        };
        let reason = match (found, seq) {
            (Some((_, at)), _) if at == *hash => return,
            (Some((seq, at)), _) => Some((
                seq,
                format!("the event at seq {seq} has hash {at}, not the expected {hash}: the log was rewritten"),
            )),
            (None, Some(seq)) if *seq > last => Some((
                last + 1,
                format!("the export ends at seq {last}, before the expected head at seq {seq}: its end was cut off"),
            )),
            (None, Some(seq)) => Some((
                first,
                format!(
                    "the export begins at seq {first}, after the expected head at seq {seq}: it cannot vouch for it"
                ),
            )),
            (None, None) => Some((
                last + 1,
                format!(
                    "no event of the export (seq {first} to {last}) has the expected hash {hash}: its end was cut \
                     off, or the log was rewritten"
                ),
            )),
        };
        if let Some((seq, reason)) = reason {
            self.fail(Some(seq), reason);
        }
    }

    fn finish(mut self, expected: &Expected) -> ExportReport {
        // No events, no chain: an empty file (or checkpoints alone) must not pass for a verified log.
        if self.events == 0 {
            self.fail(None, "the export holds no events".to_owned());
        }
        // A head cut off: the only prefix a log may lack is the one retention deleted, and retention records
        // each cut in the log it leaves. (A checkpoint at seq − 1 is not enough: the server signs one wherever
        // an export or a checkpoint request found the head.)
        if let Some(first) = self.first_seq.filter(|&f| f > 1 && self.failure.is_none())
            && !self.cut_recorded
        {
            self.fail(
                Some(first),
                format!(
                    "the export begins at seq {first}, but no {RETENTION_APPLIED} event in it records retention \
                     deleting the log up to seq {}: its beginning was cut off",
                    first - 1
                ),
            );
        }
        // A tail cut off behind a checkpoint that outlives it: that checkpoint vouches for events not here.
        if let (Some(last), Some((&seq, lines))) = (self.last_verified_seq(), self.pending.iter().next())
            && self.failure.is_none()
        {
            let line = lines.first().map_or(0, |(line, _)| *line);
            self.fail(
                Some(last + 1),
                format!(
                    "the checkpoint at seq {seq} (line {line}) vouches for events up to seq {seq}, but the export \
                     ends at seq {last}: its end was cut off"
                ),
            );
        }
        // A chain anyone could have recomputed proves nothing: the last event must be vouched for by a
        // checkpoint signed with the key (an export from the server always ends with one).
        if let Some(last) = self.last_verified_seq().filter(|_| self.failure.is_none())
            && self.signed_upto.is_none_or(|s| s < last)
        {
            let from = self.signed_upto.map_or(self.first_seq.unwrap_or(1), |s| s + 1);
            self.fail(
                Some(from),
                format!(
                    "no signed checkpoint vouches for the events from seq {from} to {last}: anyone could have written \
                     them; an export from Countersign ends with a checkpoint of its last event"
                ),
            );
        }
        self.expect(expected);
        let (first_broken_seq, reason) = match self.failure {
            Some((seq, reason)) => (seq, Some(reason)),
            None => (None, None),
        };
        ExportReport {
            ok: reason.is_none(),
            org_id: self.org,
            events: self.events,
            checkpoints: self.checkpoints,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            head_hash: self.head_hash,
            first_broken_seq,
            reason,
        }
    }
}

fn checkpoint_mismatch(line: usize, seq: i64, head_hash: &str, hash: &str) -> String {
    format!(
        "line {line}: the checkpoint at seq {seq} has head hash {head_hash}, but the event at seq {seq} has hash {hash}"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::audit::{Actor, NewAuditEvent};
    use crate::ids::OrgId;

    const T: i64 = 1_750_000_000_123_456;

    fn chain(org: &OrgId, n: usize) -> Vec<AuditEvent> {
        let mut out: Vec<AuditEvent> = Vec::new();
        for i in 0..n {
            let (seq, hash) = out.last().map(|e| (e.seq, e.hash.clone())).unwrap_or((0, GENESIS_HASH.into()));
            out.push(AuditEvent::seal(
                org.clone(),
                seq,
                &hash,
                NewAuditEvent {
                    time_us: T + i as i64,
                    actor: Actor::system(),
                    action: "test.event".into(),
                    subject: Some(format!("act_{i}")),
                    data: serde_json::json!({"i": i, "nested": {"b": 1, "a": [true, null]}}),
                },
            ));
        }
        out
    }

    /// `chain(org, n)` and then retention's record of having deleted the log up to `upto_seq`.
    fn chain_then_retention(org: &OrgId, n: usize, upto_seq: i64) -> Vec<AuditEvent> {
        let mut out = chain(org, n);
        let last = out.last().map(|e| (e.seq, e.hash.clone())).unwrap_or((0, GENESIS_HASH.into()));
        out.push(AuditEvent::seal(
            org.clone(),
            last.0,
            &last.1,
            NewAuditEvent {
                time_us: T + n as i64,
                actor: Actor::system(),
                action: crate::audit::RETENTION_APPLIED.into(),
                subject: Some(org.to_string()),
                data: serde_json::json!({"days": 1, "deleted": upto_seq, "upto_seq": upto_seq, "checkpoint_seq": upto_seq}),
            },
        ));
        out
    }

    enum Line<'a> {
        E(&'a AuditEvent),
        C(&'a Checkpoint),
        Raw(&'a str),
    }

    fn export(lines: &[Line<'_>]) -> String {
        let mut out = String::new();
        for line in lines {
            match line {
                Line::E(e) => out.push_str(&serde_json::to_string(e).unwrap()),
                Line::C(cp) => {
                    out.push_str(&serde_json::to_string(&CheckpointLine { checkpoint: (*cp).clone() }).unwrap())
                }
                Line::Raw(text) => out.push_str(text),
            }
            out.push('\n');
        }
        out
    }

    fn events_only(events: &[AuditEvent]) -> String {
        export(&events.iter().map(Line::E).collect::<Vec<_>>())
    }

    fn verify(text: &str, signer: &AuditSigner) -> ExportReport {
        verify_export(text.as_bytes(), &signer.public_key_base64()).unwrap()
    }

    fn checkpoint_of(signer: &AuditSigner, event: &AuditEvent) -> Checkpoint {
        signer.sign(event.org_id.as_str(), event.seq, &event.hash, event.time_us)
    }

    #[test]
    fn sign_verify_roundtrip_and_tampered_checkpoints_fail() {
        let signer = AuditSigner::generate();
        let public = signer.public_key_base64();
        let cp = signer.sign("org_01J0000000000000000000000A", 42, &"ab".repeat(32), T);
        assert_eq!(cp.key_id, signer.key_id());
        assert_eq!(cp.key_id.len(), 16);
        assert_eq!(public_key_id(&public).unwrap(), signer.key_id());
        verify_checkpoint(&cp, &public).unwrap();

        let json = serde_json::to_string(&cp).unwrap();
        let back: Checkpoint = serde_json::from_str(&json).unwrap();
        verify_checkpoint(&back, &public).unwrap();

        let mut seq = cp.clone();
        seq.seq = 43;
        assert!(matches!(verify_checkpoint(&seq, &public), Err(CheckpointError::BadSignature)));
        let mut head = cp.clone();
        head.head_hash = "cd".repeat(32);
        assert!(matches!(verify_checkpoint(&head, &public), Err(CheckpointError::BadSignature)));
        let mut time = cp.clone();
        time.time_us += 1;
        assert!(matches!(verify_checkpoint(&time, &public), Err(CheckpointError::BadSignature)));
        let mut sig = cp.clone();
        sig.signature = "not base64!".into();
        assert!(matches!(verify_checkpoint(&sig, &public), Err(CheckpointError::MalformedSignature(_))));
        assert!(matches!(verify_checkpoint(&cp, "AAAA"), Err(CheckpointError::MalformedPublicKey(_))));
    }

    #[test]
    fn signed_message_is_the_documented_canonical_json() {
        let signer = AuditSigner::from_file_contents(&STANDARD.encode([7u8; 32])).unwrap();
        let cp = signer.sign("org_X", 5, "0f", 1_700_000_000_000_001);
        assert_eq!(cp.signed_message(), r#"{"head_hash":"0f","org_id":"org_X","seq":5,"time_us":1700000000000001}"#);
        // A third party's check: plain ed25519 over those bytes.
        let key = VerifyingKey::from_bytes(&STANDARD.decode(signer.public_key_base64()).unwrap().try_into().unwrap())
            .unwrap();
        let sig = Signature::from_bytes(&STANDARD.decode(&cp.signature).unwrap().try_into().unwrap());
        key.verify_strict(cp.signed_message().as_bytes(), &sig).unwrap();
        let key_id = hex::encode(Sha256::digest(key.as_bytes()));
        assert_eq!(cp.key_id, key_id[..16]);
    }

    #[test]
    fn wrong_key_fails() {
        let signer = AuditSigner::generate();
        let other = AuditSigner::generate();
        let cp = signer.sign("org_X", 1, &"00".repeat(32), T);
        assert!(matches!(verify_checkpoint(&cp, &other.public_key_base64()), Err(CheckpointError::KeyMismatch { .. })));
        // Even with the key_id relabelled, the signature itself does not verify.
        let mut relabelled = cp;
        relabelled.key_id = other.key_id();
        assert!(matches!(
            verify_checkpoint(&relabelled, &other.public_key_base64()),
            Err(CheckpointError::BadSignature)
        ));
    }

    #[test]
    fn debug_does_not_reveal_the_secret() {
        let signer = AuditSigner::generate();
        let shown = format!("{signer:?}");
        let secret = signer.to_file_contents();
        assert!(shown.contains(&signer.key_id()), "{shown}");
        assert!(!shown.contains(secret.trim()), "{shown}");
    }

    #[test]
    fn key_file_contents_roundtrip_and_reject_garbage() {
        let signer = AuditSigner::generate();
        let contents = signer.to_file_contents();
        assert_eq!(contents.lines().count(), 1);
        let back = AuditSigner::from_file_contents(&contents).unwrap();
        assert_eq!(back.public_key_base64(), signer.public_key_base64());
        assert!(matches!(AuditSigner::from_file_contents("abc"), Err(CheckpointError::MalformedSigningKey(_))));
        let short = STANDARD.encode([1u8; 31]);
        assert!(matches!(AuditSigner::from_file_contents(&short), Err(CheckpointError::MalformedSigningKey(_))));
    }

    #[test]
    fn intact_export_with_checkpoints_verifies() {
        let signer = AuditSigner::generate();
        let org = OrgId::new();
        let events = chain(&org, 5);
        let cp2 = checkpoint_of(&signer, &events[1]);
        let cp5 = checkpoint_of(&signer, &events[4]);
        // A checkpoint may come before or after the event it covers.
        let text = export(&[
            Line::E(&events[0]),
            Line::C(&cp2),
            Line::E(&events[1]),
            Line::E(&events[2]),
            Line::E(&events[3]),
            Line::E(&events[4]),
            Line::C(&cp5),
            Line::Raw(""),
        ]);
        let report = verify(&text, &signer);
        assert_eq!(
            report,
            ExportReport {
                ok: true,
                org_id: Some(events[0].org_id.to_string()),
                events: 5,
                checkpoints: 2,
                first_seq: Some(1),
                last_seq: Some(5),
                head_hash: Some(events[4].hash.clone()),
                first_broken_seq: None,
                reason: None,
            }
        );
    }

    #[test]
    fn tampered_events_are_caught_at_their_seq() {
        let signer = AuditSigner::generate();
        let events = chain(&OrgId::new(), 5);

        let mut data = events.clone();
        data[2].data = serde_json::json!({"i": 99});
        let report = verify(&events_only(&data), &signer);
        assert!(!report.ok);
        assert_eq!(report.first_broken_seq, Some(3), "{report:?}");
        assert!(report.reason.as_deref().unwrap().contains("seq 3"), "{report:?}");

        let mut seq = events.clone();
        seq[2].seq = 2;
        let report = verify(&events_only(&seq), &signer);
        assert_eq!(report.first_broken_seq, Some(3), "{report:?}");
        let mut seq = events.clone();
        seq[2].seq = 7;
        let report = verify(&events_only(&seq), &signer);
        assert_eq!(report.first_broken_seq, Some(3), "{report:?}");

        let mut hash = events.clone();
        hash[2].hash = "ab".repeat(32);
        let report = verify(&events_only(&hash), &signer);
        assert_eq!(report.first_broken_seq, Some(3), "{report:?}");

        let mut resealed = events.clone();
        resealed[2].data = serde_json::json!({"i": 99});
        resealed[2].hash = resealed[2].compute_hash();
        let report = verify(&events_only(&resealed), &signer);
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
        assert!(report.reason.as_deref().unwrap().contains("prev_hash"), "{report:?}");

        // A checkpoint pins the head even when the tail is resealed consistently.
        let mut rewritten = chain(&OrgId::new(), 3);
        let cp3 = checkpoint_of(&signer, &rewritten[2]);
        rewritten[2].data = serde_json::json!({"i": 99});
        rewritten[2].hash = rewritten[2].compute_hash();
        let text = export(&[Line::E(&rewritten[0]), Line::E(&rewritten[1]), Line::E(&rewritten[2]), Line::C(&cp3)]);
        let report = verify(&text, &signer);
        assert_eq!(report.first_broken_seq, Some(3), "{report:?}");
        assert!(report.reason.as_deref().unwrap().contains("checkpoint at seq 3"), "{report:?}");
    }

    #[test]
    fn events_after_the_last_checkpoint_are_not_vouched_for() {
        let signer = AuditSigner::generate();
        let events = chain(&OrgId::new(), 5);
        let cp3 = checkpoint_of(&signer, &events[2]);
        let mut lines: Vec<Line<'_>> = events.iter().map(Line::E).collect();
        lines.insert(3, Line::C(&cp3));
        let report = verify(&export(&lines), &signer);
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
        assert!(report.reason.unwrap().contains("from seq 4 to 5"));
        assert!(!verify(&events_only(&events), &signer).ok);
    }

    #[test]
    fn gap_is_caught() {
        let signer = AuditSigner::generate();
        let mut events = chain(&OrgId::new(), 5);
        events.remove(2);
        let report = verify(&events_only(&events), &signer);
        assert!(!report.ok);
        assert_eq!(report.first_broken_seq, Some(3));
        assert!(report.reason.as_deref().unwrap().contains("seq 3 is missing"), "{report:?}");
        assert_eq!(report.events, 4);
    }

    #[test]
    fn export_without_seq_1_needs_a_checkpoint_before_it() {
        let signer = AuditSigner::generate();
        let events = chain_then_retention(&OrgId::new(), 5, 3);
        let kept = &events[3..];
        let cp3 = checkpoint_of(&signer, &events[2]);

        let cp6 = checkpoint_of(&signer, &events[5]);
        let mut lines = vec![Line::C(&cp3)];
        lines.extend(kept.iter().map(Line::E));
        lines.push(Line::C(&cp6));
        let report = verify(&export(&lines), &signer);
        assert!(report.ok, "{report:?}");
        assert_eq!((report.first_seq, report.last_seq, report.events, report.checkpoints), (Some(4), Some(6), 3, 2));

        // Without the closing checkpoint, the kept events are vouched for by nothing.
        lines.pop();
        let report = verify(&export(&lines), &signer);
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
        assert!(report.reason.unwrap().contains("no signed checkpoint vouches for the events from seq 4 to 6"));

        let report = verify(&events_only(kept), &signer);
        assert!(!report.ok);
        assert_eq!(report.first_broken_seq, Some(4));
        let reason = report.reason.unwrap();
        assert!(reason.contains("no signed checkpoint vouches for the start at seq 4"), "{reason}");

        // After the first event is too late.
        let mut late: Vec<Line<'_>> = kept.iter().map(Line::E).collect();
        late.push(Line::C(&cp3));
        let report = verify(&export(&late), &signer);
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");

        // A signed checkpoint at seq 3 with another hash vouches for nothing.
        let wrong = signer.sign(cp3.org_id.as_str(), 3, &events[1].hash, T);
        let mut lines = vec![Line::C(&wrong)];
        lines.extend(kept.iter().map(Line::E));
        let report = verify(&export(&lines), &signer);
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
        assert!(report.reason.unwrap().contains("no signed checkpoint vouches for the start at seq 4"));

        // A checkpoint at seq 2 is not one at seq 3.
        let cp2 = checkpoint_of(&signer, &events[1]);
        let mut lines = vec![Line::C(&cp2)];
        lines.extend(kept.iter().map(Line::E));
        let report = verify(&export(&lines), &signer);
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
    }

    /// A checkpoint at seq − 1 and one at the end are not enough: the server signs one wherever an export or a
    /// checkpoint request found the head, so an export with its beginning cut off would carry both. Only a cut
    /// that retention recorded in the log passes.
    #[test]
    fn a_cut_beginning_needs_retentions_record_of_the_cut() {
        let signer = AuditSigner::generate();
        let org = OrgId::new();
        let events = chain(&org, 6);
        let (cp3, cp6) = (checkpoint_of(&signer, &events[2]), checkpoint_of(&signer, &events[5]));
        let mut lines = vec![Line::C(&cp3)];
        lines.extend(events[3..].iter().map(Line::E));
        lines.push(Line::C(&cp6));
        let report = verify(&export(&lines), &signer);
        assert!(!report.ok, "{report:?}");
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
        let reason = report.reason.unwrap();
        assert!(
            reason.contains("no audit.retention_applied event in it records retention deleting the log up to seq 3"),
            "{reason}"
        );

        // Retention's record of another cut (up to seq 2) does not vouch for this one.
        let events = chain_then_retention(&org, 5, 2);
        let (cp3, cp6) = (checkpoint_of(&signer, &events[2]), checkpoint_of(&signer, &events[5]));
        let mut lines = vec![Line::C(&cp3)];
        lines.extend(events[3..].iter().map(Line::E));
        lines.push(Line::C(&cp6));
        assert_eq!(verify(&export(&lines), &signer).first_broken_seq, Some(4));
    }

    /// A checkpoint past the last event vouches for events the file does not hold: its end was cut off.
    #[test]
    fn a_checkpoint_past_the_last_event_is_a_cut_end() {
        let signer = AuditSigner::generate();
        let events = chain(&OrgId::new(), 5);
        let (cp3, cp5) = (checkpoint_of(&signer, &events[2]), checkpoint_of(&signer, &events[4]));
        let mut lines: Vec<Line<'_>> = events[..3].iter().map(Line::E).collect();
        lines.push(Line::C(&cp3));
        lines.push(Line::C(&cp5));
        let report = verify(&export(&lines), &signer);
        assert!(!report.ok, "{report:?}");
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
        assert!(
            report.reason.unwrap().contains(
                "the checkpoint at seq 5 (line 5) vouches for events up to seq 5, but the export ends at seq 3"
            )
        );
        // Without it, the same three events pass.
        lines.pop();
        assert!(verify(&export(&lines), &signer).ok);
    }

    /// An export cut short at an earlier checkpoint verifies on its own; one that must reach a head the reader
    /// saw before does not, nor one whose event at that seq has another hash, nor one of another org.
    #[test]
    fn an_export_must_reach_the_head_the_reader_expects() {
        let signer = AuditSigner::generate();
        let org = OrgId::new();
        let events = chain(&org, 5);
        let (cp3, cp5) = (checkpoint_of(&signer, &events[2]), checkpoint_of(&signer, &events[4]));
        let mut whole: Vec<Line<'_>> = events.iter().map(Line::E).collect();
        whole.push(Line::C(&cp5));
        let mut cut: Vec<Line<'_>> = events[..3].iter().map(Line::E).collect();
        cut.push(Line::C(&cp3));
        let check = |lines: &[Line<'_>], expected: &Expected| {
            verify_export_expecting(export(lines).as_bytes(), &signer.public_key_base64(), expected).unwrap()
        };
        let head = |seq: Option<i64>, hash: &str| Expected { org: None, head: Some((seq, hash.to_owned())) };
        let last = &events[4].hash;
        assert!(check(&cut, &Expected::default()).ok, "cut short, it verifies on its own");
        for expected in [head(Some(5), last), head(None, last), head(Some(2), &events[1].hash)] {
            let report = check(&whole, &expected);
            assert!(report.ok, "{expected:?}: {report:?}");
        }
        let report = check(&cut, &head(Some(5), last));
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
        assert!(report.reason.unwrap().contains("ends at seq 3, before the expected head at seq 5"));
        let report = check(&cut, &head(None, last));
        assert!(report.reason.unwrap().contains("no event of the export (seq 1 to 3) has the expected hash"));
        let report = check(&whole, &head(Some(4), last));
        assert_eq!(report.first_broken_seq, Some(4), "{report:?}");
        assert!(report.reason.unwrap().contains("not the expected"));
        let other = Expected { org: Some(OrgId::new().to_string()), head: None };
        let report = check(&whole, &other);
        assert!(report.reason.unwrap().contains(&format!("the export is of org {org}, not of the expected org")));
        let same = Expected { org: Some(org.to_string()), head: None };
        assert!(check(&whole, &same).ok);
        // A failure of the export itself is reported first.
        let mut unsigned: Vec<Line<'_>> = events.iter().map(Line::E).collect();
        unsigned.push(Line::C(&cp3));
        let report = check(&unsigned, &head(Some(1), "0".repeat(64).as_str()));
        assert!(report.reason.unwrap().contains("no signed checkpoint vouches for the events from seq 4 to 5"));
    }

    #[test]
    fn a_head_is_a_hash_or_a_seq_and_a_hash() {
        let hash = "AB".repeat(32);
        assert_eq!(Expected::parse_head(&hash), Ok((None, hash.to_ascii_lowercase())));
        assert_eq!(Expected::parse_head(&format!("42:{hash}")), Ok((Some(42), hash.to_ascii_lowercase())));
        for bad in
            ["", "42:", "0:abc", &format!("x:{hash}"), &format!("-1:{hash}"), &hash[1..], "zz".repeat(32).as_str()]
        {
            assert!(Expected::parse_head(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forged_checkpoint_fails() {
        let signer = AuditSigner::generate();
        let forger = AuditSigner::generate();
        let events = chain(&OrgId::new(), 6);
        let forged = checkpoint_of(&forger, &events[2]);
        let mut lines = vec![Line::C(&forged)];
        lines.extend(events[3..].iter().map(Line::E));
        let report = verify(&export(&lines), &signer);
        assert!(!report.ok);
        assert_eq!(report.first_broken_seq, Some(3), "{report:?}");
        assert!(report.reason.as_deref().unwrap().contains("checkpoint at seq 3"), "{report:?}");

        // Relabelled with the real key's id, the signature still gives it away.
        let mut relabelled = forged.clone();
        relabelled.key_id = signer.key_id();
        let text = export(&[Line::E(&events[0]), Line::E(&events[1]), Line::E(&events[2]), Line::C(&relabelled)]);
        let report = verify(&text, &signer);
        assert_eq!(report.first_broken_seq, Some(3), "{report:?}");
        assert!(report.reason.as_deref().unwrap().contains("does not verify"), "{report:?}");
    }

    #[test]
    fn events_of_another_org_fail() {
        let signer = AuditSigner::generate();
        let a = chain(&OrgId::new(), 2);
        let b = chain(&OrgId::new(), 2);
        let text = export(&[Line::E(&a[0]), Line::E(&a[1]), Line::E(&b[1])]);
        let report = verify(&text, &signer);
        assert!(!report.ok);
        assert!(report.reason.as_deref().unwrap().contains("belongs to org"), "{report:?}");
    }

    #[test]
    fn malformed_line_reports_its_line_number() {
        let signer = AuditSigner::generate();
        let events = chain(&OrgId::new(), 3);
        let text = export(&[Line::E(&events[0]), Line::E(&events[1]), Line::Raw("{\"seq\": 3,"), Line::E(&events[2])]);
        let report = verify(&text, &signer);
        assert!(!report.ok);
        assert_eq!(report.first_broken_seq, None);
        assert!(report.reason.as_deref().unwrap().starts_with("line 3: "), "{report:?}");

        let text = export(&[Line::E(&events[0]), Line::Raw("{\"checkpoint\": {\"seq\": 1}}")]);
        let report = verify(&text, &signer);
        assert!(report.reason.as_deref().unwrap().starts_with("line 2: not a checkpoint line"), "{report:?}");

        let mut bytes = serde_json::to_vec(&events[0]).unwrap();
        bytes.extend_from_slice(b"\n\"\xff\xfe\"\n"); // a JSON string that is not UTF-8
        let report = verify_export(bytes.as_slice(), &signer.public_key_base64()).unwrap();
        assert!(report.reason.as_deref().unwrap().starts_with("line 2: "), "{report:?}");
    }

    #[test]
    fn export_without_events_fails() {
        let signer = AuditSigner::generate();
        let events = chain(&OrgId::new(), 2);
        let cp2 = checkpoint_of(&signer, &events[1]);
        for text in [String::new(), "\n \n".to_owned(), export(&[Line::C(&cp2)])] {
            let report = verify(&text, &signer);
            assert!(!report.ok, "{text:?}: {report:?}");
            assert_eq!(report.events, 0);
            assert_eq!(report.first_broken_seq, None);
            assert_eq!(report.reason.as_deref(), Some("the export holds no events"), "{text:?}");
        }
    }

    /// A verified export of `events` closed by a checkpoint, with the event at `index` written as `line`.
    fn export_with_line(signer: &AuditSigner, events: &[AuditEvent], index: usize, line: &str) -> ExportReport {
        let closing = checkpoint_of(signer, events.last().unwrap());
        let mut lines: Vec<Line<'_>> = events.iter().map(Line::E).collect();
        lines[index] = Line::Raw(line);
        lines.push(Line::C(&closing));
        verify(&export(&lines), signer)
    }

    #[test]
    fn event_lines_with_repeated_keys_are_refused() {
        let signer = AuditSigner::generate();
        let events = chain(&OrgId::new(), 3);
        assert!(export_with_line(&signer, &events, 1, &serde_json::to_string(&events[1]).unwrap()).ok);
        let written = serde_json::to_string(&events[1]).unwrap();
        // serde_json keeps the last of repeated keys, which the hash covers; another reader may take the first.
        let cases = [
            written.replacen("{", r#"{"action":"approval.denied","#, 1),
            written.replacen("{", r#"{"\u0061ction":"approval.denied","#, 1),
            written.replacen(r#""data":{"#, r#""data":{"i":5,"#, 1),
            written.replacen(r#""actor":{"#, r#""actor":{"name":"mallory","#, 1),
        ];
        for line in cases {
            assert_ne!(line, written);
            let report = export_with_line(&signer, &events, 1, &line);
            assert!(!report.ok, "{line}: {report:?}");
            assert_eq!(report.first_broken_seq, None, "{report:?}");
            let reason = report.reason.unwrap();
            assert!(reason.starts_with("line 2: ") && reason.contains("appears twice"), "{reason}");
        }

        let closing = checkpoint_of(&signer, &events[2]);
        let cp_line = serde_json::to_string(&CheckpointLine { checkpoint: closing }).unwrap();
        let repeated = cp_line.replacen(r#"{"org_id""#, r#"{"seq":1,"org_id""#, 1);
        let mut text = events_only(&events);
        text.push_str(&repeated);
        let report = verify(&text, &signer);
        assert!(report.reason.as_deref().unwrap().starts_with("line 4: "), "{report:?}");
    }

    #[test]
    fn event_lines_with_fields_an_event_lacks_are_refused() {
        let signer = AuditSigner::generate();
        let events = chain(&OrgId::new(), 3);
        let written = serde_json::to_string(&events[1]).unwrap();
        let cases = [
            (written.replacen("{", r#"{"note":"approved by the CFO","#, 1), r#""note""#),
            (written.replacen(r#""actor":{"#, r#""actor":{"on_behalf_of":"cfo","#, 1), r#""actor.on_behalf_of""#),
            (written.replacen(r#""subject":"act_1","#, "", 1), r#""subject""#),
        ];
        for (line, field) in cases {
            assert_ne!(line, written);
            let report = export_with_line(&signer, &events, 1, &line);
            assert!(!report.ok, "{line}: {report:?}");
            let reason = report.reason.unwrap();
            assert!(reason.starts_with("line 2: ") && reason.contains(field), "{reason}");
        }

        let closing = checkpoint_of(&signer, &events[2]);
        let cp_line = serde_json::to_string(&CheckpointLine { checkpoint: closing }).unwrap();
        let mut text = events_only(&events);
        text.push_str(&cp_line.replacen("{", r#"{"comment":"all good","#, 1));
        let report = verify(&text, &signer);
        let reason = report.reason.unwrap();
        assert!(reason.starts_with("line 4: ") && reason.contains(r#""comment""#), "{reason}");
    }

    #[test]
    fn malformed_public_key_is_an_error() {
        assert!(matches!(verify_export(&b""[..], "%%%"), Err(CheckpointError::MalformedPublicKey(_))));
    }

    #[test]
    fn key_file_is_created_0600_and_reloads_to_the_same_key() {
        let dir = std::env::temp_dir().join(format!("countersign-checkpoint-{}", ulid::Ulid::generate()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("audit.key");
        let created = load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        let loaded = load_or_create(&path).unwrap();
        assert_eq!(loaded.public_key_base64(), created.public_key_base64());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), created.to_file_contents());

        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(load_or_create(&path), Err(CheckpointError::KeyFileContents { .. })));
        let missing_dir = dir.join("nope").join("audit.key");
        assert!(matches!(load_or_create(&missing_dir), Err(CheckpointError::KeyFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
