//! Shared runtime pieces of the anchor and the node.
//!
//! - [`identity`]: device key pairs and [`DeviceId`]s.
//! - [`pki`]: the anchor CA, server certificates, CSR signing, certificate facts.
//! - [`conn_error`]: one classifier of connection and TLS errors ([`ConnFailure`]), for both
//!   sides.
//! - [`tls`]: rustls verifiers and the quinn client/server configurations, live revocation.
//! - [`peer_tls`]: mutual TLS between two nodes (the peer mesh).
//! - [`transport`]: quinn transport settings for lossy links.
//! - [`framed`]: typed length-prefixed frames over quinn streams.
//! - [`pairing`]: the SPAKE2 pairing handshake's cryptography, bound to the TLS session.
//!
//! Everything here that involves time takes `now` as an argument.

pub mod config;
pub mod conn_error;
pub mod framed;
pub mod identity;
pub mod os;
pub mod pairing;
pub mod peer_tls;
pub mod pki;
pub mod presence;
pub mod tls;
pub mod transport;

pub use conn_error::ConnFailure;
pub use identity::{DeviceId, DeviceKey};
pub use pki::{CertInfo, CertificateAuthority, Fingerprint};
