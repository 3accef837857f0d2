//! The signed text form of a causality token: `<LSN>.<HMAC-SHA256, base64url>`, e.g.
//! `0/3000060.q1f0...`. Anything that does not verify is treated as no token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tidemark_core::Lsn;

type HmacSha256 = Hmac<Sha256>;

/// Domain separation: a MAC made with the same key for something else never verifies here.
const CONTEXT: &[u8] = b"tidemark-tower token v1\0";

/// Longest text accepted as a token (an LSN is at most 17 bytes, the MAC 43).
const MAX_TOKEN_LEN: usize = 128;

/// The key that signs and verifies tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from secret bytes (use at least 32 random bytes, shared by every app instance).
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        TokenKey { key: key.into() }
    }

    fn mac(&self, lsn_text: &str) -> HmacSha256 {
        // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
        let mut m = match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        m.update(CONTEXT);
        m.update(lsn_text.as_bytes());
        m
    }

    /// The signed text of `lsn`.
    pub fn sign(&self, lsn: Lsn) -> String {
        let text = lsn.to_string();
        let tag = self.mac(&text).finalize().into_bytes();
        format!("{text}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The LSN of a signed token, or `None` when it is malformed, forged or signed with
    /// another key. Never panics, whatever the input.
    pub fn verify(&self, token: &str) -> Option<Lsn> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let (text, tag) = token.rsplit_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        // Constant time comparison (hmac's `verify_slice`).
        self.mac(text).verify_slice(&tag).ok()?;
        // Only the canonical form we sign: no spaces, no leading zeros games.
        let lsn: Lsn = text.parse().ok()?;
        (lsn.to_string() == text).then_some(lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    #[test]
    fn round_trips() {
        for l in [Lsn(1), Lsn(0x300_0060), Lsn(0x16_B374_D848), Lsn(u64::MAX)] {
            let t = key().sign(l);
            assert!(t.starts_with(&format!("{l}.")), "{t}");
            assert_eq!(key().verify(&t), Some(l));
        }
    }

    #[test]
    fn another_key_does_not_verify() {
        let t = key().sign(Lsn(42));
        assert_eq!(TokenKey::new(b"another key".to_vec()).verify(&t), None);
        assert_eq!(TokenKey::new(Vec::new()).verify(&t), None);
    }

    #[test]
    fn forged_lsn_with_a_valid_tag_does_not_verify() {
        // A client raising the LSN of a token it got (to push its reads to the primary, or
        // to probe) must not be believed.
        let t = key().sign(Lsn(0x300_0060));
        let (_, tag) = t.rsplit_once('.').unwrap();
        for lsn in ["0/3000061", "1/3000060", "FFFFFFFF/FFFFFFFF", "0/0"] {
            assert_eq!(key().verify(&format!("{lsn}.{tag}")), None, "{lsn}");
        }
        // The same LSN in a non-canonical spelling (the MAC covers the exact text).
        assert_eq!(key().verify(&format!("0/03000060.{tag}")), None);
        assert_eq!(key().verify(&format!(" 0/3000060.{tag}")), None);
    }

    #[test]
    fn a_signed_but_non_canonical_text_does_not_verify() {
        // Even correctly signed, only the canonical form is accepted.
        let k = key();
        let tag = URL_SAFE_NO_PAD.encode(k.mac(" 0/10").finalize().into_bytes());
        assert_eq!(k.verify(&format!(" 0/10.{tag}")), None);
        let tag = URL_SAFE_NO_PAD.encode(k.mac("0/010").finalize().into_bytes());
        assert_eq!(k.verify(&format!("0/010.{tag}")), None);
    }

    #[test]
    fn garbled_tokens_are_no_token() {
        let k = key();
        let good = k.sign(Lsn(0x300_0060));
        let mut cases: Vec<String> = vec![
            String::new(),
            ".".into(),
            "0/3000060".into(),
            "0/3000060.".into(),
            ".abc".into(),
            "0/3000060.!!!!".into(),
            "not an lsn.AAAA".into(),
            "0/3000060.AAAA.BBBB".into(),
            "x".repeat(10_000),
            format!("{good}x"),
            format!("{good}="),
            good[..good.len() - 1].to_string(),
            good.replace('/', "%2F"),
            "\u{1F600}.\u{1F600}".into(),
            "é/é.é".into(),
        ];
        // Every single-byte change of a good token.
        for i in 0..good.len() {
            let mut b = good.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            cases.push(String::from_utf8(b).unwrap());
        }
        for c in &cases {
            assert_eq!(k.verify(c), None, "{c:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap fuzz: pseudo-random strings over the token alphabet and beyond.
        let alphabet: Vec<char> = "0123456789abcdefABCDEF/.-_=+ \u{e9}\u{1F600}"
            .chars()
            .collect();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 70) as usize;
            let s: String = (0..len)
                .map(|i| alphabet[((x >> (i % 50)) as usize + i) % alphabet.len()])
                .collect();
            let _ = key().verify(&s);
        }
    }
}
