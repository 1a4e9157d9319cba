//! Access tokens.
//!
//! Two kinds: the admin token (read from `--admin-token-file`, kept in memory
//! as a hash) and service tokens (made by the admin, each scoped to one
//! service). Service tokens are stored only as their SHA-256 hash, so a copy of
//! etcd does not hand out working tokens.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of every token Signpost makes, so a leaked one is easy to grep for.
pub const TOKEN_PREFIX: &str = "sp_";

/// Makes a new random token: `sp_` and 32 random bytes in hex.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// The hash a token is stored and compared under (hex SHA-256).
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Compares two hashes without stopping at the first difference, so response
/// times do not reveal how much of a guessed token was right.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(hash(&a), hash(&format!("{a}\n")));
        assert!(hashes_equal(&hash(&a), &hash(&a)));
        assert!(!hashes_equal(&hash(&a), &hash(&b)));
    }
}
