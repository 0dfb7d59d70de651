//! Secrets handed to callers: API keys (`cs_sk_`), session tokens (`cs_st_`) and approval poll tokens
//! (`cs_ap_`), each 32 random bytes in unpadded base64url.
//!
//! Only the SHA-256 of a secret is ever stored; lookups go by that hash and a final comparison is made in
//! constant time. This module never logs or stores the plaintext.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a secret is for; its prefix tells a reader at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    ApiKey,
    SessionToken,
    ApprovalToken,
}

impl SecretKind {
    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::ApiKey => "cs_sk_",
            SecretKind::SessionToken => "cs_st_",
            SecretKind::ApprovalToken => "cs_ap_",
        }
    }

    /// Which kind a presented secret claims to be, from its prefix and shape.
    pub fn of(secret: &str) -> Option<SecretKind> {
        [SecretKind::ApiKey, SecretKind::SessionToken, SecretKind::ApprovalToken]
            .into_iter()
            .find(|kind| is_well_formed(*kind, secret))
    }
}

/// A freshly generated secret: the plaintext (shown once) and the hash to store.
pub struct NewSecret {
    pub plaintext: String,
    pub hash: String,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret").field("hash", &self.hash).finish_non_exhaustive()
    }
}

pub fn generate(kind: SecretKind) -> NewSecret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let plaintext = format!("{}{}", kind.prefix(), URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_secret(&plaintext);
    NewSecret { plaintext, hash }
}

/// `<prefix><43 base64url chars>` and nothing else.
pub fn is_well_formed(kind: SecretKind, secret: &str) -> bool {
    secret
        .strip_prefix(kind.prefix())
        .is_some_and(|rest| rest.len() == 43 && URL_SAFE_NO_PAD.decode(rest).is_ok_and(|bytes| bytes.len() == 32))
}

/// Lowercase hex SHA-256 of the whole secret, prefix included.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time equality of two stored hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The first characters of a key, safe to show in listings (the prefix plus four characters).
pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(10).collect()
}

/// The last four characters of a key, safe to show in listings.
pub fn last_four(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    chars[chars.len().saturating_sub(4)..].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_well_formed_and_hash_stably() {
        for kind in [SecretKind::ApiKey, SecretKind::SessionToken, SecretKind::ApprovalToken] {
            let s = generate(kind);
            assert!(is_well_formed(kind, &s.plaintext), "{}", s.plaintext);
            assert_eq!(SecretKind::of(&s.plaintext), Some(kind));
            assert_eq!(hash_secret(&s.plaintext), s.hash);
            assert!(hashes_equal(&s.hash, &hash_secret(&s.plaintext)));
        }
        assert!(!is_well_formed(SecretKind::ApiKey, "cs_sk_short"));
        assert_eq!(SecretKind::of("Bearer nonsense"), None);
    }
}
