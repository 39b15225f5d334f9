//! Pairing codes and the cryptography of the pairing handshake.
//!
//! A pairing code is either a PIN typed by a person (`K7QF-482913`: a public code id, a dash, a
//! 6-digit secret) or a QR URI (`anchorage://pair?...`) carrying the anchor address, the code
//! id, a high-entropy secret and the CA fingerprint.
//!
//! The handshake is SPAKE2 (Ed25519 group) with the code secret as password; the node is side A
//! ([`ID_NODE`]), the anchor side B ([`ID_ANCHOR`]). The PAKE key is bound to the TLS session:
//! both sides feed 32 bytes of the TLS keying-material exporter (label [`EXPORTER_LABEL`]) into
//! the transcript and into HKDF-SHA256, so a relay that terminates TLS on each side (and so
//! sees two different exporters) cannot make the confirmations match even if it relays every
//! message. From the key, HKDF derives:
//!
//! - confirmation keys for each direction (the node confirms first; the anchor only answers
//!   after checking it, so a wrong guess is one online attempt and nothing to test offline),
//! - a CSR key, a result key (MACs the issued certificate) and a resume key (proves the node on
//!   a later connection, bound to that connection's exporter),
//! - the short authentication string (SAS) both sides show.
//!
//! Nothing here does IO or reads a clock.

use std::fmt;
use std::str::FromStr;

use anchorage_wire::bootstrap::{MAC_LEN, MAX_CODE_ID_LEN};
use data_encoding::BASE32_NOPAD;
use ring::{digest, hkdf, hmac};
use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::pki::Fingerprint;

/// Label of the TLS exporter that binds the pairing to the TLS session.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-anchorage-pairing";
/// Bytes taken from the exporter.
pub const EXPORTER_LEN: usize = 32;
/// SPAKE2 identity of the node (side A).
pub const ID_NODE: &[u8] = b"anchorage-node";
/// SPAKE2 identity of the anchor (side B).
pub const ID_ANCHOR: &[u8] = b"anchorage-anchor";
/// Characters of the id of a PIN code (40 bits): typed by a person, as `K7QF-M2XA-482913`.
///
/// The id travels on the wire and an unknown id is answered like a wrong secret, so the id
/// is not a secret; its length only makes sweeping for live codes hopeless at the rates
/// the anchor allows (docs/security.md).
pub const CODE_ID_LEN: usize = 8;
/// Characters of the id of a QR code (80 bits): nobody types it.
pub const QR_CODE_ID_LEN: usize = 16;
/// Shortest code id accepted when parsing (ids minted by older anchors were 4 characters).
pub const MIN_CODE_ID_LEN: usize = 4;
/// Digits of a PIN secret.
pub const PIN_DIGITS: usize = 6;
/// Bytes of randomness in a QR secret.
pub const QR_SECRET_BYTES: usize = 16;
/// Scheme and path of QR pairing URIs.
pub const QR_URI_PREFIX: &str = "anchorage://pair?";

const TRANSCRIPT_LABEL: &[u8] = b"anchorage-pairing-v1";

/// Errors of the pairing cryptography and of parsing codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PairingCryptoError {
    /// The peer's SPAKE2 message was malformed.
    #[error("malformed SPAKE2 message from peer")]
    BadSpakeMessage,
    /// A pairing code did not parse.
    #[error("invalid pairing code: {0}")]
    BadCode(String),
    /// The system random source failed.
    #[error("system random source failed")]
    Random,
}

/// The public id of a pairing code: base32 characters, upper case, without dashes
/// ([`CODE_ID_LEN`] for PIN codes, [`QR_CODE_ID_LEN`] for QR codes).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct CodeId(String);

impl CodeId {
    /// A random id for a PIN code ([`CODE_ID_LEN`] characters).
    pub fn random() -> Result<CodeId, PairingCryptoError> {
        let bytes = random_bytes::<5>()?;
        Ok(CodeId(BASE32_NOPAD.encode(&bytes)))
    }

    /// A random id for a QR code ([`QR_CODE_ID_LEN`] characters).
    pub fn random_qr() -> Result<CodeId, PairingCryptoError> {
        let bytes = random_bytes::<10>()?;
        Ok(CodeId(BASE32_NOPAD.encode(&bytes)))
    }

    /// The id in groups of four, as a person reads and types it: `K7QF-M2XA`.
    pub fn grouped(&self) -> String {
        let mut out = String::with_capacity(self.0.len() + self.0.len() / 4);
        for (i, c) in self.0.chars().enumerate() {
            if i > 0 && i % 4 == 0 {
                out.push('-');
            }
            out.push(c);
        }
        out
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for CodeId {
    type Err = PairingCryptoError;

    /// Accepts any case, with dashes or spaces between groups.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let up: String = s
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let ok = (MIN_CODE_ID_LEN..=MAX_CODE_ID_LEN).contains(&up.len())
            && up
                .bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
        if !ok {
            return Err(PairingCryptoError::BadCode(format!(
                "a code id is {CODE_ID_LEN} characters A-Z or 2-7 (QR codes: {QR_CODE_ID_LEN})"
            )));
        }
        Ok(CodeId(up))
    }
}

/// The secret part of a code. Never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodeSecret(String);

impl CodeSecret {
    /// A random 6-digit PIN secret.
    pub fn random_pin() -> Result<CodeSecret, PairingCryptoError> {
        // 10^6 divides neither 2^32 evenly; reject the biased tail.
        loop {
            let n = u32::from_be_bytes(random_bytes::<4>()?);
            if n < 4_294_000_000 {
                return Ok(CodeSecret(format!("{:06}", n % 1_000_000)));
            }
        }
    }

    /// A random high-entropy secret for QR codes.
    pub fn random_qr() -> Result<CodeSecret, PairingCryptoError> {
        let bytes = random_bytes::<QR_SECRET_BYTES>()?;
        Ok(CodeSecret(BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()))
    }

    /// A secret from text (as typed or scanned).
    pub fn new(s: impl Into<String>) -> CodeSecret {
        CodeSecret(s.into())
    }

    /// The secret's text. Handle with care.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CodeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CodeSecret(<redacted>)")
    }
}

/// A PIN code as a person types it: `K7QF-M2XA-482913` (the id in groups of four, then the
/// six digits; case and the dashes inside the id do not matter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinCode {
    /// Public id.
    pub code_id: CodeId,
    /// The 6 digits.
    pub secret: CodeSecret,
}

impl fmt::Display for PinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.code_id.grouped(), self.secret.expose())
    }
}

impl FromStr for PinCode {
    type Err = PairingCryptoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (id, digits) = s.rsplit_once('-').ok_or_else(|| {
            PairingCryptoError::BadCode(
                "expected CODE-ID-123456, for example K7QF-M2XA-482913".into(),
            )
        })?;
        let digits: String = digits.chars().filter(|c| !c.is_whitespace()).collect();
        if digits.len() != PIN_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PairingCryptoError::BadCode(format!(
                "the part after the dash must be {PIN_DIGITS} digits"
            )));
        }
        Ok(PinCode {
            code_id: id.parse()?,
            secret: CodeSecret(digits),
        })
    }
}

/// What a QR pairing code carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QrPayload {
    /// Anchor address (`host:port`) as the operator configured it.
    pub anchor: String,
    /// Public code id.
    pub code_id: CodeId,
    /// High-entropy secret.
    pub secret: CodeSecret,
    /// Fingerprint of the anchor CA the node must see.
    pub ca_fingerprint: Fingerprint,
}

impl QrPayload {
    /// The `anchorage://pair?...` URI.
    pub fn to_uri(&self) -> String {
        format!(
            "{QR_URI_PREFIX}a={}&c={}&s={}&fp={}",
            percent_encode(&self.anchor),
            self.code_id,
            self.secret.expose(),
            self.ca_fingerprint
        )
    }
}

impl FromStr for QrPayload {
    type Err = PairingCryptoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |m: &str| PairingCryptoError::BadCode(m.to_string());
        let query = s
            .trim()
            .strip_prefix(QR_URI_PREFIX)
            .ok_or_else(|| bad("a QR pairing URI starts with anchorage://pair?"))?;
        let (mut anchor, mut code_id, mut secret, mut fp) = (None, None, None, None);
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "a" => anchor = Some(percent_decode(v).ok_or_else(|| bad("bad anchor address"))?),
                "c" => code_id = Some(v.parse::<CodeId>()?),
                "s" => secret = Some(CodeSecret(v.to_string())),
                "fp" => {
                    fp = Some(
                        v.parse::<Fingerprint>()
                            .map_err(|_| bad("bad CA fingerprint"))?,
                    )
                }
                _ => {} // unknown keys are ignored, so the URI can grow
            }
        }
        let secret = secret.ok_or_else(|| bad("missing secret (s=)"))?;
        if secret.0.len() < 16 || secret.0.len() > 64 {
            return Err(bad("secret has the wrong length"));
        }
        Ok(QrPayload {
            anchor: anchor.ok_or_else(|| bad("missing anchor address (a=)"))?,
            code_id: code_id.ok_or_else(|| bad("missing code id (c=)"))?,
            secret,
            ca_fingerprint: fp.ok_or_else(|| bad("missing CA fingerprint (fp=)"))?,
        })
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:[]".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The node's half of the handshake, between sending its SPAKE2 message and receiving the
/// anchor's.
pub struct NodeHandshake {
    state: Spake2<Ed25519Group>,
    code_id: String,
    msg: Vec<u8>,
}

impl NodeHandshake {
    /// Starts the node's side; returns the message to send in `Hello`.
    pub fn start(code_id: &str, secret: &CodeSecret) -> (NodeHandshake, Vec<u8>) {
        let (state, msg) = Spake2::<Ed25519Group>::start_a(
            &Password::new(secret.expose().as_bytes()),
            &Identity::new(ID_NODE),
            &Identity::new(ID_ANCHOR),
        );
        (
            NodeHandshake {
                state,
                code_id: code_id.to_string(),
                msg: msg.clone(),
            },
            msg,
        )
    }

    /// Finishes with the anchor's message and this connection's exporter.
    pub fn finish(
        self,
        anchor_msg: &[u8],
        exporter: &[u8; EXPORTER_LEN],
    ) -> Result<PairingKeys, PairingCryptoError> {
        let key = self
            .state
            .finish(anchor_msg)
            .map_err(|_| PairingCryptoError::BadSpakeMessage)?;
        Ok(PairingKeys::derive(
            &key,
            &self.code_id,
            &self.msg,
            anchor_msg,
            exporter,
        ))
    }
}

impl fmt::Debug for NodeHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeHandshake")
            .field("code_id", &self.code_id)
            .finish_non_exhaustive()
    }
}

/// The anchor's side: answers a node's SPAKE2 message in one step.
///
/// Returns the keys and the anchor's message for `Challenge`.
pub fn anchor_respond(
    code_id: &str,
    secret: &CodeSecret,
    node_msg: &[u8],
    exporter: &[u8; EXPORTER_LEN],
) -> Result<(PairingKeys, Vec<u8>), PairingCryptoError> {
    let (state, msg) = Spake2::<Ed25519Group>::start_b(
        &Password::new(secret.expose().as_bytes()),
        &Identity::new(ID_NODE),
        &Identity::new(ID_ANCHOR),
    );
    let key = state
        .finish(node_msg)
        .map_err(|_| PairingCryptoError::BadSpakeMessage)?;
    let keys = PairingKeys::derive(&key, code_id, node_msg, &msg, exporter);
    Ok((keys, msg))
}

/// Keys derived from one completed SPAKE2 exchange.
pub struct PairingKeys {
    transcript: [u8; 32],
    confirm_node: [u8; 32],
    confirm_anchor: [u8; 32],
    csr: [u8; 32],
    after: AfterKeys,
    sas: String,
    request_id: String,
}

/// The keys that outlive the pairing stream: kept by the anchor with a pending request (to MAC
/// the certificate and check a resume proof) and by the node while it waits.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AfterKeys {
    /// MACs the approved certificate.
    pub result: [u8; 32],
    /// Proves the node when it resumes.
    pub resume: [u8; 32],
}

impl fmt::Debug for AfterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AfterKeys(<redacted>)")
    }
}

impl fmt::Debug for PairingKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingKeys")
            .field("sas", &self.sas)
            .finish_non_exhaustive()
    }
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

impl PairingKeys {
    fn derive(
        spake_key: &[u8],
        code_id: &str,
        msg_a: &[u8],
        msg_b: &[u8],
        exporter: &[u8; EXPORTER_LEN],
    ) -> PairingKeys {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in [
            TRANSCRIPT_LABEL,
            code_id.as_bytes(),
            msg_a,
            msg_b,
            exporter.as_slice(),
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut transcript = [0u8; 32];
        transcript.copy_from_slice(ctx.finish().as_ref());
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &transcript).extract(spake_key);
        let expand = |label: &[u8]| -> [u8; 32] {
            let mut out = [0u8; 32];
            // HKDF-SHA256 can expand up to 8160 bytes; 32 never fails.
            if let Ok(okm) = prk.expand(&[label], Len32) {
                let _ = okm.fill(&mut out);
            }
            out
        };
        let sas_key = expand(b"sas");
        let request_key = expand(b"request id");
        PairingKeys {
            transcript,
            confirm_node: expand(b"confirm node"),
            confirm_anchor: expand(b"confirm anchor"),
            csr: expand(b"csr"),
            after: AfterKeys {
                result: expand(b"result"),
                resume: expand(b"resume"),
            },
            sas: format_sas(&sas_key),
            request_id: format!(
                "req_{}",
                BASE32_NOPAD.encode(&request_key[..10]).to_ascii_lowercase()
            ),
        }
    }

    /// The pairing request's id, derived from the transcript so both sides know it before
    /// the anchor answers (a node that loses the connection right after sending its CSR can
    /// still resume).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The node's confirmation MAC.
    pub fn node_confirmation(&self) -> [u8; MAC_LEN] {
        mac(&self.confirm_node, &[b"node", &self.transcript])
    }

    /// The anchor's confirmation MAC.
    pub fn anchor_confirmation(&self) -> [u8; MAC_LEN] {
        mac(&self.confirm_anchor, &[b"anchor", &self.transcript])
    }

    /// Checks the node's confirmation (constant time).
    pub fn verify_node_confirmation(&self, tag: &[u8; MAC_LEN]) -> bool {
        verify(&self.confirm_node, &[b"node", &self.transcript], tag)
    }

    /// Checks the anchor's confirmation (constant time).
    pub fn verify_anchor_confirmation(&self, tag: &[u8; MAC_LEN]) -> bool {
        verify(&self.confirm_anchor, &[b"anchor", &self.transcript], tag)
    }

    /// MAC over a CSR submission.
    pub fn csr_mac(&self, csr_der: &[u8], name: &str, platform: &str) -> [u8; MAC_LEN] {
        mac(&self.csr, &[csr_der, name.as_bytes(), platform.as_bytes()])
    }

    /// Checks the MAC over a CSR submission.
    pub fn verify_csr_mac(
        &self,
        csr_der: &[u8],
        name: &str,
        platform: &str,
        tag: &[u8; MAC_LEN],
    ) -> bool {
        verify(
            &self.csr,
            &[csr_der, name.as_bytes(), platform.as_bytes()],
            tag,
        )
    }

    /// The short authentication string both sides show.
    pub fn sas(&self) -> &str {
        &self.sas
    }

    /// The keys that outlive the stream.
    pub fn after(&self) -> &AfterKeys {
        &self.after
    }
}

impl AfterKeys {
    /// MAC over an approved certificate.
    pub fn approved_mac(&self, request_id: &str, cert_der: &[u8], ca_der: &[u8]) -> [u8; MAC_LEN] {
        mac(&self.result, &[request_id.as_bytes(), cert_der, ca_der])
    }

    /// Checks the MAC over an approved certificate.
    pub fn verify_approved_mac(
        &self,
        request_id: &str,
        cert_der: &[u8],
        ca_der: &[u8],
        tag: &[u8; MAC_LEN],
    ) -> bool {
        verify(
            &self.result,
            &[request_id.as_bytes(), cert_der, ca_der],
            tag,
        )
    }

    /// A resume proof for `request_id` on the connection whose exporter is given.
    pub fn resume_proof(&self, request_id: &str, exporter: &[u8; EXPORTER_LEN]) -> [u8; MAC_LEN] {
        mac(&self.resume, &[b"resume", request_id.as_bytes(), exporter])
    }

    /// Checks a resume proof.
    pub fn verify_resume_proof(
        &self,
        request_id: &str,
        exporter: &[u8; EXPORTER_LEN],
        tag: &[u8; MAC_LEN],
    ) -> bool {
        verify(
            &self.resume,
            &[b"resume", request_id.as_bytes(), exporter],
            tag,
        )
    }
}

fn mac_input(parts: &[&[u8]]) -> Vec<u8> {
    let mut data = Vec::new();
    for p in parts {
        data.extend_from_slice(&(p.len() as u64).to_be_bytes());
        data.extend_from_slice(p);
    }
    data
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, &mac_input(parts));
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

fn verify(key: &[u8; 32], parts: &[&[u8]], tag: &[u8; MAC_LEN]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::verify(&key, &mac_input(parts), tag).is_ok()
}

fn format_sas(key: &[u8; 32]) -> String {
    let s = BASE32_NOPAD.encode(&key[..5]);
    format!("{}-{}", &s[..4], &s[4..8])
}

fn random_bytes<const N: usize>() -> Result<[u8; N], PairingCryptoError> {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| PairingCryptoError::Random)?;
    Ok(out)
}

/// Random bytes from the system's secure source, for ids and tokens.
pub fn random_id<const N: usize>() -> Result<[u8; N], PairingCryptoError> {
    random_bytes::<N>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        node_secret: &str,
        anchor_secret: &str,
        ex_node: [u8; 32],
        ex_anchor: [u8; 32],
    ) -> (PairingKeys, PairingKeys) {
        let (node, msg_a) = NodeHandshake::start("K7QF", &CodeSecret::new(node_secret));
        let (anchor_keys, msg_b) =
            anchor_respond("K7QF", &CodeSecret::new(anchor_secret), &msg_a, &ex_anchor).unwrap();
        let node_keys = node.finish(&msg_b, &ex_node).unwrap();
        (node_keys, anchor_keys)
    }

    #[test]
    fn same_secret_same_session_confirms_both_ways() {
        let ex = [7u8; 32];
        let (n, a) = run("482913", "482913", ex, ex);
        assert!(a.verify_node_confirmation(&n.node_confirmation()));
        assert!(n.verify_anchor_confirmation(&a.anchor_confirmation()));
        assert_eq!(n.sas(), a.sas());
        assert_eq!(n.sas().len(), 9);
        assert_eq!(n.after(), a.after());
        assert_eq!(n.request_id(), a.request_id());
        assert!(n.request_id().starts_with("req_"));
        let tag = n.csr_mac(b"csr", "laptop", "linux");
        assert!(a.verify_csr_mac(b"csr", "laptop", "linux", &tag));
        assert!(!a.verify_csr_mac(b"csr", "laptop2", "linux", &tag));
    }

    #[test]
    fn wrong_secret_fails_confirmation() {
        let ex = [7u8; 32];
        let (n, a) = run("482913", "482914", ex, ex);
        assert!(!a.verify_node_confirmation(&n.node_confirmation()));
        assert!(!n.verify_anchor_confirmation(&a.anchor_confirmation()));
        assert_ne!(n.sas(), a.sas());
    }

    #[test]
    fn different_tls_sessions_fail_confirmation() {
        // A relay terminating TLS on both sides sees two exporters.
        let (n, a) = run("482913", "482913", [1u8; 32], [2u8; 32]);
        assert!(!a.verify_node_confirmation(&n.node_confirmation()));
    }

    #[test]
    fn resume_proof_is_bound_to_the_connection() {
        let ex = [7u8; 32];
        let (n, a) = run("482913", "482913", ex, ex);
        let proof = n.after().resume_proof("req1", &[9u8; 32]);
        assert!(a.after().verify_resume_proof("req1", &[9u8; 32], &proof));
        assert!(!a.after().verify_resume_proof("req1", &[8u8; 32], &proof));
        assert!(!a.after().verify_resume_proof("req2", &[9u8; 32], &proof));
        let tag = a.after().approved_mac("req1", b"cert", b"ca");
        assert!(n.after().verify_approved_mac("req1", b"cert", b"ca", &tag));
        assert!(!n.after().verify_approved_mac("req1", b"cert2", b"ca", &tag));
    }

    #[test]
    fn garbage_spake_message_is_an_error_not_a_panic() {
        let (node, _) = NodeHandshake::start("K7QF", &CodeSecret::new("1"));
        assert!(node.finish(&[0xff; 3], &[0; 32]).is_err());
        assert!(anchor_respond("K7QF", &CodeSecret::new("1"), &[], &[0; 32]).is_err());
        assert!(anchor_respond("K7QF", &CodeSecret::new("1"), &[0x41; 33], &[0; 32]).is_err());
    }

    #[test]
    fn pin_codes_parse() {
        let pin: PinCode = "k7qf-m2xa-482913".parse().unwrap();
        assert_eq!(pin.code_id.as_str(), "K7QFM2XA");
        assert_eq!(pin.secret.expose(), "482913");
        assert_eq!(pin.to_string(), "K7QF-M2XA-482913");
        assert_eq!(
            pin,
            "K7QFM2XA-482913".parse().unwrap(),
            "dashes in the id are optional"
        );
        // Ids minted before they grew to eight characters still parse.
        assert_eq!(
            "K7QF-482913".parse::<PinCode>().unwrap().code_id.as_str(),
            "K7QF"
        );
        let minted = CodeId::random().unwrap();
        assert_eq!(minted.as_str().len(), CODE_ID_LEN);
        assert_eq!(minted.grouped().parse::<CodeId>().unwrap(), minted);
        assert_eq!(CodeId::random_qr().unwrap().as_str().len(), QR_CODE_ID_LEN);
        for bad in [
            "",
            "K7QF",
            "K7Q-123456",
            "K7QF-12345",
            "K7QF-1234567",
            "K1QF-123456",
            "K7QF-12345a",
        ] {
            assert!(bad.parse::<PinCode>().is_err(), "{bad}");
        }
        let random = CodeSecret::random_pin().unwrap();
        assert_eq!(random.expose().len(), 6);
        assert!(format!("{random:?}").contains("redacted"));
    }

    #[test]
    fn qr_uri_round_trip() {
        let payload = QrPayload {
            anchor: "anchor.example:7444".into(),
            code_id: CodeId::random_qr().unwrap(),
            secret: CodeSecret::random_qr().unwrap(),
            ca_fingerprint: Fingerprint([0xab; 32]),
        };
        let uri = payload.to_uri();
        assert!(uri.starts_with("anchorage://pair?"));
        assert_eq!(uri.parse::<QrPayload>().unwrap(), payload);
        assert!("anchorage://pair?a=x&c=K7QF".parse::<QrPayload>().is_err());
        assert!("https://evil/".parse::<QrPayload>().is_err());
    }
}
