//! The audit chain: what an event is, its canonical JSON, and how each event's hash seals the one before.
//!
//! `hash = SHA-256(prev_hash ‖ canonical JSON of the event without its hash)`, with `prev_hash` of the first
//! event of an org being 64 zeros. Canonical JSON is serde_json's compact form with object keys sorted at
//! every depth. This module computes and checks hashes; it never stores, updates or deletes an event.

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

use crate::ids::{EventId, OrgId};

/// The `prev_hash` of an org's first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    Agent,
    User,
    Session,
    System,
}

impl ActorKind {
    /// The name serde gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Agent => "agent",
            ActorKind::User => "user",
            ActorKind::Session => "session",
            ActorKind::System => "system",
        }
    }
}

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: ActorKind,
    pub id: String,
    pub name: String,
}

impl Actor {
    pub fn system() -> Self {
        Actor { kind: ActorKind::System, id: "system".into(), name: "countersign".into() }
    }
}

/// An event as the gateway asks for it; the store gives it a place in the chain.
#[derive(Debug, Clone)]
pub struct NewAuditEvent {
    pub time_us: i64,
    pub actor: Actor,
    pub action: String,
    pub subject: Option<String>,
    pub data: Value,
}

/// An event in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub org_id: OrgId,
    pub seq: i64,
    pub id: EventId,
    pub time_us: i64,
    pub actor: Actor,
    pub action: String,
    pub subject: Option<String>,
    pub data: Value,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEvent {
    /// Places `event` after the event with `prev_seq`/`prev_hash` (0 and [`GENESIS_HASH`] for the first).
    pub fn seal(org_id: OrgId, prev_seq: i64, prev_hash: &str, event: NewAuditEvent) -> AuditEvent {
        let mut sealed = AuditEvent {
            org_id,
            seq: prev_seq + 1,
            id: EventId::new(),
            time_us: event.time_us,
            actor: event.actor,
            action: event.action,
            subject: event.subject,
            data: event.data,
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        sealed.hash = sealed.compute_hash();
        sealed
    }

    /// The hash this event should carry, from its other fields: its canonical JSON without the hash, written
    /// field by field with the keys in sorted order (the object `{action, actor, data, id, org_id, prev_hash,
    /// seq, subject, time_us}`), so `data` is walked in place, never copied.
    pub fn compute_hash(&self) -> String {
        let mut out = Vec::with_capacity(512);
        let number = |n: &Number, out: &mut Vec<u8>| out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(br#"{"action":"#);
        write_json_str(&self.action, &mut out);
        out.extend_from_slice(br#","actor":"#);
        out.extend_from_slice(br#"{"id":"#);
        write_json_str(&self.actor.id, &mut out);
        out.extend_from_slice(br#","kind":"#);
        write_json_str(self.actor.kind.as_str(), &mut out);
        out.extend_from_slice(br#","name":"#);
        write_json_str(&self.actor.name, &mut out);
        out.push(b'}');
        out.extend_from_slice(br#","data":"#);
        write_sorted_json(&self.data, &mut out, &number);
        out.extend_from_slice(br#","id":"#);
        write_json_str(self.id.as_str(), &mut out);
        out.extend_from_slice(br#","org_id":"#);
        write_json_str(self.org_id.as_str(), &mut out);
        out.extend_from_slice(br#","prev_hash":"#);
        write_json_str(&self.prev_hash, &mut out);
        out.extend_from_slice(br#","seq":"#);
        out.extend_from_slice(self.seq.to_string().as_bytes());
        out.extend_from_slice(br#","subject":"#);
        match &self.subject {
            Some(subject) => write_json_str(subject, &mut out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","time_us":"#);
        out.extend_from_slice(self.time_us.to_string().as_bytes());
        out.push(b'}');
        let mut hasher = Sha256::new();
        hasher.update(self.prev_hash.as_bytes());
        hasher.update(&out);
        hex::encode(hasher.finalize())
    }
}

/// Compact JSON with object keys sorted at every depth, independent of how the map was built.
pub fn canonical_json(value: &Value) -> String {
    sorted_json(value, &|number, out| out.extend_from_slice(number.to_string().as_bytes()))
}

/// [`write_sorted_json`] into a new string.
pub fn sorted_json(value: &Value, number: &dyn Fn(&Number, &mut Vec<u8>)) -> String {
    let mut out = Vec::new();
    write_sorted_json(value, &mut out, number);
    // serde_json writes only UTF-8, so the lossy branch never runs.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Writes `value` as compact JSON with object keys sorted at every depth, each number as `number` writes it,
/// walking the value in place (no sorted copy is built); strings exactly as serde_json writes them.
pub fn write_sorted_json(value: &Value, out: &mut Vec<u8>, number: &dyn Fn(&Number, &mut Vec<u8>)) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(key, out);
                out.push(b':');
                write_sorted_json(item, out, number);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted_json(item, out, number);
            }
            out.push(b']');
        }
        Value::Number(n) => number(n, out),
        Value::String(s) => write_json_str(s, out),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
    }
}

/// A JSON string, quoted and escaped by serde_json's own serializer. Writing into a `Vec` cannot fail.
fn write_json_str(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(out, s).ok();
}

/// SHA-256 (hex) of a value's canonical JSON: the binding hash of a frozen request.
pub fn canonical_hash(value: &Value) -> String {
    hex::encode(Sha256::digest(canonical_json(value).as_bytes()))
}

/// The event retention appends, by the system, after it deleted the log's prefix up to `upto_seq` (in the same
/// transaction). A log (or an export) that begins after seq 1 holds one whose `upto_seq` is the seq just before
/// its first event; without it, the missing prefix was cut by something other than retention.
pub const RETENTION_APPLIED: &str = "audit.retention_applied";

impl AuditEvent {
    /// Whether this is retention's own record of cutting the log up to `upto_seq`.
    pub fn records_retention_upto(&self, upto_seq: i64) -> bool {
        self.action == RETENTION_APPLIED
            && self.actor == Actor::system()
            && self.data.get("upto_seq").and_then(Value::as_i64) == Some(upto_seq)
    }
}

/// Result of walking a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub ok: bool,
    pub events: u64,
    pub head_hash: String,
    pub first_broken_seq: Option<i64>,
}

/// Walks events in seq order and keeps the state needed to check each next one.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    expected_seq: i64,
    prev_hash: String,
    events: u64,
    first_broken_seq: Option<i64>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::starting_after(0, GENESIS_HASH)
    }
}

impl ChainVerifier {
    /// A verifier for a chain whose earlier part ended at `seq` with `hash` (for checkpointed prefixes).
    pub fn starting_after(seq: i64, hash: &str) -> Self {
        ChainVerifier { expected_seq: seq + 1, prev_hash: hash.to_owned(), events: 0, first_broken_seq: None }
    }

    pub fn push(&mut self, event: &AuditEvent) {
        self.events += 1;
        if self.first_broken_seq.is_some() {
            return;
        }
        let intact =
            event.seq == self.expected_seq && event.prev_hash == self.prev_hash && event.compute_hash() == event.hash;
        if !intact {
            self.first_broken_seq = Some(event.seq.min(self.expected_seq));
        }
        self.expected_seq = event.seq + 1;
        self.prev_hash = event.hash.clone();
    }

    pub fn finish(self) -> ChainReport {
        ChainReport {
            ok: self.first_broken_seq.is_none(),
            events: self.events,
            head_hash: self.prev_hash,
            first_broken_seq: self.first_broken_seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash as written before events were hashed field by field: the event copied into a JSON object,
    /// then written with sorted keys through `Value`'s own formatting.
    fn reference_hash(e: &AuditEvent) -> String {
        fn write(value: &Value, out: &mut String) {
            match value {
                Value::Object(map) => {
                    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                    out.push('{');
                    for (i, (key, item)) in entries.into_iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&Value::from(key.as_str()).to_string());
                        out.push(':');
                        write(item, out);
                    }
                    out.push('}');
                }
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        write(item, out);
                    }
                    out.push(']');
                }
                Value::Number(n) => out.push_str(&n.to_string()),
                scalar => out.push_str(&scalar.to_string()),
            }
        }
        let body = serde_json::json!({
            "org_id": e.org_id, "seq": e.seq, "id": e.id, "time_us": e.time_us, "actor": e.actor,
            "action": e.action, "subject": e.subject, "data": e.data, "prev_hash": e.prev_hash,
        });
        let mut text = String::new();
        write(&body, &mut text);
        let mut hasher = Sha256::new();
        hasher.update(e.prev_hash.as_bytes());
        hasher.update(text.as_bytes());
        hex::encode(hasher.finalize())
    }

    /// Random JSON from a seed: nested objects with keys in any order, arrays, every kind of number, and
    /// strings with quotes, backslashes, control characters and characters outside ASCII.
    fn random_value(seed: &mut u64, depth: u32) -> Value {
        fn next(seed: &mut u64) -> u64 {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *seed >> 33
        }
        fn text(seed: &mut u64) -> String {
            const PIECES: [&str; 12] =
                ["a", "Zed", "\"", "\\", "\n\t\r", "\u{1}\u{1f}", "\u{7f}", "é", "😀", "\u{2028}", "/", " "];
            (0..next(seed) % 5).map(|_| PIECES[(next(seed) % PIECES.len() as u64) as usize]).collect()
        }
        match next(seed) % if depth > 3 { 6 } else { 8 } {
            0 => Value::Null,
            1 => Value::Bool(next(seed).is_multiple_of(2)),
            2 => Value::from(next(seed) as i64 - (1 << 30)),
            3 => Value::from(u64::MAX - next(seed)),
            4 => {
                let (mantissa, exponent) = (next(seed) as f64 - 1e9, (next(seed) % 40) as i32 - 20);
                serde_json::Number::from_f64(mantissa / 7.0 * 10f64.powi(exponent)).map_or(Value::Null, Value::Number)
            }
            5 => Value::String(text(seed)),
            6 => Value::Array((0..next(seed) % 4).map(|_| random_value(seed, depth + 1)).collect()),
            _ => {
                let mut map = serde_json::Map::new();
                for _ in 0..next(seed) % 5 {
                    let key = text(seed);
                    map.insert(key, random_value(seed, depth + 1));
                }
                Value::Object(map)
            }
        }
    }

    /// Hashing field by field gives exactly the hashes of the chains already stored.
    #[test]
    fn the_hash_is_unchanged_from_the_json_object_form() {
        let mut seed = 7;
        for i in 0..2_000 {
            let mut event = AuditEvent::seal(
                OrgId::new(),
                i,
                GENESIS_HASH,
                NewAuditEvent {
                    time_us: i * 1_000_003 - 5,
                    actor: Actor {
                        kind: [ActorKind::Agent, ActorKind::User, ActorKind::Session, ActorKind::System]
                            [i as usize % 4],
                        id: format!("agt_{i}"),
                        name: "n\"a\u{1}mé".into(),
                    },
                    action: "action.executed".into(),
                    subject: (i % 3 != 0).then(|| format!("act_{i}\\")),
                    data: random_value(&mut seed, 0),
                },
            );
            assert_eq!(event.hash, reference_hash(&event), "{}", event.data);
            event.data =
                serde_json::json!({"nested": random_value(&mut seed, 1), "list": [random_value(&mut seed, 2)]});
            assert_eq!(event.compute_hash(), reference_hash(&event), "{}", event.data);
        }
    }

    fn chain(n: usize) -> Vec<AuditEvent> {
        let org = OrgId::new();
        let mut out: Vec<AuditEvent> = Vec::new();
        for i in 0..n {
            let (seq, hash) = out.last().map(|e| (e.seq, e.hash.clone())).unwrap_or((0, GENESIS_HASH.into()));
            out.push(AuditEvent::seal(
                org.clone(),
                seq,
                &hash,
                NewAuditEvent {
                    time_us: i as i64,
                    actor: Actor::system(),
                    action: "test.event".into(),
                    subject: None,
                    data: serde_json::json!({"b": i, "a": [1, {"z": 1, "y": 2}]}),
                },
            ));
        }
        out
    }

    #[test]
    fn a_stored_event_with_floats_still_matches_its_hash() {
        // 0.1 * 0.3 style floats: the score an agent's 19th success gets. Read back from JSON, the event
        // must hash the same, or verification reports a chain nobody broke.
        let event = AuditEvent::seal(
            OrgId::new(),
            0,
            GENESIS_HASH,
            NewAuditEvent {
                time_us: 1,
                actor: Actor::system(),
                action: "policy.evaluated".into(),
                subject: None,
                data: serde_json::json!({"risk_score": 0.030000000000000006, "x": [0.1, 1e-7, 123456.789]}),
            },
        );
        let text = serde_json::to_string(&event).unwrap_or_default();
        let back: AuditEvent = serde_json::from_str(&text).unwrap_or_else(|_| event.clone());
        assert_eq!(back.compute_hash(), event.hash);
        let data_text = serde_json::to_string(&event.data).unwrap_or_default();
        let data_back: Value = serde_json::from_str(&data_text).unwrap_or_default();
        assert_eq!(canonical_json(&data_back), canonical_json(&event.data));
    }

    #[test]
    fn intact_chain_verifies_and_tampering_names_the_event() {
        let events = chain(5);
        let mut v = ChainVerifier::default();
        events.iter().for_each(|e| v.push(e));
        let report = v.finish();
        assert!(report.ok);
        assert_eq!(report.events, 5);

        let mut tampered = events.clone();
        tampered[2].data = serde_json::json!({"b": 99});
        let mut v = ChainVerifier::default();
        tampered.iter().for_each(|e| v.push(e));
        assert_eq!(v.finish().first_broken_seq, Some(3));

        let mut gap = events;
        gap.remove(1);
        let mut v = ChainVerifier::default();
        gap.iter().for_each(|e| v.push(e));
        assert_eq!(v.finish().first_broken_seq, Some(2));
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn canonical_json_is_the_text_existing_chains_were_sealed_with() {
        // How events were sealed before the writer walked values in place: a sorted copy, then serde_json's
        // compact text. Every stored hash depends on the two agreeing byte for byte.
        fn sorted_copy(value: &Value) -> Value {
            match value {
                Value::Object(map) => {
                    let mut keys: Vec<&String> = map.keys().collect();
                    keys.sort();
                    Value::Object(keys.into_iter().map(|k| (k.clone(), sorted_copy(&map[k]))).collect())
                }
                Value::Array(items) => Value::Array(items.iter().map(sorted_copy).collect()),
                other => other.clone(),
            }
        }
        let samples = [
            r#"{"z":1,"a":[{"b":2.5,"a":-0.0,"c":1e300}],"m":{"é":"\u0000\n\"\\","E":"\ud83d\ude00","e":null}}"#,
            r#"[18446744073709551615,-9223372036854775808,0.1,1.0,true,false,"\u2028</script>"]"#,
            r#"{"":{"":[]},"b":{},"a":"x","A":"y","_":"z","1":"w"}"#,
            r#"{"a\"b":1,"\\":2,"\u0001":3,"\u2028":4,"é":5,"e\u0301":6,"\ud83d\ude00":7}"#,
            r#""just a string""#,
            r#"12.5e-7"#,
        ];
        for text in samples {
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(canonical_json(&value), sorted_copy(&value).to_string(), "{text}");
        }
        // And the bytes themselves, should a serde_json upgrade ever write escapes or numbers differently.
        let value: Value = serde_json::from_str(samples[3]).unwrap();
        let value = serde_json::json!({"keys": value, "n": [1.5, -0.0, 1e300, 0.1, 12.5e-7, -7]});
        let golden = "{\"keys\":{\"\\u0001\":3,\"\\\\\":2,\"a\\\"b\":1,\"e\u{301}\":6,\"\u{e9}\":5,\"\u{2028}\":4,\
            \"\u{1f600}\":7},\"n\":[1.5,-0.0,1e+300,0.1,1.25e-6,-7]}";
        assert_eq!(canonical_json(&value), golden);
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"d":[{"y":1,"x":2}],"c":null}}"#).unwrap_or_default();
        assert_eq!(canonical_json(&a), r#"{"a":{"c":null,"d":[{"x":2,"y":1}]},"b":1}"#);
    }
}
