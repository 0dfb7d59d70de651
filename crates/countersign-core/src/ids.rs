//! Typed identifiers: a prefix that says what the id names (`act_`, `apr_`, …) followed by a ULID.
//!
//! An id is parsed at the edge; a malformed or wrongly prefixed id is refused before any lookup. This module
//! does not know whether an id exists or to which org it belongs.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn new() -> Self {
                Self(format!("{}{}", $prefix, ulid::Ulid::generate()))
            }

            /// Accepts exactly the prefix followed by a valid ULID.
            pub fn parse(text: &str) -> Option<Self> {
                let rest = text.strip_prefix($prefix)?;
                ulid::Ulid::from_string(rest).ok()?;
                Some(Self(text.to_owned()))
            }

            /// Wraps a value read back from the store, which only ever holds ids this type produced.
            pub fn from_stored(text: String) -> Self {
                Self(text)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Self::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!("`{text}` is not a valid id: expected `{}` followed by a ULID", $prefix))
                })
            }
        }
    };
}

prefixed_id!(/// A tenant.
    OrgId, "org_");
prefixed_id!(/// A human user.
    UserId, "usr_");
prefixed_id!(/// A machine principal.
    AgentId, "agt_");
prefixed_id!(/// A long-lived API key (the id, never the secret).
    KeyId, "key_");
prefixed_id!(/// A short-lived session.
    SessionId, "ses_");
prefixed_id!(/// An action, from submission to its end.
    ActionId, "act_");
prefixed_id!(/// The approval of one action.
    ApprovalId, "apr_");
prefixed_id!(/// One audit event.
    EventId, "evt_");
prefixed_id!(/// One unit of asynchronous work.
    JobId, "job_");
prefixed_id!(/// A webhook subscription.
    WebhookId, "whk_");
prefixed_id!(/// One attempt to deliver a webhook.
    DeliveryId, "dlv_");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_refuse_wrong_prefix() {
        let id = ActionId::new();
        assert_eq!(ActionId::parse(id.as_str()), Some(id.clone()));
        assert!(ApprovalId::parse(id.as_str()).is_none());
        assert!(ActionId::parse("act_nope").is_none());
        assert!(ActionId::parse("").is_none());
    }
}
