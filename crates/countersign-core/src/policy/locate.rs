//! Finding lines and columns in policy text for errors that serde cannot place by itself.
//!
//! yaml_serde has no spanned values, but it tags every error raised while a node is being read with that
//! node's position. Both tools here use that: `locate` walks a path (`rules[3].name`) and fails on purpose
//! at the target, then reads the position off the error; `find_duplicate_key` walks the whole document and
//! fails at the first key that repeats a key of the same mapping (serde would otherwise keep the last value of
//! a map silently, and report a repeated struct field at the mapping rather than at the key).
//! Neither returns data from the document; they only answer positions and messages.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a path into the document.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step<'a> {
    /// The value under this key of a mapping.
    Key(&'a str),
    /// This element of a sequence.
    Index(usize),
}

/// What to point at once the path is walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The node the path leads to (for a mapping: where its first key starts).
    Value,
    /// The key of the last `Step::Key` (e.g. `finance` in `domains: {finance: …}`).
    Key,
}

/// Line and column (1-based) of the node at `path`, or `None` when the path is not in the document.
pub(crate) fn locate(text: &str, path: &[Step<'_>], target: Target) -> Option<(usize, usize)> {
    let deserializer = yaml_serde::Deserializer::from_str(text);
    match (Probe { path, target }).deserialize(deserializer) {
        Ok(()) => None,
        Err(error) => error.location().map(|l| (l.line(), l.column())),
    }
}

/// The first key repeated within one mapping: its message and its line and column.
pub(crate) fn find_duplicate_key(text: &str) -> Option<(String, Option<(usize, usize)>)> {
    let deserializer = yaml_serde::Deserializer::from_str(text);
    match DuplicateCheck.deserialize(deserializer) {
        Ok(()) => None,
        Err(error) => {
            let location = error.location().map(|l| (l.line(), l.column()));
            Some((super::yaml_message(&error), location))
        }
    }
}

const FOUND: &str = "found";

struct Probe<'p> {
    path: &'p [Step<'p>],
    target: Target,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        match self.path.first() {
            None => deserializer.deserialize_any(FailHere),
            Some(_) => deserializer.deserialize_any(self),
        }
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (wanted, rest) = match self.path.split_first() {
            Some((Step::Key(key), rest)) => (Some(*key), rest),
            _ => (None, &[][..]),
        };
        let fail_on_key = rest.is_empty() && self.target == Target::Key;
        while let Some(matched) = map.next_key_seed(KeyProbe { wanted, fail_on_key })? {
            if matched {
                map.next_value_seed(Probe { path: rest, target: self.target })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (wanted, rest) = match self.path.split_first() {
            Some((Step::Index(index), rest)) => (Some(*index), rest),
            _ => (None, &[][..]),
        };
        let mut index = 0;
        loop {
            let found = if Some(index) == wanted {
                seq.next_element_seed(Probe { path: rest, target: self.target })?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if found.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// Reads a key; answers whether it is the wanted one, or fails on it when it is the target.
struct KeyProbe<'k> {
    wanted: Option<&'k str>,
    fail_on_key: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        let matched = self.wanted == Some(key);
        if matched && self.fail_on_key { Err(E::custom(FOUND)) } else { Ok(matched) }
    }
    fn visit_bool<E: de::Error>(self, key: bool) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_i64<E: de::Error>(self, key: i64) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_u64<E: de::Error>(self, key: u64) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_f64<E: de::Error>(self, key: f64) -> Result<bool, E> {
        self.visit_str(&key.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// Fails on whatever node it is given, so the error carries that node's position.
struct FailHere;

impl<'de> Visitor<'de> for FailHere {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(FOUND)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

/// Walks every node; fails at the first mapping key equal to an earlier key of the same mapping.
struct DuplicateCheck;

impl<'de> DeserializeSeed<'de> for DuplicateCheck {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DuplicateCheck {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while map.next_key_seed(UniqueKey { seen: &mut seen })?.is_some() {
            map.next_value_seed(DuplicateCheck)?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(DuplicateCheck)?.is_some() {}
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

struct UniqueKey<'s> {
    seen: &'s mut HashSet<String>,
}

impl<'de> DeserializeSeed<'de> for UniqueKey<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKey<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<(), E> {
        if self.seen.insert(key.to_owned()) {
            Ok(())
        } else {
            Err(E::custom(format!("duplicate key `{key}`: each key may appear only once in a mapping")))
        }
    }
    fn visit_bool<E: de::Error>(self, key: bool) -> Result<(), E> {
        self.visit_str(&key.to_string())
    }
    fn visit_i64<E: de::Error>(self, key: i64) -> Result<(), E> {
        self.visit_str(&key.to_string())
    }
    fn visit_u64<E: de::Error>(self, key: u64) -> Result<(), E> {
        self.visit_str(&key.to_string())
    }
    fn visit_f64<E: de::Error>(self, key: f64) -> Result<(), E> {
        self.visit_str(&key.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.visit_str("null")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}
