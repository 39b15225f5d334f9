//! Why a QUIC connection failed or ended, as one typed answer for the anchor and the node.
//!
//! A [`quinn::ConnectionError`] mixes three things: TLS alerts (carried as QUIC crypto errors,
//! `0x100 + alert`, RFC 9001 §4.8), Anchorage's own application close codes
//! ([`ErrorCode`]), and transport events (idle timeout, reset). [`ConnFailure::classify`] sorts
//! them into one enum with a stable [`name`](ConnFailure::name) for logs and metrics, and says
//! what a node should do about it ([`ConnFailure::node_action`]): pair again, renew, or retry.
//!
//! A TLS alert means the same whichever side raised it: `certificate_revoked` sent by the
//! anchor (the node sees `ConnectionClosed`) and one raised by the local stack (the node sees
//! `TransportError`) classify alike. [`ConnFailure::by_peer`] keeps the difference for
//! those who need it.

use std::fmt;

use anchorage_wire::ErrorCode;
use rustls::AlertDescription;

/// The first QUIC error code of the crypto range: a TLS alert `a` travels as `0x100 + a`.
const CRYPTO_ERROR_BASE: u64 = 0x100;

/// What a failed or closed connection tells us, classified once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnFailure {
    /// TLS `bad_certificate`: a certificate was refused (for the anchor: one it no longer
    /// knows, e.g. of a removed device or another CA; for the node: the anchor's).
    BadCertificate,
    /// TLS `certificate_revoked`: the device's certificate is on the revocation list.
    CertificateRevoked,
    /// TLS `certificate_expired`: expired beyond the renewal grace period.
    CertificateExpired,
    /// TLS `unknown_ca`: the certificate was not issued by the CA the other side trusts.
    UnknownCa,
    /// TLS `no_application_protocol`: no ALPN in common.
    NoApplicationProtocol,
    /// Another TLS alert (its number, e.g. 40 for `handshake_failure`).
    TlsAlert(u8),
    /// The peer closed the connection with one of Anchorage's application codes.
    Closed(ErrorCode),
    /// The peer closed with an application code this version does not know (its number).
    ClosedUnknown(u64),
    /// The peer's QUIC stack aborted with a transport error that is not a TLS alert.
    ClosedByPeer(u64),
    /// This side detected a transport error that is not a TLS alert (the peer broke QUIC).
    Transport(u64),
    /// Nothing heard from the peer within the idle timeout (or the handshake never finished).
    TimedOut,
    /// The peer reset the connection (it restarted and lost the connection's state).
    Reset,
    /// No QUIC version in common.
    VersionMismatch,
    /// This side closed the connection.
    LocallyClosed,
    /// Not enough connection id space; a local configuration problem.
    CidsExhausted,
}

/// Who raised the failure, for [`ConnFailure::by_peer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The peer sent it (a close frame or an alert from the other side).
    Peer,
    /// This side's stack raised it (a failed verification here, a timeout).
    Local,
}

/// What a node does after its connection to the anchor ended this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeAction {
    /// Reconnect with backoff: the network, a restart of the anchor, a replaced session.
    Retry,
    /// Reconnect at once to renew the certificate (inside the grace period).
    Renew,
    /// Stop: the device was revoked; an operator must remove it before it can pair again.
    Revoked,
    /// Stop: the device was removed (or its certificate is no longer known); pair again.
    Removed,
    /// Stop: the certificate expired beyond the grace period; pair again.
    Expired,
    /// Stop: the anchor does not know this device; pair again.
    Unknown,
}

impl NodeAction {
    /// Whether the node must stop (it cannot connect again without a new pairing).
    pub fn is_fatal(self) -> bool {
        !matches!(self, NodeAction::Retry | NodeAction::Renew)
    }
}

impl ConnFailure {
    /// Classifies a connection error (from a handshake, `closed()` or a stream operation).
    pub fn classify(err: &quinn::ConnectionError) -> ConnFailure {
        Self::classify_with_origin(err).0
    }

    /// Like [`classify`](Self::classify), with who raised it.
    pub fn classify_with_origin(err: &quinn::ConnectionError) -> (ConnFailure, Origin) {
        use quinn::ConnectionError as E;
        match err {
            E::TransportError(t) => {
                let code = u64::from(t.code);
                let f = from_alert_code(code).unwrap_or(ConnFailure::Transport(code));
                (f, Origin::Local)
            }
            E::ConnectionClosed(c) => {
                let code = u64::from(c.error_code);
                let f = from_alert_code(code).unwrap_or(ConnFailure::ClosedByPeer(code));
                (f, Origin::Peer)
            }
            E::ApplicationClosed(a) => {
                let code = a.error_code.into_inner();
                let f = u32::try_from(code)
                    .ok()
                    .and_then(ErrorCode::from_u32)
                    .map_or(ConnFailure::ClosedUnknown(code), ConnFailure::Closed);
                (f, Origin::Peer)
            }
            E::Reset => (ConnFailure::Reset, Origin::Peer),
            E::VersionMismatch => (ConnFailure::VersionMismatch, Origin::Peer),
            E::TimedOut => (ConnFailure::TimedOut, Origin::Local),
            E::LocallyClosed => (ConnFailure::LocallyClosed, Origin::Local),
            E::CidsExhausted => (ConnFailure::CidsExhausted, Origin::Local),
        }
    }

    /// Whether the peer raised it (see [`Origin`]).
    pub fn by_peer(err: &quinn::ConnectionError) -> bool {
        Self::classify_with_origin(err).1 == Origin::Peer
    }

    /// A short, stable, snake_case name for logs and metrics labels. Every TLS alert without
    /// a variant of its own is `tls_alert`; every known application code is
    /// `application_closed` (its own name is [`ErrorCode::name`]).
    pub const fn name(self) -> &'static str {
        match self {
            ConnFailure::BadCertificate => "bad_certificate",
            ConnFailure::CertificateRevoked => "certificate_revoked",
            ConnFailure::CertificateExpired => "certificate_expired",
            ConnFailure::UnknownCa => "unknown_ca",
            ConnFailure::NoApplicationProtocol => "no_application_protocol",
            ConnFailure::TlsAlert(_) => "tls_alert",
            ConnFailure::Closed(_) | ConnFailure::ClosedUnknown(_) => "application_closed",
            ConnFailure::ClosedByPeer(_) => "closed_by_peer",
            ConnFailure::Transport(_) => "transport_error",
            ConnFailure::TimedOut => "timeout",
            ConnFailure::Reset => "reset",
            ConnFailure::VersionMismatch => "version_mismatch",
            ConnFailure::LocallyClosed => "locally_closed",
            ConnFailure::CidsExhausted => "cids_exhausted",
        }
    }

    /// Whether this was a TLS alert (a handshake or certificate problem, not the network).
    pub fn is_tls(self) -> bool {
        matches!(
            self,
            ConnFailure::BadCertificate
                | ConnFailure::CertificateRevoked
                | ConnFailure::CertificateExpired
                | ConnFailure::UnknownCa
                | ConnFailure::NoApplicationProtocol
                | ConnFailure::TlsAlert(_)
        )
    }

    /// What a node does when its connection to the anchor failed this way. A certificate the
    /// anchor refuses (`bad_certificate`, `unknown_ca`) means the device was removed: the CA
    /// still trusts only devices it knows. Anything else not about this device is retried.
    pub fn node_action(self) -> NodeAction {
        match self {
            ConnFailure::CertificateRevoked | ConnFailure::Closed(ErrorCode::Revoked) => {
                NodeAction::Revoked
            }
            ConnFailure::CertificateExpired => NodeAction::Expired,
            ConnFailure::BadCertificate
            | ConnFailure::UnknownCa
            | ConnFailure::Closed(ErrorCode::Removed) => NodeAction::Removed,
            ConnFailure::Closed(ErrorCode::Unauthenticated) => NodeAction::Unknown,
            ConnFailure::Closed(ErrorCode::CertificateExpired) => NodeAction::Renew,
            _ => NodeAction::Retry,
        }
    }

    /// Whether a node must stop and be paired again (see [`node_action`](Self::node_action)).
    pub fn is_fatal_for_node(self) -> bool {
        self.node_action().is_fatal()
    }
}

impl fmt::Display for ConnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnFailure::TlsAlert(a) => write!(f, "tls_alert ({:?})", AlertDescription::from(*a)),
            ConnFailure::Closed(code) => write!(f, "closed by the peer: {code}"),
            ConnFailure::ClosedUnknown(code) => write!(f, "closed by the peer: code {code}"),
            ConnFailure::ClosedByPeer(code) | ConnFailure::Transport(code) => {
                write!(f, "{} (0x{code:x})", self.name())
            }
            other => f.write_str(other.name()),
        }
    }
}

/// The failure for a QUIC error code in the crypto range, `None` outside it.
fn from_alert_code(code: u64) -> Option<ConnFailure> {
    let alert = u8::try_from(code.checked_sub(CRYPTO_ERROR_BASE)?).ok()?;
    Some(match AlertDescription::from(alert) {
        AlertDescription::BadCertificate => ConnFailure::BadCertificate,
        AlertDescription::CertificateRevoked => ConnFailure::CertificateRevoked,
        AlertDescription::CertificateExpired => ConnFailure::CertificateExpired,
        AlertDescription::UnknownCA => ConnFailure::UnknownCa,
        AlertDescription::NoApplicationProtocol => ConnFailure::NoApplicationProtocol,
        _ => ConnFailure::TlsAlert(alert),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::{ApplicationClose, ConnectionClose, ConnectionError, TransportErrorCode, VarInt};

    fn local_alert(alert: u8) -> ConnectionError {
        ConnectionError::TransportError(quinn_proto::TransportError {
            code: TransportErrorCode::crypto(alert),
            frame: None,
            reason: "invalid peer certificate".into(),
        })
    }

    fn peer_alert(alert: u8) -> ConnectionError {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: Default::default(),
        })
    }

    fn app(code: u64) -> ConnectionError {
        ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: VarInt::from_u64(code).unwrap(),
            reason: Default::default(),
        })
    }

    #[test]
    fn tls_alerts_classify_alike_from_either_side() {
        // The alert numbers of RFC 8446 §6.
        let cases = [
            (42, ConnFailure::BadCertificate, "bad_certificate"),
            (44, ConnFailure::CertificateRevoked, "certificate_revoked"),
            (45, ConnFailure::CertificateExpired, "certificate_expired"),
            (48, ConnFailure::UnknownCa, "unknown_ca"),
            (
                120,
                ConnFailure::NoApplicationProtocol,
                "no_application_protocol",
            ),
            (40, ConnFailure::TlsAlert(40), "tls_alert"),
        ];
        for (alert, failure, name) in cases {
            let (f, origin) = ConnFailure::classify_with_origin(&local_alert(alert));
            assert_eq!((f, origin), (failure, Origin::Local), "alert {alert}");
            let (f, origin) = ConnFailure::classify_with_origin(&peer_alert(alert));
            assert_eq!((f, origin), (failure, Origin::Peer), "alert {alert}");
            assert_eq!(f.name(), name);
            assert!(f.is_tls());
        }
    }

    #[test]
    fn transport_errors_outside_the_crypto_range_are_not_alerts() {
        let protocol_violation = ConnectionError::TransportError(quinn_proto::TransportError {
            code: TransportErrorCode::PROTOCOL_VIOLATION,
            frame: None,
            reason: String::new(),
        });
        let f = ConnFailure::classify(&protocol_violation);
        assert_eq!(f, ConnFailure::Transport(0xa));
        assert_eq!(f.name(), "transport_error");
        assert!(!f.is_tls());
        let closed = ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::PROTOCOL_VIOLATION,
            frame_type: None,
            reason: Default::default(),
        });
        assert_eq!(
            ConnFailure::classify(&closed),
            ConnFailure::ClosedByPeer(0xa)
        );
        assert_eq!(ConnFailure::classify(&closed).name(), "closed_by_peer");
        assert_eq!(
            ConnFailure::classify(&closed).node_action(),
            NodeAction::Retry
        );
    }

    #[test]
    fn application_codes_are_read_as_ours() {
        assert_eq!(
            ConnFailure::classify(&app(u64::from(ErrorCode::Revoked.as_u32()))),
            ConnFailure::Closed(ErrorCode::Revoked)
        );
        assert_eq!(
            ConnFailure::classify(&app(9999)),
            ConnFailure::ClosedUnknown(9999)
        );
        assert!(ConnFailure::by_peer(&app(0)));
        assert_eq!(
            ConnFailure::classify(&app(9999)).to_string(),
            "closed by the peer: code 9999"
        );
    }

    #[test]
    fn what_a_node_does_about_each() {
        let action = |e: &ConnectionError| ConnFailure::classify(e).node_action();
        let code = |c: ErrorCode| app(u64::from(c.as_u32()));
        assert_eq!(action(&peer_alert(44)), NodeAction::Revoked);
        assert_eq!(action(&code(ErrorCode::Revoked)), NodeAction::Revoked);
        assert_eq!(action(&peer_alert(45)), NodeAction::Expired);
        assert_eq!(action(&peer_alert(42)), NodeAction::Removed);
        assert_eq!(action(&local_alert(48)), NodeAction::Removed);
        assert_eq!(action(&code(ErrorCode::Removed)), NodeAction::Removed);
        assert_eq!(
            action(&code(ErrorCode::Unauthenticated)),
            NodeAction::Unknown
        );
        assert_eq!(
            action(&code(ErrorCode::CertificateExpired)),
            NodeAction::Renew
        );
        for retry in [
            code(ErrorCode::ShuttingDown),
            code(ErrorCode::Replaced),
            code(ErrorCode::Overloaded),
            app(9999),
            peer_alert(40),
            peer_alert(120),
            ConnectionError::TimedOut,
            ConnectionError::Reset,
            ConnectionError::LocallyClosed,
        ] {
            let f = ConnFailure::classify(&retry);
            assert_eq!(f.node_action(), NodeAction::Retry, "{retry:?}");
            assert!(!f.is_fatal_for_node());
        }
        assert!(ConnFailure::CertificateRevoked.is_fatal_for_node());
        assert!(!NodeAction::Renew.is_fatal());
    }

    #[test]
    fn names_are_stable_and_timeouts_are_local() {
        assert_eq!(
            ConnFailure::classify_with_origin(&ConnectionError::TimedOut),
            (ConnFailure::TimedOut, Origin::Local)
        );
        assert_eq!(ConnFailure::TimedOut.name(), "timeout");
        assert_eq!(ConnFailure::Reset.name(), "reset");
        assert_eq!(ConnFailure::VersionMismatch.name(), "version_mismatch");
        assert_eq!(
            ConnFailure::TlsAlert(40).to_string(),
            "tls_alert (HandshakeFailure)"
        );
        assert_eq!(
            ConnFailure::Transport(0xa).to_string(),
            "transport_error (0xa)"
        );
    }
}
