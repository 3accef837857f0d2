//! Client authentication towards tidemark: SCRAM-SHA-256, md5 and trust, per user from
//! config.
//!
//! The SCRAM *server* side is written here by hand: postgres-protocol only implements
//! the client side, and no well-kept crate offers a PostgreSQL-compatible SCRAM server.
//! It follows RFC 5802/7677 as PostgreSQL does (no channel binding; the username in the
//! client-first message is ignored, as PostgreSQL ignores it).
//!
//! A successful SCRAM login also yields the client's ClientKey (recovered from its proof),
//! which [`crate::passthrough`] reuses to log in to the servers without a plaintext password.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tidemark_wire::backend::{authentication, ErrorFields};
use tidemark_wire::Frame;

use crate::client::{ClientError, ClientIo};
use crate::config::{AuthMethod, UserConfig};

type HmacSha256 = Hmac<Sha256>;
const ITERATIONS: u32 = 4096;

/// A SCRAM verifier: what the server needs to check a proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

pub(crate) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().into()
}

pub(crate) fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    // SCRAM's Hi() is PBKDF2-HMAC-SHA-256 with a 32-byte output (RFC 5802, 7677).
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

impl ScramSecret {
    pub fn from_password(password: &str) -> ScramSecret {
        let mut salt = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        let sp = salted_password(password.as_bytes(), &salt, ITERATIONS);
        let client_key = hmac(&sp, b"Client Key");
        ScramSecret {
            iterations: ITERATIONS,
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&sp, b"Server Key"),
        }
    }

    /// Parses PostgreSQL's verifier format `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(verifier: &str) -> Option<ScramSecret> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A secret no password matches, stable per user for a given key: what an unknown user
    /// is challenged with, so the exchange (salt, iterations) looks like a real user's.
    pub fn decoy(key: &[u8; 32], user: &str) -> ScramSecret {
        let salt = hmac(key, format!("salt:{user}").as_bytes());
        ScramSecret {
            iterations: ITERATIONS,
            salt: salt[..16].to_vec(),
            stored_key: hmac(key, format!("stored:{user}").as_bytes()),
            server_key: hmac(key, format!("server:{user}").as_bytes()),
        }
    }

    pub fn for_user(u: &UserConfig) -> Option<ScramSecret> {
        let p = u.password.as_deref()?;
        ScramSecret::parse(p).or_else(|| Some(ScramSecret::from_password(p)))
    }
}

/// A client's SCRAM ClientKey (HMAC(SaltedPassword, "Client Key")): whoever holds it can log
/// in as that user wherever the same verifier is stored, so it is never logged (no `Debug`
/// output) and its bytes are overwritten when it is dropped.
pub struct ClientKey([u8; 32]);

impl ClientKey {
    pub fn new(bytes: [u8; 32]) -> ClientKey {
        ClientKey(bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(..)")
    }
}

impl Drop for ClientKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own array; the
            // volatile write only keeps the compiler from eliding the wipe of a dead value.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// Checks a client's proof against `secret`: the ClientKey it reveals (proof XOR
/// HMAC(StoredKey, AuthMessage)) must hash to StoredKey. Returns that ClientKey.
pub fn recover_client_key(
    secret: &ScramSecret,
    auth_message: &[u8],
    proof: &[u8],
) -> Option<ClientKey> {
    if proof.len() != 32 {
        return None;
    }
    let client_signature = hmac(&secret.stored_key, auth_message);
    let mut key = ClientKey([0u8; 32]);
    for i in 0..32 {
        key.0[i] = proof[i] ^ client_signature[i];
    }
    let stored: [u8; 32] = Sha256::digest(key.0.as_slice()).into();
    constant_time_eq(&stored, &secret.stored_key).then_some(key)
}

/// Compares secrets without an early exit on the first differing byte (no timing oracle).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

fn auth_failed(user: &str) -> ErrorFields {
    ErrorFields::fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

fn protocol(msg: &str) -> ErrorFields {
    ErrorFields::fatal("08P01", msg.to_string())
}

/// Reads the next 'p' message.
async fn password_message(io: &mut ClientIo) -> Result<Result<Frame, ErrorFields>, ClientError> {
    let f = io.recv().await?;
    if f.tag() != b'p' {
        return Ok(Err(protocol("expected a password message")));
    }
    Ok(Ok(f))
}

/// What a login proved: for SCRAM, the client's ClientKey (see [`crate::passthrough`]).
pub type Login = Result<Option<ClientKey>, ErrorFields>;

/// Runs the authentication exchange. `Ok(Err(e))` is a refusal to send to the client.
pub async fn authenticate(
    io: &mut ClientIo,
    user: &UserConfig,
    scram: Option<&ScramSecret>,
) -> Result<Login, ClientError> {
    match user.auth {
        AuthMethod::Trust => Ok(Ok(None)),
        AuthMethod::Md5 => {
            let mut salt = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut salt);
            io.send(&authentication(5, &salt)).await?;
            let f = match password_message(io).await? {
                Ok(f) => f,
                Err(e) => return Ok(Err(e)),
            };
            let got = f.body().strip_suffix(&[0]).unwrap_or(f.body());
            let password = user.password.as_deref().unwrap_or_default();
            let want = postgres_protocol::authentication::md5_hash(
                user.name.as_bytes(),
                password.as_bytes(),
                salt,
            );
            if constant_time_eq(got, want.as_bytes()) {
                Ok(Ok(None))
            } else {
                Ok(Err(auth_failed(&user.name)))
            }
        }
        AuthMethod::ScramSha256 => {
            let Some(secret) = scram else {
                // No usable secret: fail the way a wrong password does.
                let decoy = ScramSecret::decoy(&[0u8; 32], &user.name);
                return scram_exchange(io, &user.name, &decoy).await;
            };
            scram_exchange(io, &user.name, secret).await
        }
    }
}

/// The client-first message of SCRAM (SASLInitialResponse body): the gs2 header, the bare
/// message and the client nonce.
fn parse_client_first(body: &[u8]) -> Result<(&'static str, &str, &str), ErrorFields> {
    let Some(nul) = body.iter().position(|b| *b == 0) else {
        return Err(protocol("malformed SASLInitialResponse"));
    };
    if &body[..nul] != b"SCRAM-SHA-256" {
        return Err(protocol("unsupported SASL mechanism (use SCRAM-SHA-256)"));
    }
    let data = body.get(nul + 5..).unwrap_or_default();
    let Ok(client_first) = std::str::from_utf8(data) else {
        return Err(protocol("SCRAM message is not UTF-8"));
    };
    let (gs2, bare) = if let Some(b) = client_first.strip_prefix("n,,") {
        ("n,,", b)
    } else if let Some(b) = client_first.strip_prefix("y,,") {
        ("y,,", b)
    } else {
        return Err(protocol(
            "SCRAM channel binding is not supported by tidemark (connect with channel_binding=disable or prefer)",
        ));
    };
    let Some(client_nonce) = bare.split(',').find_map(|p| p.strip_prefix("r=")) else {
        return Err(protocol("SCRAM client-first message has no nonce"));
    };
    Ok((gs2, bare, client_nonce))
}

/// The client-final message: the part before the proof and the 32-byte proof; `Ok(None)`
/// when the proof is not 32 bytes of base64 (a failed login, like a wrong proof).
#[allow(clippy::type_complexity)]
fn parse_client_final<'a>(
    body: &'a [u8],
    gs2: &str,
    nonce: &str,
) -> Result<Option<(&'a str, Vec<u8>)>, ErrorFields> {
    let Ok(client_final) = std::str::from_utf8(body) else {
        return Err(protocol("SCRAM message is not UTF-8"));
    };
    let Some((without_proof, proof_b64)) = client_final.rsplit_once(",p=") else {
        return Err(protocol("SCRAM client-final message has no proof"));
    };
    let mut cb_ok = false;
    let mut nonce_ok = false;
    for part in without_proof.split(',') {
        if let Some(c) = part.strip_prefix("c=") {
            cb_ok = B64.decode(c).ok().as_deref() == Some(gs2.as_bytes());
        } else if let Some(r) = part.strip_prefix("r=") {
            nonce_ok = r == nonce;
        }
    }
    if !cb_ok || !nonce_ok {
        return Err(protocol(
            "SCRAM client-final message does not match the exchange",
        ));
    }
    match B64.decode(proof_b64) {
        Ok(p) if p.len() == 32 => Ok(Some((without_proof, p))),
        _ => Ok(None),
    }
}

/// A SCRAM-SHA-256 exchange against `secret`; on success, the ClientKey the proof revealed.
pub async fn scram_exchange(
    io: &mut ClientIo,
    user: &str,
    secret: &ScramSecret,
) -> Result<Login, ClientError> {
    io.send(&authentication(10, b"SCRAM-SHA-256\0\0")).await?;
    let f = match password_message(io).await? {
        Ok(f) => f,
        Err(e) => return Ok(Err(e)),
    };
    // SASLInitialResponse: mechanism, int32 length, data.
    let (gs2, bare, client_nonce) = match parse_client_first(f.body()) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let mut sn = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut sn);
    let nonce = format!("{client_nonce}{}", B64.encode(sn));
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(&secret.salt),
        secret.iterations
    );
    io.send(&authentication(11, server_first.as_bytes()))
        .await?;

    let f = match password_message(io).await? {
        Ok(f) => f,
        Err(e) => return Ok(Err(e)),
    };
    let (without_proof, proof) = match parse_client_final(f.body(), gs2, &nonce) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(Err(auth_failed(user))),
        Err(e) => return Ok(Err(e)),
    };
    let auth_message = format!("{bare},{server_first},{without_proof}");
    let Some(client_key) = recover_client_key(secret, auth_message.as_bytes(), &proof) else {
        return Ok(Err(auth_failed(user)));
    };
    let server_signature = hmac(&secret.server_key, auth_message.as_bytes());
    let server_final = format!("v={}", B64.encode(server_signature));
    io.push(&authentication(12, server_final.as_bytes()));
    Ok(Ok(Some(client_key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client_first(data: &[u8]) -> Vec<u8> {
        let mut v = b"SCRAM-SHA-256\0".to_vec();
        v.extend_from_slice(&(data.len() as i32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// The SCRAM message parsers (fed what a client sends during login) never panic.
        #[test]
        fn scram_parsers_never_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..120),
            text in "(n,,|y,,|p=|r=|c=|,|[a-zA-Z0-9+/=]){0,30}",
        ) {
            let _ = parse_client_first(&raw);
            let _ = parse_client_first(&client_first(&raw));
            let _ = parse_client_first(&client_first(text.as_bytes()));
            let _ = parse_client_final(&raw, "n,,", "abc");
            let _ = parse_client_final(text.as_bytes(), "n,,", "abc");
            let _ = ScramSecret::parse(&String::from_utf8_lossy(&raw));
            let _ = ScramSecret::parse(&format!("SCRAM-SHA-256${text}"));
        }
    }

    #[test]
    fn scram_parsers_read_what_libpq_sends() {
        let first = client_first(b"n,,n=,r=abc");
        let (gs2, bare, nonce) = parse_client_first(&first).unwrap();
        assert_eq!((gs2, bare, nonce), ("n,,", "n=,r=abc", "abc"));
        assert!(parse_client_first(&client_first(b"p=tls-server-end-point,,n=,r=x")).is_err());
        let proof = B64.encode([7u8; 32]);
        let fin = format!("c={},r=abcdef,p={proof}", B64.encode("n,,"));
        let (w, p) = parse_client_final(fin.as_bytes(), "n,,", "abcdef")
            .unwrap()
            .unwrap();
        assert_eq!(w, format!("c={},r=abcdef", B64.encode("n,,")));
        assert_eq!(p, vec![7u8; 32]);
        assert!(parse_client_final(fin.as_bytes(), "n,,", "other").is_err());
        let short = format!(
            "c={},r=abcdef,p={}",
            B64.encode("n,,"),
            B64.encode([1u8; 5])
        );
        assert!(parse_client_final(short.as_bytes(), "n,,", "abcdef")
            .unwrap()
            .is_none());
    }

    #[test]
    fn decoy_secrets_are_stable_per_user_and_key() {
        let k = [9u8; 32];
        assert_eq!(ScramSecret::decoy(&k, "a"), ScramSecret::decoy(&k, "a"));
        assert_ne!(
            ScramSecret::decoy(&k, "a").salt,
            ScramSecret::decoy(&k, "b").salt
        );
        assert_ne!(
            ScramSecret::decoy(&k, "a"),
            ScramSecret::decoy(&[8u8; 32], "a")
        );
    }

    #[test]
    fn parses_postgres_verifier() {
        // Made with PostgreSQL 15: SET password_encryption='scram-sha-256'; CREATE ROLE ... PASSWORD 'pencil';
        let s = ScramSecret::from_password("pencil");
        let v = format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            s.iterations,
            B64.encode(&s.salt),
            B64.encode(s.stored_key),
            B64.encode(s.server_key)
        );
        assert_eq!(ScramSecret::parse(&v), Some(s));
        assert_eq!(ScramSecret::parse("md5abc"), None);
        assert_eq!(ScramSecret::parse("SCRAM-SHA-256$x:y$z:w"), None);
    }

    #[test]
    fn salted_password_matches_rfc7677_vector() {
        // RFC 7677 test vector: password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let sp = salted_password(b"pencil", &salt, 4096);
        let client_key = hmac(&sp, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let nonce_c = "rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final_wo = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let auth = format!("n=user,r={nonce_c},{server_first},{client_final_wo}");
        let sig = hmac(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(sig.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(
            B64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
    }
}
