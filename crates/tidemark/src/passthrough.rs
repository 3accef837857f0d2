//! SCRAM pass-through: logging in to the servers as a client's user without its password.
//!
//! When a client logs in to tidemark with SCRAM-SHA-256, its proof reveals its ClientKey
//! (`ClientProof XOR HMAC(StoredKey, AuthMessage)`, checked by `H(ClientKey) == StoredKey`;
//! see [`crate::auth::recover_client_key`]). A SCRAM client needs nothing more than the
//! ClientKey to prove itself to a server that stores the same verifier, and the verifier's
//! ServerKey to check the server's signature — so tidemark keeps the last ClientKey of each
//! user in memory ([`KeySlot`]) and uses it for that user's server connections when no
//! `server_password` is configured. This is what PgBouncer does, and it has the same
//! requirement: the server must hold the *same* verifier (same salt and iterations) as the
//! one tidemark checked the client against, e.g. copied from `pg_authid` or read with
//! `auth_query`.
//!
//! The client side is written here by hand because postgres-protocol's `ScramSha256` only
//! starts from a password (it derives SaltedPassword itself), and no ClientKey can be turned
//! back into a password.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use parking_lot::Mutex;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tidemark_wire::backend::ErrorFields;

use crate::auth::{constant_time_eq, hmac, ClientKey, ScramSecret};
use crate::server::{ServerError, ServerTarget};

/// A user's ClientKey together with the verifier it was checked against.
#[derive(Debug)]
pub struct ScramKeys {
    pub secret: ScramSecret,
    pub client_key: ClientKey,
}

/// The last ClientKey of one user, shared by the App and that user's pools. Empty until a
/// client of that user has logged in with SCRAM since tidemark started (or since the user's
/// verifier changed).
#[derive(Debug, Default)]
pub struct KeySlot(Mutex<Option<Arc<ScramKeys>>>);

impl KeySlot {
    pub fn get(&self) -> Option<Arc<ScramKeys>> {
        self.0.lock().clone()
    }

    /// Replaces the keys (the previous ClientKey is wiped once no connect uses it).
    pub fn set(&self, keys: ScramKeys) {
        *self.0.lock() = Some(Arc::new(keys));
    }

    pub fn clear(&self) {
        *self.0.lock() = None;
    }

    /// Clears the slot unless it holds keys for `secret` (the user's verifier changed).
    pub fn keep_only(&self, secret: Option<&ScramSecret>) {
        let mut g = self.0.lock();
        if g.as_ref().map(|k| &k.secret) != secret {
            *g = None;
        }
    }
}

/// Why a pass-through login failed (the caller turns it into a 08004 error).
pub type PassThroughError = String;

/// True when `t` can only log in with a ClientKey and has none yet (pool pre-warming waits).
pub fn lacks_keys(t: &ServerTarget) -> bool {
    t.password.is_none() && t.keys.as_ref().is_some_and(|k| k.get().is_none())
}

/// What to add to "no password configured" when the server asked for md5 or cleartext.
pub fn needs_scram_hint(t: &ServerTarget) -> &'static str {
    if t.keys.is_some() {
        "; SCRAM pass-through works only when the server asks for SCRAM-SHA-256 (a SCRAM verifier in pg_authid), not md5 or a cleartext password"
    } else {
        ""
    }
}

/// A pass-through failure: the server (or tidemark for it) refused this login, 08004.
fn refused(m: PassThroughError) -> ServerError {
    ServerError::Server(ErrorFields::error("08004", m))
}

/// The SCRAM-SHA-256 exchange of a server login: from the configured password
/// (postgres-protocol's client) or, with no password, from the user's ClientKey.
pub enum ServerScram {
    Password(ScramSha256),
    Keys(PassThroughClient),
}

impl ServerScram {
    pub fn start<'a>(
        t: &'a ServerTarget,
        password: impl FnOnce() -> Result<&'a str, ServerError>,
    ) -> Result<ServerScram, ServerError> {
        match (&t.password, &t.keys) {
            (None, Some(slot)) => {
                let keys = slot.get().ok_or_else(|| refused(format!(
                    "no credentials for user \"{}\" yet: tidemark logs in to the servers with the ClientKey of the user's last SCRAM login (no server_password is configured), and no client of that user has logged in with SCRAM since tidemark started or since its verifier changed",
                    t.user
                )))?;
                Ok(ServerScram::Keys(PassThroughClient::new(keys, &t.user)))
            }
            _ => Ok(ServerScram::Password(ScramSha256::new(
                password()?.as_bytes(),
                ChannelBinding::unsupported(),
            ))),
        }
    }

    pub fn message(&self) -> &[u8] {
        match self {
            ServerScram::Password(s) => s.message(),
            ServerScram::Keys(c) => c.message(),
        }
    }

    pub fn update(&mut self, server_first: &[u8]) -> Result<(), ServerError> {
        match self {
            ServerScram::Password(s) => Ok(s.update(server_first)?),
            ServerScram::Keys(c) => c.update(server_first).map_err(refused),
        }
    }

    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), ServerError> {
        match self {
            ServerScram::Password(s) => s
                .finish(server_final)
                .map_err(|e| ServerError::Auth(format!("SCRAM server signature: {e}"))),
            ServerScram::Keys(c) => c.finish(server_final).map_err(refused),
        }
    }
}

/// The client side of one SCRAM-SHA-256 exchange with a server, from a ClientKey.
pub struct PassThroughClient {
    keys: Arc<ScramKeys>,
    user: String,
    nonce: String,
    client_first_bare: String,
    message: Vec<u8>,
    /// AuthMessage, once the proof has been sent.
    auth_message: Option<String>,
}

impl PassThroughClient {
    /// Starts an exchange: the client-first message is `n,,n=,r=<nonce>` (no channel binding;
    /// PostgreSQL ignores the SCRAM user name and uses the startup packet's). `user` is only
    /// used in error messages.
    pub fn new(keys: Arc<ScramKeys>, user: &str) -> PassThroughClient {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        Self::with_nonce(keys, user, "", &B64.encode(raw))
    }

    fn with_nonce(
        keys: Arc<ScramKeys>,
        user: &str,
        scram_name: &str,
        nonce: &str,
    ) -> PassThroughClient {
        let client_first_bare = format!("n={scram_name},r={nonce}");
        PassThroughClient {
            keys,
            user: user.to_string(),
            nonce: nonce.to_string(),
            message: format!("n,,{client_first_bare}").into_bytes(),
            client_first_bare,
            auth_message: None,
        }
    }

    /// The message to send next (client-first, then client-final).
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// Reads the server-first message (`r=<nonce>,s=<salt>,i=<iterations>`) and prepares the
    /// client-final message with the proof.
    pub fn update(&mut self, server_first: &[u8]) -> Result<(), PassThroughError> {
        let text = std::str::from_utf8(server_first)
            .map_err(|_| "SCRAM server-first message is not UTF-8".to_string())?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for part in text.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = Some(v);
            } else if let Some(v) = part.strip_prefix("i=") {
                iterations = Some(v);
            } else if part.starts_with("m=") {
                return Err("SCRAM server-first message has a mandatory extension".into());
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err("malformed SCRAM server-first message".into());
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("SCRAM server nonce does not extend the client's".into());
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| "SCRAM salt is not base64".to_string())?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| "SCRAM iteration count is not a number".to_string())?;
        let s = &self.keys.secret;
        if salt != s.salt || iterations != s.iterations {
            let what = if salt != s.salt {
                "another salt".to_string()
            } else {
                format!("{iterations} iterations, tidemark's {}", s.iterations)
            };
            return Err(format!(
                "SCRAM pass-through for user \"{}\": the server's verifier differs from the one tidemark checked the client against ({what}); give tidemark the same verifier (copy it from pg_authid, or use auth_query) or set server_password",
                self.user
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let client_key = self.keys.client_key.bytes();
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        self.message = format!("{without_proof},p={}", B64.encode(proof)).into_bytes();
        self.auth_message = Some(auth_message);
        Ok(())
    }

    /// Checks the server-final message: its signature must be HMAC(ServerKey, AuthMessage)
    /// with the verifier's ServerKey.
    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), PassThroughError> {
        let auth_message = self
            .auth_message
            .take()
            .ok_or_else(|| "SCRAM server-final message before the proof".to_string())?;
        let text = std::str::from_utf8(server_final)
            .map_err(|_| "SCRAM server-final message is not UTF-8".to_string())?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(format!(
                "SCRAM pass-through for user \"{}\" refused by the server: {e}",
                self.user
            ));
        }
        let v = text
            .split(',')
            .find_map(|p| p.strip_prefix("v="))
            .ok_or_else(|| "malformed SCRAM server-final message".to_string())?;
        let got = B64
            .decode(v)
            .map_err(|_| "SCRAM server signature is not base64".to_string())?;
        let want = hmac(&self.keys.secret.server_key, auth_message.as_bytes());
        if !constant_time_eq(&got, &want) {
            return Err(format!(
                "SCRAM pass-through for user \"{}\": the server's signature does not match tidemark's verifier (the server's verifier differs)",
                self.user
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{recover_client_key, salted_password};
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn keys_from_password(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let sp = salted_password(password.as_bytes(), salt, iterations);
        let client_key = hmac(&sp, b"Client Key");
        ScramKeys {
            secret: ScramSecret {
                iterations,
                salt: salt.to_vec(),
                stored_key: Sha256::digest(client_key).into(),
                server_key: hmac(&sp, b"Server Key"),
            },
            client_key: ClientKey::new(client_key),
        }
    }

    /// RFC 7677's SCRAM-SHA-256 example (user "user", password "pencil"), computed from the
    /// ClientKey alone: the same client-final message and proof, and its server signature
    /// is accepted.
    #[test]
    fn proof_from_client_key_matches_rfc7677() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let keys = Arc::new(keys_from_password("pencil", &salt, 4096));
        let mut c = PassThroughClient::with_nonce(keys, "user", "user", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(c.message(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        c.update(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            std::str::from_utf8(c.message()).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        c.finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
    }

    /// A server signature made with another ServerKey, a server verifier with another salt,
    /// a server nonce that does not extend ours: all refused.
    #[test]
    fn other_verifiers_and_bad_servers_are_refused() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let keys = Arc::new(keys_from_password("pencil", &salt, 4096));
        let first = b"r=abcdefXYZ,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let mut c = PassThroughClient::with_nonce(keys.clone(), "app", "", "abcdef");
        c.update(first).unwrap();
        let e = c.finish(format!("v={}", B64.encode([1u8; 32])).as_bytes());
        assert!(e.unwrap_err().contains("differs"));

        let mut c = PassThroughClient::with_nonce(keys.clone(), "app", "", "abcdef");
        let e = c
            .update(b"r=abcdefXYZ,s=AAAAAAAAAAAAAAAAAAAAAA==,i=4096")
            .unwrap_err();
        assert!(
            e.contains("user \"app\"") && e.contains("verifier differs"),
            "{e}"
        );
        let mut c = PassThroughClient::with_nonce(keys.clone(), "app", "", "abcdef");
        assert!(c
            .update(b"r=abcdefXYZ,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=10000")
            .is_err());
        let mut c = PassThroughClient::with_nonce(keys.clone(), "app", "", "abcdef");
        assert!(c
            .update(b"r=other,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .is_err());
        let mut c = PassThroughClient::with_nonce(keys, "app", "", "abcdef");
        assert!(c.update(b"garbage").is_err());
        assert!(c.finish(b"v=xyz").is_err());
    }

    /// The whole loop: postgres-protocol's client (from the password) logs in to tidemark's
    /// server side, which recovers its ClientKey; a pass-through client with that key then
    /// produces a proof the server side accepts, and accepts the server's signature.
    #[test]
    fn client_key_recovered_from_postgres_protocol_proof_logs_in_again() {
        let secret = ScramSecret::from_password("s3cret");
        let server_first_for = |client_first: &[u8]| {
            let bare = std::str::from_utf8(client_first)
                .unwrap()
                .strip_prefix("n,,")
                .unwrap()
                .to_string();
            let nonce = bare.split(',').find_map(|p| p.strip_prefix("r=")).unwrap();
            let server_first = format!(
                "r={nonce}SERVERNONCE,s={},i={}",
                B64.encode(&secret.salt),
                secret.iterations
            );
            (bare, server_first)
        };
        let check = |bare: &str, server_first: &str, client_final: &[u8]| {
            let text = std::str::from_utf8(client_final).unwrap();
            let (without, proof) = text.rsplit_once(",p=").unwrap();
            let auth = format!("{bare},{server_first},{without}");
            let key = recover_client_key(&secret, auth.as_bytes(), &B64.decode(proof).unwrap());
            let server_final = format!(
                "v={}",
                B64.encode(hmac(&secret.server_key, auth.as_bytes()))
            );
            (key, server_final)
        };

        let mut pp = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let (bare, server_first) = server_first_for(pp.message());
        pp.update(server_first.as_bytes()).unwrap();
        let (key, server_final) = check(&bare, &server_first, pp.message());
        let key = key.expect("the right password's proof is accepted");
        pp.finish(server_final.as_bytes()).unwrap();

        let keys = Arc::new(ScramKeys {
            secret: secret.clone(),
            client_key: key,
        });
        let mut c = PassThroughClient::new(keys, "app");
        assert!(c.message().starts_with(b"n,,n=,r="));
        let (bare, server_first) = server_first_for(c.message());
        c.update(server_first.as_bytes()).unwrap();
        let (key, server_final) = check(&bare, &server_first, c.message());
        assert!(key.is_some(), "the pass-through proof is accepted");
        c.finish(server_final.as_bytes()).unwrap();

        // A wrong password's proof reveals no key.
        let mut pp = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
        let (bare, server_first) = server_first_for(pp.message());
        pp.update(server_first.as_bytes()).unwrap();
        assert!(check(&bare, &server_first, pp.message()).0.is_none());
    }

    #[test]
    fn slots_keep_keys_only_for_the_same_verifier() {
        let slot = KeySlot::default();
        assert!(slot.get().is_none());
        let k = keys_from_password("a", b"salt", 4096);
        let secret = k.secret.clone();
        slot.set(k);
        slot.keep_only(Some(&secret));
        assert!(slot.get().is_some());
        slot.keep_only(Some(&ScramSecret::from_password("a")));
        assert!(slot.get().is_none());
        assert_eq!(
            format!("{:?}", keys_from_password("a", b"s", 1).client_key),
            "ClientKey(..)"
        );
    }
}
