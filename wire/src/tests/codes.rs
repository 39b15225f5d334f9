//! Stable numbers and names: application error codes, pairing failure reasons, constants.

use crate::{
    ALPN_BOOTSTRAP, ALPN_NODE, ANCHOR_SERVER_NAME, ErrorCode, FrameError, PROTOCOL_VERSION,
    bootstrap::{MAC_LEN, MAX_CODE_ID_LEN, MAX_SPAKE_LEN, PairFailure},
    frame::HEADER_LEN,
    limits,
};

/// Every pairing failure reason in declaration (wire) order.
pub(super) const ALL_PAIR_FAILURES: [PairFailure; 14] = [
    PairFailure::UnknownCode,
    PairFailure::CodeExpired,
    PairFailure::CodeConsumed,
    PairFailure::CodeBurned,
    PairFailure::WrongSecret,
    PairFailure::Rejected,
    PairFailure::RequestExpired,
    PairFailure::UnknownRequest,
    PairFailure::DeviceRevoked,
    PairFailure::BadCsr,
    PairFailure::UnsupportedVersion,
    PairFailure::ProtocolViolation,
    PairFailure::Overloaded,
    PairFailure::Internal,
];

/// The documented table (`docs/protocol.md`, "Application error codes"). Numbers are a contract
/// with every deployed peer: this list may only grow at the end.
const ERROR_CODES: [(ErrorCode, u32, &str); 16] = [
    (ErrorCode::NoError, 0, "no_error"),
    (ErrorCode::BadFrame, 1, "bad_frame"),
    (ErrorCode::UnsupportedVersion, 2, "unsupported_version"),
    (ErrorCode::Unauthenticated, 3, "unauthenticated"),
    (ErrorCode::Revoked, 4, "revoked"),
    (ErrorCode::PairingFailed, 5, "pairing_failed"),
    (ErrorCode::Overloaded, 6, "overloaded"),
    (ErrorCode::ShuttingDown, 7, "shutting_down"),
    (ErrorCode::ProtocolViolation, 8, "protocol_violation"),
    (ErrorCode::FrameTooLarge, 9, "frame_too_large"),
    (ErrorCode::Internal, 10, "internal"),
    (ErrorCode::CertificateExpired, 11, "certificate_expired"),
    (ErrorCode::Replaced, 12, "replaced"),
    (ErrorCode::Removed, 13, "removed"),
    (ErrorCode::Timeout, 14, "timeout"),
    (ErrorCode::NotAllowed, 15, "not_allowed"),
];

#[test]
fn error_code_numbers_and_names_are_pinned() {
    assert_eq!(ErrorCode::ALL.len(), ERROR_CODES.len());
    for (i, &(code, number, name)) in ERROR_CODES.iter().enumerate() {
        assert_eq!(code.as_u32(), number, "{code:?}");
        assert_eq!(u32::from(code), number, "{code:?}");
        assert_eq!(code.name(), name, "{code:?}");
        assert_eq!(code.to_string(), format!("{name} ({number})"));
        assert_eq!(ErrorCode::ALL[i], code, "ALL must be in numeric order");
    }
    // 0..=15 with no gap.
    let numbers: Vec<u32> = ErrorCode::ALL.iter().map(|c| c.as_u32()).collect();
    assert_eq!(numbers, (0..=15).collect::<Vec<u32>>());
}

#[test]
fn error_code_from_u32_round_trips_and_refuses_unknown_numbers() {
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u32(code.as_u32()), Some(code));
    }
    for unknown in [16, 17, 100, 0x100, u32::MAX] {
        assert_eq!(ErrorCode::from_u32(unknown), None, "{unknown}");
    }
}

#[test]
fn error_code_names_are_unique_snake_case() {
    let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
    names.extend(ALL_PAIR_FAILURES.iter().map(|f| f.name()));
    for name in &names {
        assert!(
            name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{name} is not snake_case"
        );
    }
    let codes: std::collections::HashSet<_> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(codes.len(), ErrorCode::ALL.len());
    let reasons: std::collections::HashSet<_> =
        ALL_PAIR_FAILURES.iter().map(|f| f.name()).collect();
    assert_eq!(reasons.len(), ALL_PAIR_FAILURES.len());
}

#[test]
fn pair_failure_names_are_pinned() {
    let names: Vec<String> = ALL_PAIR_FAILURES.iter().map(|f| f.to_string()).collect();
    assert_eq!(
        names,
        [
            "unknown_code",
            "code_expired",
            "code_consumed",
            "code_burned",
            "wrong_secret",
            "rejected",
            "request_expired",
            "unknown_request",
            "device_revoked",
            "bad_csr",
            "unsupported_version",
            "protocol_violation",
            "overloaded",
            "internal",
        ]
    );
}

#[test]
fn frame_errors_map_to_documented_close_codes() {
    let cases = [
        (
            FrameError::TooLarge { len: 9, max: 8 },
            ErrorCode::FrameTooLarge,
            9,
        ),
        (FrameError::Malformed("x".into()), ErrorCode::BadFrame, 1),
        (FrameError::TrailingBytes(1), ErrorCode::BadFrame, 1),
        (FrameError::Encode("x".into()), ErrorCode::Internal, 10),
    ];
    for (err, code, number) in cases {
        assert_eq!(err.code(), code, "{err:?}");
        assert_eq!(err.code().as_u32(), number, "{err:?}");
    }
}

#[test]
fn constants_are_pinned() {
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(ALPN_BOOTSTRAP, b"anchorage/bootstrap/1");
    assert_eq!(ALPN_NODE, b"anchorage/node/1");
    assert_eq!(ANCHOR_SERVER_NAME, "anchorage-anchor");
    assert_eq!(HEADER_LEN, 4);
    assert_eq!(MAC_LEN, 32);
    assert_eq!(MAX_SPAKE_LEN, 64);
    assert_eq!(MAX_CODE_ID_LEN, 32);
    assert_eq!(limits::MAX_FRAME_LEN, 512 * 1024);
    assert_eq!(limits::MAX_DATAGRAM_LEN, 1024);
    assert_eq!(limits::MAX_NAME_LEN, 128);
    assert_eq!(limits::MAX_TEXT_LEN, 1024);
    assert_eq!(limits::MAX_INVOKE_INPUT, 256 * 1024);
    assert_eq!(limits::MAX_INVOKE_OUTPUT, 256 * 1024);
    assert_eq!(limits::MAX_CERT_LEN, 16 * 1024);
    assert_eq!(limits::MAX_CAPABILITIES, 128);
}
